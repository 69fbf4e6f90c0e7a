//! WebSocket reassembly, both roles, fed in two pieces: never panics, never loops.
#![no_main]
use libfuzzer_sys::fuzz_target;
use s4t_shared::tunnel::ws::{Decoded, Decoder, Role};

fuzz_target!(|data: &[u8]| {
    for role in [Role::Client, Role::Server] {
        let mut dec = Decoder::new(role, 4096);
        let split = data.first().map_or(0, |b| *b as usize).min(data.len());
        let mut buf = bytes::BytesMut::new();
        for part in [&data[..split], &data[split..]] {
            buf.extend_from_slice(part);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Decoded::Message(_)) => continue,
                    Ok(Decoded::Need(n)) => {
                        assert!(n > buf.len());
                        break;
                    }
                    Err(_) => return,
                }
            }
        }
    }
});

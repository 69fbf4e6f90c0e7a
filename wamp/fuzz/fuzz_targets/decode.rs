//! Every serializer's decoder on arbitrary bytes: never panics; whatever decodes re-encodes
//! and decodes to the same message; error replies are well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use s4t_shared::wamp::Serializer;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let ser = Serializer::ALL[usize::from(selector) % Serializer::ALL.len()];
    match ser.decode(bytes) {
        Ok(msg) => {
            let again = ser.encode(&msg).expect("a decoded message re-encodes");
            assert_eq!(ser.decode(&again).expect("and decodes again"), msg);
            for other in Serializer::ALL {
                // Any serializer can carry what one of them decoded (the router translates).
                let bytes = other.encode(&msg).expect("encodes with every serializer");
                assert_eq!(other.decode(&bytes).expect("decodes with every serializer"), msg);
            }
        }
        Err(e) => {
            if let Some(reply) = e.error_reply() {
                let _ = ser.encode(&reply).expect("error replies encode");
            }
        }
    }
});

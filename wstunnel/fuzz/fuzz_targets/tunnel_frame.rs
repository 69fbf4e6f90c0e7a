//! Mux frames: decoding never panics, and whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use s4t_shared::tunnel::Frame;

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(f) = Frame::decode(&b) {
        assert_eq!(Frame::decode(&f.encode()).as_ref(), Ok(&f));
    }
});

//! GRE-TAP decapsulation never panics; encapsulation round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = s4t_shared::gre::decapsulate(data);
    assert_eq!(s4t_shared::gre::decapsulate(&s4t_shared::gre::encapsulate(data)), Ok(data));
});

//! The wstun text a server sends on the control socket, the request paths our server routes
//! for wstun clients, and the wstun command line: none of them panics on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Some(id) = wstunnel::wstun::nc_id(&s) {
        assert!(!id.is_empty() && id.len() <= 64);
    }
    let _ = wstunnel::fuzz_legacy_route(&s);
    let args: Vec<String> = s.split(' ').map(str::to_owned).collect();
    let _ = wstunnel::wstun::parse(&args);
});

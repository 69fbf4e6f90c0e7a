//! Token verification never panics and accepts nothing not minted with the key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use s4t_shared::token::TokenKey;

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(b"fuzz".to_vec()).unwrap();
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = key.verify(s, 0) {
            // Only a correctly signed token can verify: re-minting gives the same claims.
            assert_eq!(key.verify(&key.mint(&c).unwrap(), 0).unwrap(), c);
        }
    }
});

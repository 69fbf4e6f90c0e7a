//! The router's opening handshake fed arbitrary (decoded) messages: it answers with a
//! CHALLENGE-able HELLO, an AUTHENTICATE verdict or an ABORT, never a panic.
#![no_main]

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use s4t_shared::wamp::auth::{ChallengeFor, CraCredential, Secret};
use s4t_shared::wamp::session::{ClientAuth, ClientHandshake, RouterHandshake, client_may_receive, router_may_receive};
use s4t_shared::wamp::Serializer;

fuzz_target!(|data: &[u8]| {
    let mut msgs = data.split(|b| *b == 0xff).filter_map(|chunk| Serializer::Json.decode(chunk).ok());
    let mut router = RouterHandshake::new(1);
    if let Some(first) = msgs.next() {
        let _ = router_may_receive(&first);
        let _ = client_may_receive(&first);
        if router.hello(first).is_ok() {
            let cred = CraCredential::derive(&Secret::new("s"));
            let who = ChallengeFor { authid: "a", authrole: "board", authprovider: "f", session: 1 };
            let _ = router.challenge_cra(&who, cred, SystemTime::now());
            if let Some(second) = msgs.next() {
                let _ = router.authenticate(second);
            }
        }
    }
    let auth = ClientAuth::WampCra { authid: "a".into(), secret: Secret::new("s") };
    let (mut client, _) = ClientHandshake::new("s4t", auth, None);
    for msg in msgs {
        if client.handle(msg).is_err() {
            break;
        }
    }
});

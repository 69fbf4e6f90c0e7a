use std::time::SystemTime;

use super::*;
use crate::wamp::codec::Serializer;

/// Runs both handshakes against each other in memory, with every message going through the
/// JSON codec as it would on a socket. `stored` is what the router's authenticator knows.
fn handshake(auth: ClientAuth, stored: Option<CraCredential>, ticket_ok: &str) -> Result<Welcome, String> {
    let wire = |m: &Message| Serializer::Json.decode(&Serializer::Json.encode(m).unwrap()).unwrap();
    let (mut client, hello) = ClientHandshake::new("s4t", auth, None);
    let mut router = RouterHandshake::new(77);
    let hello = router.hello(wire(&hello)).map_err(|m| format!("{m:?}"))?;
    assert_eq!(hello.realm, "s4t");
    let identity = |method| Identity {
        authid: hello.authid.clone().unwrap_or_else(|| "anon".into()),
        authrole: "board".into(),
        authmethod: method,
        authprovider: "test".into(),
    };
    let (challenge, method) = match hello.methods.first() {
        Some(AuthMethod::Ticket) => (router.challenge_ticket(), AuthMethod::Ticket),
        Some(AuthMethod::WampCra) => {
            let who = ChallengeFor { authid: "b1", authrole: "board", authprovider: "test", session: 77 };
            let cred = stored.expect("a stored credential");
            (router.challenge_cra(&who, cred, SystemTime::now()), AuthMethod::WampCra)
        }
        _ => {
            let ClientStep::Joined(w) = client.handle(wire(&router.welcome(&identity(AuthMethod::Anonymous)))).unwrap()
            else {
                panic!("no welcome")
            };
            return Ok(w);
        }
    };
    let ClientStep::Send(authenticate) = client.handle(wire(&challenge)).map_err(|e| e.to_string())? else {
        panic!("client did not answer the challenge")
    };
    match router.authenticate(wire(&authenticate)).map_err(|m| format!("{m:?}"))? {
        AuthResponse::Ticket(t) if !t.ct_eq(ticket_ok) => {
            let abort = Message::abort(uri::AUTHENTICATION_FAILED, "bad ticket");
            return Err(client.handle(wire(&abort)).unwrap_err().to_string());
        }
        _ => {}
    }
    match client.handle(wire(&router.welcome(&identity(method)))).unwrap() {
        ClientStep::Joined(w) => Ok(w),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ticket_handshake() {
    let auth = ClientAuth::Ticket { authid: "enroll".into(), ticket: Secret::new("CODE-1") };
    let w = handshake(auth.clone(), None, "CODE-1").unwrap();
    assert_eq!((w.session, w.authid.as_str(), w.authmethod.as_str()), (77, "enroll", "ticket"));
    let err = handshake(auth, None, "CODE-2").unwrap_err();
    assert!(err.contains(uri::AUTHENTICATION_FAILED), "{err}");
}

#[test]
fn cra_handshake_with_salted_key() {
    let secret = Secret::new("board-secret");
    let cred = CraCredential::derive(&secret);
    let auth = ClientAuth::WampCra { authid: "b1".into(), secret };
    let w = handshake(auth, Some(cred.clone()), "").unwrap();
    assert_eq!((w.authid.as_str(), w.authrole.as_str(), w.authmethod.as_str()), ("b1", "board", "wampcra"));
    let wrong = ClientAuth::WampCra { authid: "b1".into(), secret: Secret::new("guess") };
    let err = handshake(wrong, Some(cred), "").unwrap_err();
    assert!(err.contains(uri::AUTHENTICATION_FAILED), "{err}");
}

#[test]
fn cra_key_is_cached_for_the_next_handshake() {
    let secret = Secret::new("board-secret");
    let cred = CraCredential::derive(&secret);
    let (mut client, _) = ClientHandshake::new("s4t", ClientAuth::WampCra { authid: "b1".into(), secret }, None);
    let mut router = RouterHandshake::new(1);
    let who = ChallengeFor { authid: "b1", authrole: "board", authprovider: "t", session: 1 };
    let challenge = router.challenge_cra(&who, cred.clone(), SystemTime::now());
    let ClientStep::Send(auth) = client.handle(challenge).unwrap() else { panic!() };
    assert!(matches!(router.authenticate(auth), Ok(AuthResponse::CraVerified)));
    let cache = client.key_cache().cloned().unwrap();
    assert_eq!(cache.0.salt, cred.salt);
    assert_eq!(cache.1, cred.derived_key);
    // A second handshake with a wrong secret but the right cached key still signs correctly:
    // proof that the cache, not PBKDF2, produced the key.
    let auth = ClientAuth::WampCra { authid: "b1".into(), secret: Secret::new("wrong") };
    let (mut client, _) = ClientHandshake::new("s4t", auth, Some(cache));
    let mut router = RouterHandshake::new(2);
    let ClientStep::Send(auth) = client.handle(router.challenge_cra(&who, cred, SystemTime::now())).unwrap() else {
        panic!()
    };
    assert!(matches!(router.authenticate(auth), Ok(AuthResponse::CraVerified)));
}

#[test]
fn anonymous_hello_and_welcome() {
    let w = handshake(ClientAuth::Anonymous, None, "").unwrap();
    assert_eq!(w.authmethod, "anonymous");
    assert!(w.details["roles"]["dealer"]["features"]["call_timeout"].as_bool().unwrap());
}

#[test]
fn router_refuses_out_of_order_messages() {
    let mut router = RouterHandshake::new(1);
    let call = Message::Call { request: 1, options: Dict::new(), procedure: "a".into(), payload: Default::default() };
    assert!(matches!(router.hello(call), Err(Message::Abort { .. })));
    let mut router = RouterHandshake::new(1);
    let auth = Message::Authenticate { signature: "x".into(), extra: Dict::new() };
    assert!(
        matches!(router.authenticate(auth), Err(Message::Abort { reason, .. }) if reason == uri::PROTOCOL_VIOLATION)
    );
    let mut router = RouterHandshake::new(1);
    let hello = Message::Hello { realm: "s4t".into(), details: Dict::new() };
    let parsed = router.hello(hello.clone()).unwrap();
    assert_eq!(parsed.methods, vec![AuthMethod::Anonymous]);
    assert!(router.hello(hello).is_err(), "a second HELLO must be refused");
}

#[test]
fn client_refuses_unoffered_challenges_and_reports_aborts() {
    let (mut client, _) = ClientHandshake::new("s4t", ClientAuth::Anonymous, None);
    let challenge = Message::Challenge { method: "ticket".into(), extra: Dict::new() };
    assert!(matches!(client.handle(challenge), Err(HandshakeError::Protocol(_))));
    let (mut client, _) = ClientHandshake::new("s4t", ClientAuth::Anonymous, None);
    let err = client.handle(Message::abort(uri::NO_SUCH_REALM, "no realm x")).unwrap_err();
    assert_eq!(err, HandshakeError::Aborted { reason: uri::NO_SUCH_REALM.into(), message: Some("no realm x".into()) });
}

#[test]
fn established_session_message_rules() {
    let d = Dict::new;
    assert!(router_may_receive(&Message::Hello { realm: "s4t".into(), details: d() }).is_err());
    assert!(router_may_receive(&Message::Yield { request: 1, options: d(), payload: Default::default() }).is_ok());
    let err = |t| Message::Error {
        request_type: t,
        request: 1,
        details: d(),
        error: "e".into(),
        payload: Default::default(),
    };
    assert!(router_may_receive(&err(code::INVOCATION)).is_ok());
    assert!(router_may_receive(&err(code::CALL)).is_err());
    assert!(client_may_receive(&err(code::CALL)).is_ok());
    assert!(client_may_receive(&err(code::INVOCATION)).is_err());
    assert!(client_may_receive(&Message::Welcome { session: 1, details: d() }).is_err());
    assert!(client_may_receive(&Message::Interrupt { request: 1, options: d() }).is_ok());
}

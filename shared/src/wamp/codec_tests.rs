use serde_json::json;

use super::*;
use crate::wamp::message::{code, uri};

fn dict(v: Value) -> Dict {
    match v {
        Value::Object(d) => d,
        _ => panic!("not a dict"),
    }
}

fn payload() -> Payload {
    Payload::new(vec![json!(1), json!("two"), json!({"x": [1.5, null, true]})], dict(json!({"k": "v"})))
}

fn every_message() -> Vec<Message> {
    use Message::*;
    let d = || dict(json!({"a": 1}));
    vec![
        Hello { realm: "s4t".into(), details: dict(json!({"roles": {"caller": {}}})) },
        Welcome { session: 9_007_199_254_740_992, details: d() },
        Abort { details: d(), reason: uri::NOT_AUTHORIZED.into(), payload: Payload::default() },
        Challenge { method: "wampcra".into(), extra: dict(json!({"challenge": "{}"})) },
        Authenticate { signature: "sig".into(), extra: Dict::new() },
        Goodbye { details: Dict::new(), reason: uri::CLOSE_NORMAL.into() },
        Error { request_type: code::CALL, request: 7, details: d(), error: "app.error".into(), payload: payload() },
        Publish { request: 1, options: d(), topic: "board.x.gpio".into(), payload: payload() },
        Published { request: 1, publication: 2 },
        Subscribe { request: 2, options: Dict::new(), topic: "wamp.session.on_join".into() },
        Subscribed { request: 2, subscription: 3 },
        Unsubscribe { request: 3, subscription: 3 },
        Unsubscribed { request: 3 },
        Event { subscription: 3, publication: 4, details: Dict::new(), payload: Payload::args(vec![json!(5)]) },
        Call { request: 4, options: dict(json!({"timeout": 1000})), procedure: "a.b".into(), payload: payload() },
        Cancel { request: 4, options: dict(json!({"mode": "killnowait"})) },
        Result { request: 4, details: Dict::new(), payload: Payload::default() },
        Register { request: 5, options: Dict::new(), procedure: "iotronic.1.u-u-i-d.DevicePing".into() },
        Registered { request: 5, registration: 6 },
        Unregister { request: 6, registration: 6 },
        Unregistered { request: 6 },
        Invocation { request: 7, registration: 6, details: d(), payload: payload() },
        Interrupt { request: 7, options: Dict::new() },
        Yield { request: 7, options: Dict::new(), payload: Payload::new(vec![], dict(json!({"only": "kw"}))) },
    ]
}

#[test]
fn every_message_round_trips_through_every_serializer() {
    for ser in Serializer::ALL {
        for msg in every_message() {
            let bytes = ser.encode(&msg).unwrap();
            let back = ser.decode(&bytes).unwrap_or_else(|e| panic!("{ser:?} {}: {e}", msg.name()));
            assert_eq!(back, msg, "{ser:?} {}", msg.name());
        }
    }
}

#[test]
fn json_wire_form_is_the_wamp_list() {
    let msg = Message::Call {
        request: 1,
        options: Dict::new(),
        procedure: "com.x".into(),
        payload: Payload::args(vec![json!(2), json!(40)]),
    };
    assert_eq!(Serializer::Json.encode(&msg).unwrap(), br#"[48,1,{},"com.x",[2,40]]"#);
    // kwargs without args still sends an empty args list.
    let msg = Message::Yield { request: 1, options: Dict::new(), payload: Payload::new(vec![], dict(json!({"a": 1}))) };
    assert_eq!(Serializer::Json.encode(&msg).unwrap(), br#"[70,1,{},[],{"a":1}]"#);
    let parsed = Serializer::Json.decode(br#"[2, 123, {"authrole": "board"}]"#).unwrap();
    assert!(matches!(parsed, Message::Welcome { session: 123, .. }));
}

#[test]
fn binary_travels_natively_in_msgpack_and_cbor() {
    let blob = binary_to_json(&[0, 1, 2, 255]);
    let msg = Message::Event {
        subscription: 1,
        publication: 2,
        details: Dict::new(),
        payload: Payload::args(vec![json!(blob)]),
    };
    let packed = Serializer::MsgPack.encode(&msg).unwrap();
    // bin8 marker (0xc4) with length 4, then the raw bytes.
    assert!(packed.windows(6).any(|w| w == [0xc4, 4, 0, 1, 2, 255]), "{packed:x?}");
    assert_eq!(Serializer::MsgPack.decode(&packed).unwrap(), msg);
    let cbor = Serializer::Cbor.encode(&msg).unwrap();
    // CBOR byte string (major type 2) of length 4.
    assert!(cbor.windows(5).any(|w| w == [0x44, 0, 1, 2, 255]), "{cbor:x?}");
    assert_eq!(Serializer::Cbor.decode(&cbor).unwrap(), msg);
    assert_eq!(json_to_binary(&blob).unwrap(), vec![0, 1, 2, 255]);
}

#[test]
fn subprotocols() {
    assert_eq!(Serializer::from_subprotocol("wamp.2.cbor"), Some(Serializer::Cbor));
    assert_eq!(Serializer::from_subprotocol(" wamp.2.json"), Some(Serializer::Json));
    assert_eq!(Serializer::from_subprotocol("wamp.2.msgpack.batched"), None);
    assert_eq!(Serializer::from_subprotocol("wamp.2.msgpack"), Some(Serializer::MsgPack));
}

#[test]
fn malformed_input_is_an_error_never_a_panic() {
    let cases: &[&[u8]] = &[
        b"",
        b"[",
        b"{}",
        b"[]",
        b"[\"48\"]",
        b"[999, 1]",
        b"[48]",
        b"[48, 0, {}, \"a\"]",
        b"[48, 9007199254740993, {}, \"a\"]",
        b"[48, 1.5, {}, \"a\"]",
        b"[48, -1, {}, \"a\"]",
        b"[1, \"s4t\", []]",
        b"[48, 1, {}, \"a\", [], {}, 7]",
        b"\xff\xfe",
    ];
    for ser in Serializer::ALL {
        for case in cases {
            assert!(ser.decode(case).is_err(), "{ser:?} accepted {case:?}");
        }
    }
}

#[test]
fn defects_in_requests_are_answered_with_errors() {
    let e = Serializer::Json.decode(br#"[48, 5, {}, "bad uri"]"#).unwrap_err();
    match e.error_reply() {
        Some(Message::Error { request_type: code::CALL, request: 5, error, .. }) => assert_eq!(error, uri::INVALID_URI),
        other => panic!("{other:?}"),
    }
    let e = Serializer::Json.decode(br#"[64, 6, {}, "a..b"]"#).unwrap_err();
    assert!(matches!(e.error_reply(), Some(Message::Error { request_type: code::REGISTER, request: 6, .. })));
    let e = Serializer::Json.decode(br#"[16, 7, {}, "t", "not a list"]"#).unwrap_err();
    match e.error_reply() {
        Some(Message::Error { error, .. }) => assert_eq!(error, uri::INVALID_ARGUMENT),
        other => panic!("{other:?}"),
    }
    // Without a readable request id, or for non-requests: abort.
    assert!(Serializer::Json.decode(br#"[48, "x", {}, "a"]"#).unwrap_err().error_reply().is_none());
    assert!(Serializer::Json.decode(br#"[1, "bad realm", {}]"#).unwrap_err().error_reply().is_none());
}

#[test]
fn invalid_uris_are_not_echoed_whole() {
    for ser in Serializer::ALL {
        let long = format!("{} {}", "x".repeat(300), "é".repeat(300));
        let call = Message::Call { request: 9, options: Dict::new(), procedure: long, payload: Payload::default() };
        let e = ser.decode(&ser.encode(&call).unwrap()).unwrap_err();
        assert!(e.to_string().len() < 200, "{ser:?}: {e}");
        let Some(Message::Error { error, payload, .. }) = e.error_reply() else { panic!("{ser:?}: {e}") };
        assert_eq!(error, uri::INVALID_URI);
        let reason = payload.args[0].as_str().unwrap();
        assert!(reason.len() < 200, "{ser:?}: {} bytes: {reason}", reason.len());
    }
}

#[test]
fn deep_nesting_is_refused() {
    let deep = format!("[48, 1, {{}}, \"a\", {}{}]", "[".repeat(10_000), "]".repeat(10_000));
    assert!(matches!(Serializer::Json.decode(deep.as_bytes()), Err(DecodeError::Syntax { .. })));
    // MessagePack: 10,000 nested fixarrays of one element.
    let mut packed = vec![0x94, 48, 1, 0x80, 0xa1, b'a'];
    packed[0] = 0x95;
    packed.extend(std::iter::repeat_n(0x91u8, 10_000));
    packed.push(0xc0);
    assert!(matches!(Serializer::MsgPack.decode(&packed), Err(DecodeError::Syntax { .. })));
    let mut cbor = vec![0x85, 0x18, 48, 1, 0xa0, 0x61, b'a'];
    cbor.extend(std::iter::repeat_n(0x81u8, 10_000));
    cbor.push(0xf6);
    assert!(matches!(Serializer::Cbor.decode(&cbor), Err(DecodeError::Syntax { .. })));
}

/// Every serializer draws the line at the same depth, so whatever one decodes, the router can
/// pass on in any other (the fuzz target `decode` found a CBOR message ciborium took that rmp
/// refused once re-encoded).
#[test]
fn every_serializer_accepts_the_same_depth() {
    // CALL [48, 1, {}, "a", [args]]: the message list is depth 1, the args list 2, each list
    // inside one more.
    let nested = |depth: usize| {
        let mut v = json!(1);
        for _ in 0..depth - 2 {
            v = json!([v]);
        }
        json!([48, 1, {}, "a", [v]])
    };
    for depth in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 8] {
        let msg = nested(depth);
        for ser in Serializer::ALL {
            let bytes = match ser {
                Serializer::Json => serde_json::to_vec(&msg).unwrap(),
                Serializer::MsgPack => rmp_serde::to_vec(&msg).unwrap(),
                Serializer::Cbor => {
                    let mut out = Vec::new();
                    ciborium::into_writer(&msg, &mut out).unwrap();
                    out
                }
            };
            let res = ser.decode(&bytes);
            assert_eq!(res.is_ok(), depth <= MAX_DEPTH, "{} at depth {depth}: {res:?}", ser.name());
            if let Ok(m) = res {
                for other in Serializer::ALL {
                    let again = other.encode(&m).unwrap();
                    assert_eq!(other.decode(&again).unwrap(), m, "{} -> {}", ser.name(), other.name());
                }
            }
        }
    }
    // The fuzz finding itself (first byte: the serializer).
    let found = include_bytes!("testdata/decode-depth.bin");
    let ser = Serializer::ALL[usize::from(found[0]) % Serializer::ALL.len()];
    if let Ok(m) = ser.decode(&found[1..]) {
        for other in Serializer::ALL {
            assert_eq!(other.decode(&other.encode(&m).unwrap()).unwrap(), m);
        }
    }
}

#[test]
fn lying_length_prefixes_do_not_allocate() {
    // An array claiming 2^32-1 elements, a bin claiming 4 GiB, a CBOR string claiming 2^63.
    let cases: [(Serializer, &[u8]); 3] = [
        (Serializer::MsgPack, &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
        (Serializer::MsgPack, &[0x92, 0x01, 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00]),
        (Serializer::Cbor, &[0x82, 0x01, 0x7b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x61]),
    ];
    for (ser, bytes) in cases {
        assert!(ser.decode(bytes).is_err());
    }
}

#[test]
fn non_string_keys_and_trailing_bytes_are_refused() {
    // [36, 1, 1, {1: 2}] in MessagePack
    assert!(Serializer::MsgPack.decode(&[0x94, 36, 1, 1, 0x81, 1, 2]).is_err());
    // A valid message followed by a stray byte.
    let mut bytes = Serializer::MsgPack.encode(&Message::Unregistered { request: 1 }).unwrap();
    bytes.push(0);
    assert!(Serializer::MsgPack.decode(&bytes).is_err());
    let mut bytes = Serializer::Cbor.encode(&Message::Unregistered { request: 1 }).unwrap();
    bytes.push(0);
    assert!(Serializer::Cbor.decode(&bytes).is_err());
}

/// A cheap stand-in for the cargo-fuzz targets that runs in every `cargo test`: mutated valid
/// messages and random bytes must decode or fail, never panic.
#[test]
fn mutated_messages_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds: Vec<(Serializer, Vec<u8>)> = Serializer::ALL
        .into_iter()
        .flat_map(|ser| every_message().into_iter().map(move |m| (ser, ser.encode(&m).unwrap())))
        .collect();
    for round in 0..20_000 {
        let (ser, seed) = &seeds[round % seeds.len()];
        let mut bytes = seed.clone();
        for _ in 0..=(next() % 4) {
            if bytes.is_empty() {
                break;
            }
            let i = (next() as usize) % bytes.len();
            match next() % 3 {
                0 => bytes[i] = next() as u8,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, next() as u8),
            }
        }
        let _ = ser.decode(&bytes);
    }
}

/// Found by the fuzzer: payload floats must survive the router's decode and re-encode.
#[test]
fn floats_round_trip_exactly() {
    let text = br#"[48,1,{},"com.x",[7.7777777777777795e+115,0.1,1e-300,-2.5e-8]]"#;
    for ser in Serializer::ALL {
        let msg = Serializer::Json.decode(text).unwrap();
        let again = ser.decode(&ser.encode(&msg).unwrap()).unwrap();
        assert_eq!(again, msg, "{ser:?}");
    }
    assert_eq!(Serializer::Json.encode(&Serializer::Json.decode(text).unwrap()).unwrap(), text);
}

//! Serializers: JSON, MessagePack and CBOR, negotiated as WebSocket subprotocols
//! (`wamp.2.json`, `wamp.2.msgpack`, `wamp.2.cbor`).
//!
//! Decoding is two steps: bytes to a generic value (with a nesting limit), then the strict
//! per-message parse in [`super::parse`]. Nothing here panics on input: every defect is a
//! [`DecodeError`], which tells the receiver whether it can answer with a WAMP ERROR (the
//! request type and id were readable) or must ABORT the session.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq};
use serde_json::{Number, Value};

use super::message::{Dict, Message, Payload};
use super::parse::{DecodeError, from_array};

/// Nesting depth allowed in a decoded message (the message array itself counts as one).
/// Checked on the decoded value, the same for every serializer: their decoders count depth
/// each their own way (a CBOR message ciborium took at its limit was too deep for rmp once
/// the router translated it), so each decoder gets [`DECODER_DEPTH`] and this is the rule.
pub const MAX_DEPTH: usize = 64;

/// The decoders' own recursion limit: above [`MAX_DEPTH`] by a margin for how they count.
const DECODER_DEPTH: usize = MAX_DEPTH + 8;

/// Nesting depth of a value (lists and dicts count, a scalar is 0); stops counting past
/// `limit`.
fn depth(v: &Value, limit: usize) -> usize {
    let inner = match v {
        _ if limit == 0 => return 0,
        Value::Array(items) => items.iter().map(|x| depth(x, limit - 1)).max().unwrap_or(0),
        Value::Object(map) => map.values().map(|x| depth(x, limit - 1)).max().unwrap_or(0),
        _ => return 0,
    };
    1 + inner
}

/// A WAMP serializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Serializer {
    Json,
    MsgPack,
    Cbor,
}

impl Serializer {
    /// Every serializer, in the router's order of preference when a client offers several.
    pub const ALL: [Serializer; 3] = [Serializer::Json, Serializer::MsgPack, Serializer::Cbor];

    /// The WebSocket subprotocol naming this serializer.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Serializer::Json => "wamp.2.json",
            Serializer::MsgPack => "wamp.2.msgpack",
            Serializer::Cbor => "wamp.2.cbor",
        }
    }

    /// The serializer a WebSocket subprotocol names, if it is one we speak.
    pub fn from_subprotocol(name: &str) -> Option<Serializer> {
        Serializer::ALL.into_iter().find(|s| s.subprotocol() == name.trim())
    }

    /// Short name (`json`, `msgpack`, `cbor`), as autobahn reports it.
    pub fn name(self) -> &'static str {
        match self {
            Serializer::Json => "json",
            Serializer::MsgPack => "msgpack",
            Serializer::Cbor => "cbor",
        }
    }

    /// True when messages travel in binary WebSocket frames (text frames for JSON).
    pub fn is_binary(self) -> bool {
        !matches!(self, Serializer::Json)
    }

    /// Encodes a message.
    pub fn encode(self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        let wire = WireMessage { msg, binary: self.is_binary() };
        match self {
            Serializer::Json => serde_json::to_vec(&wire).map_err(|e| EncodeError(e.to_string())),
            Serializer::MsgPack => rmp_serde::to_vec(&wire).map_err(|e| EncodeError(e.to_string())),
            Serializer::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(&wire, &mut out).map_err(|e| EncodeError(e.to_string()))?;
                Ok(out)
            }
        }
    }

    /// Decodes and validates a message.
    pub fn decode(self, bytes: &[u8]) -> Result<Message, DecodeError> {
        let value = match self {
            Serializer::Json => serde_json::from_slice::<Value>(bytes).map_err(|e| syntax(self, e))?,
            Serializer::MsgPack => {
                let mut rest = bytes;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                de.set_max_depth(DECODER_DEPTH);
                let WireValue(v) = WireValue::deserialize(&mut de).map_err(|e| syntax(self, e))?;
                if !rest.is_empty() {
                    return Err(syntax(self, "trailing bytes after the message"));
                }
                v
            }
            Serializer::Cbor => {
                let mut rest = bytes;
                let WireValue(v) = ciborium::de::from_reader_with_recursion_limit(&mut rest, DECODER_DEPTH)
                    .map_err(|e| syntax(self, e))?;
                if !rest.is_empty() {
                    return Err(syntax(self, "trailing bytes after the message"));
                }
                v
            }
        };
        if depth(&value, MAX_DEPTH + 1) > MAX_DEPTH {
            return Err(syntax(self, format!("nested deeper than {MAX_DEPTH}")));
        }
        match value {
            Value::Array(items) => from_array(items),
            other => Err(DecodeError::NotAMessage(format!("expected a list, got {}", kind(&other)))),
        }
    }
}

fn syntax(ser: Serializer, e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Syntax { format: ser.name(), reason: e.to_string() }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// A message could not be encoded (only possible for values a format cannot represent).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode WAMP message: {0}")]
pub struct EncodeError(String);

/// Converts binary to the WAMP JSON convention: `\0` followed by base64.
pub fn binary_to_json(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(1 + bytes.len().div_ceil(3) * 4);
    s.push('\0');
    B64.encode_string(bytes, &mut s);
    s
}

/// The bytes a JSON-convention binary string stands for, if `s` is one.
pub fn json_to_binary(s: &str) -> Option<Vec<u8>> {
    s.strip_prefix('\0').and_then(|b64| B64.decode(b64).ok())
}

/// Serializes a message as its WAMP list.
struct WireMessage<'a> {
    msg: &'a Message,
    binary: bool,
}

fn payload_len(p: &Payload) -> usize {
    match (p.args.is_empty(), p.kwargs.is_empty()) {
        (true, true) => 0,
        (_, false) => 2,
        (false, true) => 1,
    }
}

impl Serialize for WireMessage<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use Message::*;
        let b = self.binary;
        let d = |dict| WireDict(dict, b);
        let (fixed, payload) = match self.msg {
            Abort { payload, .. } => (3, Some(payload)),
            Error { payload, .. } => (5, Some(payload)),
            Publish { payload, .. } | Event { payload, .. } | Call { payload, .. } | Invocation { payload, .. } => {
                (4, Some(payload))
            }
            Result { payload, .. } | Yield { payload, .. } => (3, Some(payload)),
            Unsubscribed { .. } | Unregistered { .. } => (2, None),
            Subscribe { .. } | Register { .. } => (4, None),
            _ => (3, None),
        };
        let len = fixed + payload.map_or(0, payload_len);
        let mut seq = s.serialize_seq(Some(len))?;
        seq.serialize_element(&self.msg.code())?;
        match self.msg {
            Hello { realm, details } => {
                seq.serialize_element(realm)?;
                seq.serialize_element(&d(details))?;
            }
            Welcome { session, details } => {
                seq.serialize_element(session)?;
                seq.serialize_element(&d(details))?;
            }
            Abort { details, reason, .. } | Goodbye { details, reason } => {
                seq.serialize_element(&d(details))?;
                seq.serialize_element(reason)?;
            }
            Challenge { method: text, extra } | Authenticate { signature: text, extra } => {
                seq.serialize_element(text)?;
                seq.serialize_element(&d(extra))?;
            }
            Error { request_type, request, details, error, .. } => {
                seq.serialize_element(request_type)?;
                seq.serialize_element(request)?;
                seq.serialize_element(&d(details))?;
                seq.serialize_element(error)?;
            }
            Publish { request, options, topic: uri, .. }
            | Subscribe { request, options, topic: uri }
            | Call { request, options, procedure: uri, .. }
            | Register { request, options, procedure: uri } => {
                seq.serialize_element(request)?;
                seq.serialize_element(&d(options))?;
                seq.serialize_element(uri)?;
            }
            Published { request, publication: id }
            | Subscribed { request, subscription: id }
            | Unsubscribe { request, subscription: id }
            | Registered { request, registration: id }
            | Unregister { request, registration: id } => {
                seq.serialize_element(request)?;
                seq.serialize_element(id)?;
            }
            Unsubscribed { request } | Unregistered { request } => seq.serialize_element(request)?,
            Event { subscription: first, publication: second, details, .. }
            | Invocation { request: first, registration: second, details, .. } => {
                seq.serialize_element(first)?;
                seq.serialize_element(second)?;
                seq.serialize_element(&d(details))?;
            }
            Cancel { request, options: dict }
            | Interrupt { request, options: dict }
            | Result { request, details: dict, .. }
            | Yield { request, options: dict, .. } => {
                seq.serialize_element(request)?;
                seq.serialize_element(&d(dict))?;
            }
        }
        if let Some(p) = payload {
            if payload_len(p) > 0 {
                seq.serialize_element(&WireList(&p.args, b))?;
            }
            if payload_len(p) > 1 {
                seq.serialize_element(&d(&p.kwargs))?;
            }
        }
        seq.end()
    }
}

/// A value as a serializer should see it: with `binary` set, JSON-convention binary strings
/// become native binary.
struct Wire<'a>(&'a Value, bool);
struct WireList<'a>(&'a [Value], bool);
struct WireDict<'a>(&'a Dict, bool);

impl Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::String(text) if self.1 => match json_to_binary(text) {
                Some(bytes) => s.serialize_bytes(&bytes),
                None => s.serialize_str(text),
            },
            Value::Array(items) => WireList(items, self.1).serialize(s),
            Value::Object(dict) => WireDict(dict, self.1).serialize(s),
            other => other.serialize(s),
        }
    }
}

impl Serialize for WireList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for v in self.0 {
            seq.serialize_element(&Wire(v, self.1))?;
        }
        seq.end()
    }
}

impl Serialize for WireDict<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, &Wire(v, self.1))?;
        }
        map.end()
    }
}

/// A value read from MessagePack or CBOR: binary becomes a JSON-convention string, map keys
/// must be strings, floats must be finite.
struct WireValue(Value);

/// Capacity to reserve for a container that claims `hint` elements: never trust a length
/// prefix from the network with a large allocation.
fn cautious(hint: Option<usize>) -> usize {
    hint.unwrap_or(0).min(256)
}

impl<'de> Deserialize<'de> for WireValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WireVisitor).map(WireValue)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a WAMP value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("non-finite float"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::String(binary_to_json(v)))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(WireVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(cautious(seq.size_hint()));
        while let Some(WireValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut dict = Dict::new();
        while let Some(key) = map.next_key::<String>()? {
            let WireValue(v) = map.next_value()?;
            dict.insert(key, v);
        }
        Ok(Value::Object(dict))
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;

//! Bounds on the free-form JSON a body may carry (`extra`, `parameters`, `grants`).
//!
//! Such a field is stored with its object (a call's parameters with its request, kept for
//! 30 days) and parsed again at every read: one of megabytes, held by a thousand boards or
//! requests, made one list page cost gigabytes (a small text such as `[0,0,…]` parses into
//! about 30 times its size). So each is bounded twice, by its serialized size and by the
//! number of values in it, and a body over either is refused with 400 naming the field.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The most a free-form JSON field may hold.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Serialized, compact.
    pub bytes: usize,
    /// Values in the tree, containers included.
    pub values: usize,
}

/// An object's metadata (`extra`), a plugin's default `parameters` or `grants`.
pub const SMALL: Bound = Bound { bytes: 16 * 1024, values: 256 };
/// A call's `parameters`: they travel to the board in one WAMP message.
pub const CALL: Bound = Bound { bytes: 64 * 1024, values: 4096 };
/// A board's `type`, a location's value, a fleet's description: text shown in lists.
pub const MAX_TEXT_BYTES: usize = 1024;

/// Whether `v` stays within `bound`; the error says how it does not.
pub fn check(v: &Value, bound: Bound) -> Result<(), String> {
    if count_values(v, bound.values + 1) > bound.values {
        return Err(format!("holds more than {} values", bound.values));
    }
    let size = s4t_shared::wamp::message::json_len(v);
    if size > bound.bytes {
        return Err(format!("takes {size} bytes as JSON, more than {}", bound.bytes));
    }
    Ok(())
}

/// Checks a text field's length.
pub fn check_text(text: &str, what: &str) -> Result<(), crate::Error> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(crate::Error::Invalid(format!("{what} takes {} bytes, more than {MAX_TEXT_BYTES}", text.len())));
    }
    Ok(())
}

/// `deserialize_with` for an optional field within [`SMALL`] (with `#[serde(default)]`).
pub fn small<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    bounded(d, SMALL)
}

/// `deserialize_with` for a call's optional `parameters`, within [`CALL`].
pub fn call<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    bounded(d, CALL)
}

fn bounded<'de, D: Deserializer<'de>>(d: D, bound: Bound) -> Result<Option<Value>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    if let Some(v) = &v {
        check(v, bound).map_err(serde::de::Error::custom)?;
    }
    Ok(v)
}

/// Values in `v`, counting no further than `cap` (an iterative walk: no recursion to blow).
fn count_values(v: &Value, cap: usize) -> usize {
    let mut stack = vec![v];
    let mut n = 0;
    while let Some(v) = stack.pop() {
        n += 1;
        if n >= cap {
            break;
        }
        match v {
            Value::Array(a) => stack.extend(a),
            Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bounds_count_values_and_bytes() {
        let tight = Bound { bytes: 20, values: 4 };
        assert!(check(&json!({"a": [1, 2]}), tight).is_ok()); // 4 values, 13 bytes
        assert!(check(&json!({"a": [1, 2, 3]}), tight).unwrap_err().contains("more than 4 values"));
        assert!(check(&json!({"a": "x".repeat(20)}), tight).unwrap_err().contains("more than 20"));
        // A long flat array stops counting at the cap.
        assert_eq!(count_values(&json!(vec![0; 10_000]), 5), 5);
    }
}

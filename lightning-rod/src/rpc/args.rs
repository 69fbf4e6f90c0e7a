//! Typed access to a procedure's JSON arguments. Every failure names the procedure's argument
//! so the ERROR reply tells the caller what to fix.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Longest string argument we accept (line names, service names, package names).
pub const MAX_STR: usize = 256;

/// The parameters dict at position `index` of the arguments after `req`.
pub struct Params<'a> {
    map: Option<&'a Map<String, Value>>,
    what: &'static str,
}

impl<'a> Params<'a> {
    /// The dict at `args[index]`; `required` makes its absence an error, otherwise it reads as
    /// empty (`{}`).
    pub fn at(args: &'a [Value], index: usize, what: &'static str, required: bool) -> Result<Params<'a>> {
        match args.get(index) {
            Some(Value::Object(m)) => Ok(Params { map: Some(m), what }),
            None | Some(Value::Null) if !required => Ok(Params { map: None, what }),
            Some(other) => Err(bad(format!("{what} must be a JSON object, got {}", kind(other)))),
            None => Err(bad(format!("{what} is missing"))),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?.ok_or_else(|| bad(format!("{}.{key} is missing", self.what)))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_STR => Ok(Some(s)),
            Some(Value::String(_)) => Err(bad(format!("{}.{key} must be 1..={MAX_STR} characters", self.what))),
            Some(v) => Err(bad(format!("{}.{key} must be a string, got {}", self.what, kind(v)))),
        }
    }

    /// An integer in `range`; strings such as `"0x48"` or `"72"` are accepted too (REST paths
    /// carry addresses as text).
    pub fn int(&self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64> {
        self.opt_int(key, range)?.ok_or_else(|| bad(format!("{}.{key} is missing", self.what)))
    }

    pub fn opt_int(&self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => parse_int(s),
            _ => None,
        };
        match n {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(bad(format!(
                "{}.{key} must be an integer in {}..={}, got {v}",
                self.what,
                range.start(),
                range.end()
            ))),
        }
    }

    /// One of `choices`.
    pub fn choice(&self, key: &str, choices: &[&'static str]) -> Result<Option<&'static str>> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) => choices
                .iter()
                .find(|c| **c == s)
                .copied()
                .map(Some)
                .ok_or_else(|| bad(format!("{}.{key} must be one of {choices:?}, got {s:?}", self.what))),
        }
    }

    /// A list of bytes, 1..=max long.
    pub fn bytes(&self, key: &str, max: usize) -> Result<Vec<u8>> {
        let Some(Value::Array(items)) = self.get(key) else {
            return Err(bad(format!("{}.{key} must be a list of bytes", self.what)));
        };
        if items.is_empty() || items.len() > max {
            return Err(bad(format!("{}.{key} must hold 1..={max} bytes, got {}", self.what, items.len())));
        }
        items
            .iter()
            .map(|b| {
                b.as_u64()
                    .filter(|n| *n <= 255)
                    .map(|n| n as u8)
                    .ok_or_else(|| bad(format!("{}.{key}: {b} is not a byte (0..=255)", self.what)))
            })
            .collect()
    }
}

fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub fn bad(msg: String) -> Error {
    Error::BadArgument(msg)
}

//! [`Secret`]: a string that never reaches `Debug`, `Display` or a log line.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A board secret, registration code or tunnel token. `Debug` and `Display` print `***`; the
/// value is only reachable through [`Secret::expose`], so every use is visible in review.
/// It serializes as the plain string: only the state store (mode 0600) and the wire see it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-board-secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            token: Secret,
            other: Option<Secret>,
        }
        let h = Holder { token: s.clone(), other: Some(s.clone()) };
        assert!(!format!("{h:?} {h:#?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-board-secret");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2-board-secret\"");
    }
}

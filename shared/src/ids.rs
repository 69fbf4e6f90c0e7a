//! Identifiers and the validation rules for names that travel on the wire.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A board's identity: the UUID the cloud assigned when the board was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoardId(pub Uuid);

impl BoardId {
    pub fn new() -> Self {
        BoardId(Uuid::new_v4())
    }
}

impl Default for BoardId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BoardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::str::FromStr for BoardId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(BoardId)
    }
}

/// True when `s` parses as a UUID. The original API refuses board names that look like one,
/// because `{ident}` in a path may be either.
pub fn looks_like_uuid(s: &str) -> bool {
    Uuid::parse_str(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_id_round_trips_through_text() {
        let id = BoardId::new();
        let parsed: BoardId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
        assert!(looks_like_uuid(&id.to_string()));
        assert!(!looks_like_uuid("board-a"));
    }
}

//! URI rules and size limits applied to every decoded message.
//!
//! WAMP's "loose" URI rule is used, not the "strict" one: Stack4Things board procedures are
//! named `iotronic.<session>.<board uuid>.<Method>`, with hyphens and capitals.

/// The longest URI accepted (procedure, topic, error, realm, reason).
pub const MAX_URI_LEN: usize = 512;

/// True when `uri` is a valid WAMP URI under the loose rule: one or more `.`-separated
/// components, none empty, none containing whitespace or `#`, at most [`MAX_URI_LEN`] bytes.
pub fn valid_uri(uri: &str) -> bool {
    !uri.is_empty()
        && uri.len() <= MAX_URI_LEN
        && uri.split('.').all(|c| !c.is_empty() && !c.chars().any(|ch| ch == '#' || ch.is_whitespace()))
}

/// Characters of a peer's input echoed back in an error reason (and so in logs).
pub const ECHO_CHARS: usize = 64;

/// `input` as an error reason may quote it: escaped and quoted as `{:?}` does, cut after
/// [`ECHO_CHARS`] characters (never inside one) with the full length appended, so that a
/// peer's megabyte of input comes back (and is logged) as about a hundred bytes.
pub fn excerpt(input: &str) -> String {
    let mut escaped = input.escape_debug();
    let mut out = String::with_capacity(ECHO_CHARS + 24);
    out.push('"');
    out.extend(escaped.by_ref().take(ECHO_CHARS));
    out.push('"');
    if escaped.next().is_some() {
        out.push_str(&format!("... ({} bytes)", input.len()));
    }
    out
}

/// True when `uri` names something only the router itself may define (`wamp.*`).
pub fn reserved_uri(uri: &str) -> bool {
    uri == "wamp" || uri.starts_with("wamp.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_uris() {
        for ok in [
            "stack4things.register",
            "agent.stack4things.connection",
            "iotronic.12345.0b8a6f0e-2c3d-4e5f-8a9b-0c1d2e3f4a5b.DevicePing",
            "a",
            "wamp.session.list",
        ] {
            assert!(valid_uri(ok), "{ok} should be valid");
        }
        for bad in ["", ".", "a..b", ".a", "a.", "a b", "a.b#c", "a.\tb", &"x".repeat(MAX_URI_LEN + 1)] {
            assert!(!valid_uri(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn excerpts_are_short_and_cut_between_characters() {
        assert_eq!(excerpt("a b"), r#""a b""#);
        assert_eq!(excerpt(&"x".repeat(ECHO_CHARS)), format!("\"{}\"", "x".repeat(ECHO_CHARS)));
        let long = excerpt(&"x".repeat(1 << 20));
        assert_eq!(long, format!("\"{}\"... (1048576 bytes)", "x".repeat(ECHO_CHARS)));
        // Multi-byte characters straddling the cut, and escapes, are never split.
        for input in ["é".repeat(600), "\u{1F600}".repeat(600), "\n".repeat(600), format!("x{}", "€".repeat(600))] {
            let e = excerpt(&input);
            assert!(e.len() < 300, "{} bytes", e.len());
            assert!(e.ends_with(&format!("... ({} bytes)", input.len())), "{e}");
        }
    }

    #[test]
    fn reserved() {
        assert!(reserved_uri("wamp.session.list"));
        assert!(reserved_uri("wamp"));
        assert!(!reserved_uri("wampish.x"));
        assert!(!reserved_uri("iotronic.wamp"));
    }
}

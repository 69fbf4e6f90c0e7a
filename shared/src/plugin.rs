//! Plugins on the wire: the kinds of plugin, the hardware a plugin is granted, and the pickle
//! protocol-0 text in which the original Stack4Things ships Python source (S4T-REFERENCE §6.2,
//! §11.6). The plugin dict of `PluginInject` is `{uuid, name, code, callable, parameters}` as
//! in the original, plus our `kind` (absent: `python`, the original format) and `grants`.

use serde::{Deserialize, Serialize};

/// What a plugin's `code` holds and how a board runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// A WebAssembly module (base64 in `code`), run sandboxed inside the agent. The default.
    Wasm,
    /// An executable or script (base64 in `code`), run as an unprivileged user; opt-in per board.
    Process,
    /// The original format: pickle-0 text of Python source defining `Worker`; opt-in per board.
    Python,
}

impl PluginKind {
    pub const ALL: [PluginKind; 3] = [PluginKind::Wasm, PluginKind::Process, PluginKind::Python];

    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Wasm => "wasm",
            PluginKind::Process => "process",
            PluginKind::Python => "python",
        }
    }

    pub fn parse(s: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The host functions a WebAssembly plugin may import, all from module [`HOST_MODULE`] (their
/// signatures are in the board's `plugins::wasm::ABI`). The cloud refuses a module importing
/// anything else when it is uploaded, the board when it is injected.
pub const HOST_FUNCTIONS: &[&str] = &[
    "log",
    "sleep_ms",
    "now_ms",
    "params_len",
    "params_read",
    "set_result",
    "publish",
    "gpio_read",
    "gpio_write",
    "i2c_read",
    "i2c_write",
    "last_error",
];

pub const HOST_MODULE: &str = "s4t";

/// The largest plugin code the cloud accepts, decoded. Base64 and the call's JSON around it
/// then stay under the 1 MiB WAMP message limit of the boards.
pub const MAX_CODE_BYTES: usize = 512 * 1024;

/// The first 8 bytes of a WebAssembly 1.0 binary module.
pub const WASM_MAGIC: [u8; 8] = [0, b'a', b's', b'm', 1, 0, 0, 0];

/// Whether `bytes` starts like a WebAssembly binary module.
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.starts_with(&WASM_MAGIC)
}

/// An I2C device a plugin may address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cGrant {
    pub bus: u32,
    pub address: u16,
}

/// The hardware a plugin may touch: GPIO lines by name and I2C devices. Everything else is
/// refused by the board's host functions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub gpio: Vec<String>,
    #[serde(default)]
    pub i2c: Vec<I2cGrant>,
}

impl Grants {
    pub fn is_empty(&self) -> bool {
        self.gpio.is_empty() && self.i2c.is_empty()
    }

    pub fn allows_gpio(&self, line: &str) -> bool {
        self.gpio.iter().any(|l| l == line)
    }

    pub fn allows_i2c(&self, bus: u32, address: u16) -> bool {
        self.i2c.iter().any(|g| g.bus == bus && g.address == address)
    }

    /// `Err` naming the first line or device of `self` that `cap` does not allow.
    pub fn within(&self, cap: &Grants) -> Result<(), String> {
        if let Some(line) = self.gpio.iter().find(|l| !cap.allows_gpio(l)) {
            return Err(format!("GPIO line {line}"));
        }
        if let Some(g) = self.i2c.iter().find(|g| !cap.allows_i2c(g.bus, g.address)) {
            return Err(format!("I2C device {:#04x} on bus {}", g.address, g.bus));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error("not a protocol-0 pickle of a string (expected it to start with 'V')")]
    NotAString,
    #[error("the pickled string has no end of line")]
    Unterminated,
    #[error("bad escape at character {0}: \\u needs 4 and \\U 8 hex digits of a valid code point")]
    BadEscape(usize),
    #[error("unexpected opcodes after the string (only an optional memo put and '.' may follow)")]
    Trailer,
}

/// Pickles `source` as Python 3's `pickle.dumps(source, 0)` does (`V<raw-unicode-escape>\np0\n.`),
/// except that characters U+0080 to U+00FF are escaped too, so the text is plain ASCII (the
/// original's `.decode()` fails on them, S4T-REFERENCE §9.10) and loads to the same string.
pub fn pickle0_encode(source: &str) -> String {
    let mut out = String::with_capacity(source.len() + 8);
    out.push('V');
    for c in source.chars() {
        match c {
            '\\' | '\0' | '\n' | '\r' | '\u{1a}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x80 => out.push(c),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push_str("\np0\n.");
    out
}

/// Unpickles what [`pickle0_encode`] and the original cloud produce: the string of a `V` opcode
/// decoded as `raw-unicode-escape` (bytes are Latin-1 characters; `\uXXXX` and `\UXXXXXXXX`
/// escapes when preceded by an odd number of backslashes), then an optional `p<n>` memo put and
/// the `.` stop. Anything else is refused: the board never runs a general unpickler.
pub fn pickle0_decode(text: &str) -> Result<String, PickleError> {
    let body = text.strip_prefix('V').ok_or(PickleError::NotAString)?;
    let (line, rest) = body.split_once('\n').ok_or(PickleError::Unterminated)?;
    check_trailer(rest)?;
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(char::from(bytes[i]));
            i += 1;
            continue;
        }
        let run_start = i;
        while i < bytes.len() && bytes[i] == b'\\' {
            i += 1;
        }
        let run = i - run_start;
        let escape = run % 2 == 1 && i < bytes.len() && (bytes[i] == b'u' || bytes[i] == b'U');
        let literal = if escape { run - 1 } else { run };
        out.extend(std::iter::repeat_n('\\', literal));
        if escape {
            let digits = if bytes[i] == b'u' { 4 } else { 8 };
            let hex = bytes.get(i + 1..i + 1 + digits).ok_or(PickleError::BadEscape(i))?;
            let code = std::str::from_utf8(hex)
                .ok()
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
                .ok_or(PickleError::BadEscape(i))?;
            out.push(code);
            i += 1 + digits;
        }
    }
    Ok(out)
}

fn check_trailer(rest: &str) -> Result<(), PickleError> {
    let rest = match rest.strip_prefix('p') {
        Some(memo) => {
            let (n, after) = memo.split_once('\n').ok_or(PickleError::Trailer)?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(PickleError::Trailer);
            }
            after
        }
        None => rest,
    };
    if rest.trim_end() == "." { Ok(()) } else { Err(PickleError::Trailer) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_python_source() {
        let src = "from x import y\nclass Worker:\n    s = 'a\\\\b\\n'  # ü €  🦀\r\n\0\u{1a}";
        let p = pickle0_encode(src);
        assert!(p.is_ascii(), "{p}");
        assert_eq!(pickle0_decode(&p).unwrap(), src);
    }

    #[test]
    fn decodes_what_python_writes() {
        // pickle.dumps("a\\b\nc\u20ac", 0).decode()
        assert_eq!(pickle0_decode("Va\\u005cb\\u000ac\\u20ac\np0\n.").unwrap(), "a\\b\nc\u{20ac}");
        // An even run of backslashes before u is literal; without memo put.
        assert_eq!(pickle0_decode("V\\\\u0041\n.").unwrap(), "\\\\u0041");
        assert_eq!(pickle0_decode("V\\\\\\u0041\n.").unwrap(), "\\\\A");
    }

    #[test]
    fn refuses_anything_else() {
        for (text, err) in [
            ("cos\nsystem\n(S'id'\ntR.", PickleError::NotAString),
            ("Vabc", PickleError::Unterminated),
            ("Vabc\np0\n(S'x'\n.", PickleError::Trailer),
            ("Vabc\npx\n.", PickleError::Trailer),
            ("Va\\u12\np0\n.", PickleError::BadEscape(2)),
            ("Va\\Uffffffff\n.", PickleError::BadEscape(2)),
            ("Va\\ud800\n.", PickleError::BadEscape(2)),
        ] {
            assert_eq!(pickle0_decode(text), Err(err), "{text}");
        }
    }

    #[test]
    fn grants_within_a_cap() {
        let cap = Grants { gpio: vec!["GPIO17".into()], i2c: vec![I2cGrant { bus: 1, address: 0x48 }] };
        assert_eq!(cap.within(&cap), Ok(()));
        assert_eq!(Grants::default().within(&cap), Ok(()));
        let more = Grants { gpio: vec!["GPIO17".into(), "GPIO4".into()], i2c: vec![] };
        assert_eq!(more.within(&cap), Err("GPIO line GPIO4".into()));
        let dev = Grants { gpio: vec![], i2c: vec![I2cGrant { bus: 0, address: 0x48 }] };
        assert_eq!(dev.within(&cap), Err("I2C device 0x48 on bus 0".into()));
        let g: Grants = serde_json::from_str(r#"{"gpio":["GPIO17"],"i2c":[{"bus":1,"address":72}]}"#).unwrap();
        assert_eq!(g, cap);
        assert!(serde_json::from_str::<Grants>(r#"{"pins":[]}"#).is_err());
    }
}

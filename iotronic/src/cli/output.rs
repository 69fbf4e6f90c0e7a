//! How results are printed: aligned tables for people, `--json` for scripts, `--quiet` for
//! identifiers only; progress (on stderr, only on a terminal) while waiting on boards.
//!
//! Text from the cloud and from boards (names, versions, messages, the audit log's user names,
//! which anyone who tries to log in chooses) reaches the user's terminal only through
//! [`safe_line`]/[`safe_text`] or [`json_text`], so it cannot carry escape sequences to it.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde_json::Value;

/// The printing choices of one run.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
    pub quiet: bool,
    /// stderr is a terminal: progress may be drawn there.
    pub progress_tty: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Self {
        Out { json, quiet, progress_tty: std::io::stderr().is_terminal() }
    }

    /// Prints `v` as pretty JSON.
    pub fn json(&self, v: &Value) {
        println!("{}", json_text(v, true));
    }

    /// A line for people (not in `--json` or `--quiet` mode).
    pub fn say(&self, text: impl AsRef<str>) {
        if !self.json && !self.quiet {
            println!("{}", safe_text(text.as_ref()));
        }
    }

    /// Prints a result: JSON as is, or else `human()`; nothing in `--quiet` mode but `id`.
    pub fn result(&self, v: &Value, id: Option<&str>, human: impl FnOnce()) {
        if self.json {
            self.json(v);
        } else if self.quiet {
            if let Some(id) = id {
                println!("{}", safe_line(id));
            }
        } else {
            human();
        }
    }

    /// A table of `rows` under `headers` (JSON and quiet modes print elsewhere).
    pub fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        print!("{}", render_table(headers, rows));
    }

    /// A spinner with `message` on stderr while the returned guard lives (tty only).
    pub fn progress(&self, message: impl Into<String>) -> Progress {
        if !self.progress_tty || self.quiet || self.json {
            return Progress(None);
        }
        let message = message.into();
        let task = tokio::spawn(async move {
            // Quick answers draw nothing.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let frames = ['|', '/', '-', '\\'];
            let started = tokio::time::Instant::now();
            for i in 0usize.. {
                let secs = started.elapsed().as_secs() + 1;
                eprint!("\r\x1b[2K{} {message} ({secs} s)", frames[i % frames.len()]);
                let _ = std::io::stderr().flush();
                tokio::time::sleep(Duration::from_millis(120)).await;
            }
        });
        Progress(Some(task))
    }
}

/// Stops and erases the spinner when dropped.
pub struct Progress(Option<tokio::task::JoinHandle<()>>);

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }
}

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
/// Cells are made [`safe_line`]s here, whatever built them.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| safe_line(c)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            if i + 1 == widths.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `FIELD  VALUE` lines for one object, in the given order, skipping absent fields.
pub fn kv_rows(v: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    fields.iter().filter_map(|f| v.get(*f).filter(|x| !x.is_null()).map(|x| vec![f.to_string(), cell(x)])).collect()
}

/// A JSON value as a table cell: strings bare, null empty, the rest as compact JSON; a
/// [`safe_line`] either way.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => safe_line(s),
        Value::Array(a) if a.iter().all(|x| x.is_string() || x.is_number()) => {
            a.iter().map(cell).collect::<Vec<_>>().join(",")
        }
        other => safe_line(&other.to_string()),
    }
}

/// `s` for one line of a terminal: every control character (C0 including newline and tab, DEL,
/// C1) written as a visible `\u{1b}`. A terminal obeys ESC and CSI (U+009B) sequences in what
/// it prints, and the text comes from the cloud, boards, or whoever typed a user name at the
/// login: unescaped, it could rewrite what the user sees, retitle the window or worse.
pub fn safe_line(s: &str) -> String {
    escape_controls(s, false)
}

/// [`safe_line`] for text meant to span lines (a board's message, an error): keeps `\n` and
/// `\t`, escapes the other controls (`\r` too, which would let a line overwrite itself).
pub fn safe_text(s: &str) -> String {
    escape_controls(s, true)
}

fn escape_controls(s: &str, keep_lines: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && !(keep_lines && matches!(c, '\n' | '\t')) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `v` as JSON text (`pretty` or one line) with DEL and the C1 controls escaped too: serde_json
/// escapes only C0, and `--json` output is read on terminals as well as by programs. Outside its
/// strings JSON text is ASCII, so every such character is in a string, where `\u00XX` means the
/// same character: the document is unchanged for a parser.
pub fn json_text(v: &Value, pretty: bool) -> String {
    let text = if pretty { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) };
    let text = text.unwrap_or_else(|_| v.to_string());
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// The cell of `v[key]`.
pub fn field(v: &Value, key: &str) -> String {
    v.get(key).map(cell).unwrap_or_default()
}

/// A time field (epoch seconds) as `YYYY-MM-DD HH:MM UTC`.
pub fn time_field(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_i64).map(fmt_time).unwrap_or_default()
}

/// Epoch seconds as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian, days-from-civil inverse).
pub fn fmt_time(epoch_s: i64) -> String {
    let days = epoch_s.div_euclid(86_400);
    let secs = epoch_s.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_format_in_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(fmt_time(1_900_000_000), "2030-03-17 17:46 UTC");
        assert_eq!(fmt_time(-86_400), "1969-12-31 00:00 UTC");
    }

    #[test]
    fn tables_align() {
        let t = render_table(
            &["NAME", "STATUS"],
            &[vec!["pi1".into(), "online".into()], vec!["board-two".into(), "offline".into()]],
        );
        assert_eq!(t, "NAME       STATUS\npi1        online\nboard-two  offline\n");
    }

    #[test]
    fn cells_read_naturally() {
        assert_eq!(cell(&json!(null)), "");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!([1, 2])), "1,2");
        assert_eq!(cell(&json!({"a": 1})), "{\"a\":1}");
        assert_eq!(kv_rows(&json!({"a": 1, "b": null}), &["a", "b", "c"]), vec![vec!["a".to_string(), "1".into()]]);
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let evil = "a\u{1b}]0;pwned\u{7}b\u{9b}2Jc\u{7f}\r\n\td\u{85}é";
        assert_eq!(safe_line(evil), "a\\u{1b}]0;pwned\\u{7}b\\u{9b}2Jc\\u{7f}\\u{d}\\u{a}\\u{9}d\\u{85}é");
        assert_eq!(safe_text(evil), "a\\u{1b}]0;pwned\\u{7}b\\u{9b}2Jc\\u{7f}\\u{d}\n\td\\u{85}é");
        assert_eq!(safe_line("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(safe_line(&safe_line(evil)), safe_line(evil), "escaping twice changes nothing");
    }

    #[test]
    fn table_cells_carry_no_control_characters() {
        let board =
            json!({"name": "pi\u{1b}[2J", "lr_version": "1.0\u{9b}31m", "tags": ["x\u{1b}"], "o": {"k": "\u{9b}"}});
        assert_eq!(field(&board, "name"), "pi\\u{1b}[2J");
        assert_eq!(field(&board, "tags"), "x\\u{1b}");
        assert_eq!(field(&board, "o"), "{\"k\":\"\\u{9b}\"}");
        let t = render_table(&["NAME", "VERSION"], &[vec!["pi\u{1b}[2J".into(), field(&board, "lr_version")]]);
        assert!(!t.contains(['\u{1b}', '\u{9b}']), "{t:?}");
        assert_eq!(t, "NAME         VERSION\npi\\u{1b}[2J  1.0\\u{9b}31m\n");
    }

    #[test]
    fn json_output_escapes_c1_and_del_too() {
        let v = json!({"user_name": "a\u{1b}b\u{9b}c\u{7f}d\u{85}", "n": 1});
        for pretty in [false, true] {
            let text = json_text(&v, pretty);
            assert!(!text.contains(|c: char| c.is_control() && c != '\n'), "{text:?}");
            assert!(text.contains("a\\u001bb\\u009bc\\u007fd\\u0085"), "{text}");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v, "the same document for a parser");
        }
    }
}

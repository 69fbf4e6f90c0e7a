//! How results are printed: aligned tables for people, `--json` for scripts, `--quiet` for
//! identifiers only; progress (on stderr, only on a terminal) while waiting on boards.

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
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
    }

    /// A line for people (not in `--json` or `--quiet` mode).
    pub fn say(&self, text: impl AsRef<str>) {
        if !self.json && !self.quiet {
            println!("{}", text.as_ref());
        }
    }

    /// Prints a result: JSON as is, or else `human()`; nothing in `--quiet` mode but `id`.
    pub fn result(&self, v: &Value, id: Option<&str>, human: impl FnOnce()) {
        if self.json {
            self.json(v);
        } else if self.quiet {
            if let Some(id) = id {
                println!("{id}");
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
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
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

/// A JSON value as a table cell: strings bare, null empty, the rest as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.iter().all(|x| x.is_string() || x.is_number()) => {
            a.iter().map(cell).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
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
}

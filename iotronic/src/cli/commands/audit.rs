//! `s4t audit`: the audit log (administrators: every project; managers: their own), newest
//! first, with the filters `GET /v1/audit` takes.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;

use super::{items, parse_duration};
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::Result;
use crate::cli::output::{field, fmt_time};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  s4t audit --since 1h\n  s4t audit --action tunnel. --limit 20\n  \
                        s4t audit --limit 100 --after ID_OF_THE_LAST_ENTRY_SHOWN\n  \
                        s4t audit --project alpha --json")]
pub struct AuditArgs {
    /// Only entries of the last DURATION (90s, 15m, 2h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<u64>,
    /// Only entries older than DURATION.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    before: Option<u64>,
    /// Only actions starting with this, e.g. `tunnel.`, `auth.login`, `POST /v1/boards`.
    #[arg(long)]
    action: Option<String>,
    /// Only this project's entries (administrators; managers always see their own project).
    #[arg(long)]
    project: Option<String>,
    /// Only entries older than the entry with this id (the last of a previous page).
    #[arg(long, value_name = "ID")]
    after: Option<String>,
    /// At most this many entries (the cloud caps it at 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
}

impl AuditArgs {
    /// The query string of `GET /v1/audit`, times relative to `now` (Unix seconds).
    fn query(&self, now: u64) -> String {
        let mut q = vec![format!("limit={}", self.limit)];
        if let Some(s) = self.since {
            q.push(format!("since={}", now.saturating_sub(s)));
        }
        if let Some(b) = self.before {
            q.push(format!("before={}", now.saturating_sub(b)));
        }
        if let Some(a) = &self.action {
            q.push(format!("action={}", seg(a)));
        }
        if let Some(p) = &self.project {
            q.push(format!("project={}", seg(p)));
        }
        if let Some(m) = &self.after {
            q.push(format!("marker={}", seg(m)));
        }
        format!("?{}", q.join("&"))
    }
}

pub async fn run(ctx: &Ctx, a: AuditArgs) -> Result<()> {
    let client = ctx.client()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let v = client.get(&format!("/v1/audit{}", a.query(now))).await?;
    if ctx.out.json {
        ctx.out.json(&v);
    } else if ctx.out.quiet {
        items(&v, "audit").iter().for_each(|e| println!("{}", field(e, "id")));
    } else {
        let rows: Vec<Vec<String>> = items(&v, "audit")
            .iter()
            .map(|e| {
                let at = e.get("at").and_then(serde_json::Value::as_f64).map(|t| fmt_time(t as i64));
                let who = field(e, "user_name");
                vec![
                    at.unwrap_or_default(),
                    if who.is_empty() { "-".into() } else { who },
                    field(e, "action"),
                    field(e, "target"),
                    field(e, "source"),
                    field(e, "status"),
                    field(e, "detail"),
                ]
            })
            .collect();
        ctx.out.table(&["AT", "WHO", "ACTION", "TARGET", "SOURCE", "STATUS", "DETAIL"], &rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_the_query() {
        let a = AuditArgs { since: None, before: None, action: None, project: None, after: None, limit: 100 };
        assert_eq!(a.query(1_000), "?limit=100");
        let a = AuditArgs {
            since: Some(3600),
            before: Some(60),
            action: Some("POST /v1/boards".into()),
            project: Some("alpha".into()),
            after: Some("e1".into()),
            limit: 5,
        };
        assert_eq!(
            a.query(10_000),
            "?limit=5&since=6400&before=9940&action=POST%20%2Fv1%2Fboards&project=alpha&marker=e1"
        );
    }
}

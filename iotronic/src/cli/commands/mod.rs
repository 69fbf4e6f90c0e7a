//! One file per noun. Shared here: durations, `key=value` parameters, and board calls (the
//! `--queue`/`--async` flags, 202 answers, and errors that say why a board did not answer).

pub mod audit;
pub mod auth;
pub mod boards;
pub mod completions;
pub mod fleets;
pub mod leases;
pub mod pins;
pub mod plugins;
pub mod requests;
pub mod services;
pub mod ssh;
pub mod vpns;

use clap::Args;
use reqwest::Method;
use serde_json::{Map, Value};

use super::Ctx;
use super::client::{Client, seg};
use super::error::{Failure, Kind, Result};
use super::output::{cell, field, safe_line, safe_text, time_field};

/// `90`, `90s`, `15m`, `2h`, `7d` → seconds.
pub fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration: use e.g. 90s, 15m, 2h, 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(|| format!("{s:?} is not a positive duration"))
}

/// `key=value` pairs into a JSON object; values that parse as JSON (numbers, true, lists)
/// keep their type, anything else is a string.
pub fn params_object(pairs: &[String], json_text: Option<&str>) -> Result<Value> {
    let mut map = match json_text {
        Some(t) => match serde_json::from_str::<Value>(t) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(Failure::usage("--params must be a JSON object, e.g. '{\"say\":\"hi\"}'")),
            Err(e) => return Err(Failure::usage(format!("--params is not JSON: {e}"))),
        },
        None => Map::new(),
    };
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Failure::usage(format!("parameter {p:?} is not key=value")))?;
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        map.insert(k.to_owned(), value);
    }
    Ok(Value::Object(map))
}

/// How a board command behaves when the board is offline or slow.
#[derive(Args, Debug, Clone, Default)]
pub struct CallFlags {
    /// If the board is offline, queue the command until it logs in (up to 1 h by default).
    #[arg(long)]
    pub queue: bool,
    /// How long a queued command may wait for the board, e.g. 30m, 2h (implies --queue).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub queue_ttl: Option<u64>,
    /// Return at once with the request's id instead of waiting for the board's answer.
    #[arg(long = "async")]
    pub asynchronous: bool,
}

impl CallFlags {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(t) = self.queue_ttl {
            q.push(format!("queue_ttl={t}"));
        } else if self.queue {
            q.push("queue=true".to_owned());
        }
        if self.asynchronous {
            q.push("async=true".to_owned());
        }
        if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) }
    }
}

/// What a board answered, or the request that is still under way.
pub enum Called {
    Done(Value),
    /// 202: queued, `--async`, or the board did not answer within the cloud's call timeout.
    Accepted(Value),
}

/// Calls a board through the REST `path` and words the failures for people.
pub async fn board_call(
    ctx: &Ctx,
    client: &Client,
    board: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
    flags: &CallFlags,
) -> Result<Called> {
    let path = format!("{path}{}", flags.query());
    let _spin = ctx.out.progress(format!("waiting for board {board}"));
    match client.call(method, &path, body).await {
        Ok(r) if r.status == 202 => Ok(Called::Accepted(r.body)),
        Ok(r) => Ok(Called::Done(r.body)),
        Err(f) if f.kind == Kind::Offline => Err(offline_failure(client, board, f).await),
        Err(f) => Err(f),
    }
}

/// "board pi1 is offline since 14:02 UTC; queue the command with --queue".
pub async fn offline_failure(client: &Client, board: &str, original: Failure) -> Failure {
    let Ok(b) = client.get(&format!("/v1/boards/{}", seg(board))).await else { return original };
    let name = field(&b, "name");
    match field(&b, "status").as_str() {
        "registered" => Failure::new(Kind::Offline, format!("board {name} has never logged in (it is waiting for enrollment)"))
            .with_hint("run `lightning-rod enroll --url ws://CLOUD:8181/ --code CODE` on the board, then `lightning-rod run`; or queue the command with --queue"),
        "online" => original,
        status => Failure::new(Kind::Offline, format!("board {name} is {status} since {}", time_field(&b, "updated_at")))
            .with_hint("queue the command with --queue (it runs when the board logs in), or check the board's lightning-rod"),
    }
}

/// Prints the outcome of a board call: the board's message, or what became of the request.
pub fn report(ctx: &Ctx, board: &str, called: Called, flags: &CallFlags) -> Result<()> {
    match called {
        Called::Done(v) => {
            ctx.out.result(&v, None, || print_message(&v));
            Ok(())
        }
        Called::Accepted(req) => {
            let id = field(&req, "uuid");
            let status = field(&req, "status");
            if status == "QUEUED" || flags.asynchronous {
                let what = if status == "QUEUED" {
                    format!("queued for board {board} until it logs in: request {id}")
                } else {
                    format!("sent to board {board}: request {id}")
                };
                ctx.out.result(&req, Some(&id), || {
                    println!("{what}\nfollow it with `s4t request show {id}`");
                });
                Ok(())
            } else {
                if ctx.out.json {
                    ctx.out.json(&req);
                }
                Err(Failure::new(
                    Kind::Timeout,
                    format!("board {board} has not answered yet; request {id} is {status}"),
                )
                .with_hint(format!("its result will be in `s4t request show {id}`")))
            }
        }
    }
}

/// A board's message for people: strings as they are (lines and all, other control characters
/// escaped: a board's text must not drive the terminal), objects as `key: value` lines.
pub fn print_message(v: &Value) {
    match v {
        Value::String(s) => println!("{}", safe_text(s)),
        Value::Object(m) => {
            let m: Vec<(String, String)> = m.iter().map(|(k, x)| (safe_line(k), cell(x))).collect();
            let width = m.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
            for (k, x) in m {
                println!("{k:<width$}  {x}");
            }
        }
        Value::Null => {}
        other => println!("{}", cell(other)),
    }
}

/// The rows of a collection answer, e.g. `{"boards":[…]}`.
pub fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        for bad in ["", "h", "2x", "0", "-1", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_keep_their_types() {
        let p = params_object(&["say=hi".into(), "delay=5".into(), "on=true".into()], None).unwrap();
        assert_eq!(p, json!({"say": "hi", "delay": 5, "on": true}));
        let p = params_object(&["b=2".into()], Some(r#"{"a":1,"b":1}"#)).unwrap();
        assert_eq!(p, json!({"a": 1, "b": 2}), "pairs override --params");
        assert!(params_object(&["novalue".into()], None).is_err());
        assert!(params_object(&[], Some("[1]")).is_err());
    }

    #[test]
    fn call_flags_become_the_query() {
        assert_eq!(CallFlags::default().query(), "");
        let f = CallFlags { queue: true, queue_ttl: None, asynchronous: true };
        assert_eq!(f.query(), "?queue=true&async=true");
        let f = CallFlags { queue: false, queue_ttl: Some(60), asynchronous: false };
        assert_eq!(f.query(), "?queue_ttl=60");
    }
}

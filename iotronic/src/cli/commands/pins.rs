//! `s4t gpio BOARD list|read|write|watch` and `s4t i2c BOARD read|write`.

use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{CallFlags, Called, board_call, items, parse_duration, print_message, report};
use crate::cli::Ctx;
use crate::cli::client::seg;
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, fmt_time, json_text};

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  s4t gpio pi1 list\n  s4t gpio pi1 write GPIO17 1\n  s4t gpio pi1 read GPIO17\n  s4t gpio pi1 watch GPIO4 GPIO5"
)]
pub struct GpioArgs {
    board: String,
    #[command(subcommand)]
    cmd: GpioCmd,
}

#[derive(Subcommand, Debug)]
pub enum GpioCmd {
    /// List the board's lines with their direction and value.
    List,
    /// Read a line.
    Read { line: String },
    /// Set an output line to 0 or 1 (makes it an output).
    Write {
        line: String,
        #[arg(value_parser = clap::value_parser!(u8).range(0..=1))]
        value: u8,
        #[command(flatten)]
        call: CallFlags,
    },
    /// Print each change of lines (reads them every --interval) until interrupted.
    Watch {
        #[arg(required = true)]
        lines: Vec<String>,
        /// How often to read the lines, e.g. 1s, 10s (the API has no event stream yet).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: u64,
        /// Stop after this many changes (the first reading of each line counts).
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  s4t i2c pi1 write 1 0x48 42 --register 0\n  s4t i2c pi1 read 1 0x48 --register 0 --length 2"
)]
pub struct I2cArgs {
    board: String,
    #[command(subcommand)]
    cmd: I2cCmd,
}

#[derive(Subcommand, Debug)]
pub enum I2cCmd {
    /// Read bytes from a device (from a register if given).
    Read {
        bus: u32,
        /// 7-bit address, decimal or 0x-hex.
        address: String,
        #[arg(long, value_parser = byte)]
        register: Option<u8>,
        #[arg(long, default_value_t = 1)]
        length: u16,
    },
    /// Write bytes (decimal or 0x-hex) to a device (to a register if given).
    Write {
        bus: u32,
        address: String,
        #[arg(required = true, value_parser = byte)]
        data: Vec<u8>,
        #[arg(long, value_parser = byte)]
        register: Option<u8>,
        #[command(flatten)]
        call: CallFlags,
    },
}

/// `42` or `0x2a`.
fn byte(s: &str) -> std::result::Result<u8, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a byte (0-255 or 0x00-0xff)"))
}

pub async fn gpio(ctx: &Ctx, a: GpioArgs) -> Result<()> {
    let client = ctx.client()?;
    let base = format!("/v1/boards/{}/gpio", seg(&a.board));
    let none = CallFlags::default();
    match a.cmd {
        GpioCmd::List => {
            let Called::Done(v) = board_call(ctx, &client, &a.board, Method::GET, &base, None, &none).await? else {
                return Err(Failure::new(Kind::Timeout, format!("board {} has not answered yet", a.board)));
            };
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "lines").iter().for_each(|l| println!("{}", field(l, "name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "lines")
                    .iter()
                    .map(|l| ["name", "chip", "offset", "direction", "value"].iter().map(|k| field(l, k)).collect())
                    .collect();
                ctx.out.table(&["LINE", "CHIP", "OFFSET", "DIRECTION", "VALUE"], &rows);
            }
        }
        GpioCmd::Read { line } => {
            let path = format!("{base}/{}", seg(&line));
            let called = board_call(ctx, &client, &a.board, Method::GET, &path, None, &none).await?;
            if let Called::Done(v) = &called {
                ctx.out
                    .result(v, Some(&field(v, "value")), || println!("{} = {}", field(v, "name"), field(v, "value")));
                return Ok(());
            }
            report(ctx, &a.board, called, &none)?;
        }
        GpioCmd::Write { line, value, call } => {
            let path = format!("{base}/{}", seg(&line));
            let body = json!({"value": value, "direction": "out"});
            match board_call(ctx, &client, &a.board, Method::PUT, &path, Some(&body), &call).await? {
                Called::Done(v) => {
                    ctx.out.result(&v, None, || println!("{} = {}", field(&v, "name"), field(&v, "value")))
                }
                accepted => report(ctx, &a.board, accepted, &call)?,
            }
        }
        GpioCmd::Watch { lines, interval, count } => {
            let mut last: Vec<Option<String>> = vec![None; lines.len()];
            let mut changes = 0u64;
            loop {
                for (i, line) in lines.iter().enumerate() {
                    let path = format!("{base}/{}", seg(line));
                    let Called::Done(v) = board_call(ctx, &client, &a.board, Method::GET, &path, None, &none).await?
                    else {
                        continue;
                    };
                    let value = field(&v, "value");
                    if last[i].as_deref() != Some(value.as_str()) {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0);
                        let ev = json!({"line": line, "value": v.get("value"), "time": now});
                        if ctx.out.json {
                            println!("{}", json_text(&ev, false));
                        } else {
                            println!("{}  {line} = {value}", fmt_time(now));
                        }
                        last[i] = Some(value);
                        changes += 1;
                        if count.is_some_and(|c| changes >= c) {
                            return Ok(());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(interval)).await;
            }
        }
    }
    Ok(())
}

pub async fn i2c(ctx: &Ctx, a: I2cArgs) -> Result<()> {
    let client = ctx.client()?;
    match a.cmd {
        I2cCmd::Read { bus, address, register, length } => {
            let path = format!("/v1/boards/{}/i2c/{bus}/{}/read", seg(&a.board), seg(&address));
            let mut body = json!({"length": length});
            if let Some(r) = register {
                body["register"] = json!(r);
            }
            let none = CallFlags::default();
            match board_call(ctx, &client, &a.board, Method::POST, &path, Some(&body), &none).await? {
                Called::Done(v) => ctx.out.result(&v, Some(&hex(&v)), || println!("{}", hex(&v))),
                accepted => report(ctx, &a.board, accepted, &none)?,
            }
        }
        I2cCmd::Write { bus, address, data, register, call } => {
            let path = format!("/v1/boards/{}/i2c/{bus}/{}/write", seg(&a.board), seg(&address));
            let mut body = json!({"data": data});
            if let Some(r) = register {
                body["register"] = json!(r);
            }
            match board_call(ctx, &client, &a.board, Method::POST, &path, Some(&body), &call).await? {
                Called::Done(v) => ctx.out.result(&v, None, || print_message(&v)),
                accepted => report(ctx, &a.board, accepted, &call)?,
            }
        }
    }
    Ok(())
}

/// `{"data":[1,171]}` → `0x01 0xab`.
fn hex(v: &Value) -> String {
    items(v, "data").iter().filter_map(Value::as_u64).map(|b| format!("0x{b:02x}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_parse() {
        assert_eq!(byte("42").unwrap(), 42);
        assert_eq!(byte("0x2A").unwrap(), 42);
        assert!(byte("256").is_err());
        assert!(byte("0x").is_err());
        assert_eq!(hex(&json!({"data": [1, 171]})), "0x01 0xab");
    }
}

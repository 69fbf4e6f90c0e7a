//! `s4t plugin list|show|create|update|delete|inject|remove|call|start|stop|status|reboot|injections`:
//! user code for boards (issue 11). `create` reads a file: `.wasm` (or any WebAssembly binary)
//! and `.wat` (compiled here) are `wasm` plugins, `.py` the original Python format; anything
//! else needs `--kind process`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{CallFlags, Called, board_call, items, params_object, report};
use crate::cli::Ctx;
use crate::cli::client::{Client, seg};
use crate::cli::error::{Failure, Kind, Result};
use crate::cli::output::{field, kv_rows, safe_text, time_field};

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// List your project's plugins (--public adds other projects' public ones).
    List {
        #[arg(long)]
        public: bool,
    },
    /// Show a plugin (--code prints its code as stored).
    Show {
        plugin: String,
        #[arg(long)]
        code: bool,
    },
    /// Create a plugin from a file: .wasm/.wat (sandboxed), .py (original format), or --kind process.
    #[command(after_help = "Examples:
  s4t plugin create blink blink.wasm --callable --param times --grant-gpio GPIO17
  s4t plugin create sensor sensor.wat --grant-i2c 1:0x48
  s4t plugin create hello hello.py --callable          # original Python Worker class")]
    Create(CreateArgs),
    /// Replace a plugin's code or change its flags.
    Update(UpdateArgs),
    /// Delete plugins (they must be removed from every board first).
    Delete {
        #[arg(required = true)]
        plugins: Vec<String>,
    },
    /// Put a plugin on a board (--onboot: a started plugin starts again after a reboot).
    Inject {
        board: String,
        plugin: String,
        #[arg(long)]
        onboot: bool,
        /// GPIO line this board gives the plugin (repeat; default: what the plugin asks for).
        #[arg(long = "grant-gpio", value_name = "LINE")]
        grant_gpio: Vec<String>,
        /// I2C device BUS:ADDRESS this board gives the plugin (repeat).
        #[arg(long = "grant-i2c", value_name = "BUS:ADDR")]
        grant_i2c: Vec<String>,
        #[command(flatten)]
        call: CallFlags,
    },
    /// Take a plugin off a board (it is stopped first).
    Remove {
        board: String,
        plugin: String,
        #[command(flatten)]
        call: CallFlags,
    },
    /// Run a callable plugin once and print its result: `s4t plugin call pi1 blink times=3`.
    Call(ActionArgs),
    /// Start a long-running plugin.
    Start(ActionArgs),
    /// Stop a started plugin (--delay seconds).
    Stop {
        board: String,
        plugin: String,
        #[arg(long, value_name = "SECONDS")]
        delay: Option<u64>,
        #[command(flatten)]
        call: CallFlags,
    },
    /// Whether a started plugin runs: ALIVE, or DEAD with the reason it ended.
    Status {
        board: String,
        plugin: String,
        #[command(flatten)]
        call: CallFlags,
    },
    /// Stop and start a plugin again (with new parameters, or the last ones).
    Reboot(ActionArgs),
    /// The plugins injected on a board.
    Injections { board: String },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    name: String,
    file: PathBuf,
    /// wasm, process or python (default: from the file).
    #[arg(long, value_parser = ["wasm", "process", "python"])]
    kind: Option<String>,
    /// A plugin run once per call (PluginCall) rather than started (PluginStart).
    #[arg(long)]
    callable: bool,
    /// Other projects may use it.
    #[arg(long)]
    public: bool,
    /// A parameter the plugin takes (repeat); calls must give each.
    #[arg(long = "param", value_name = "NAME")]
    params: Vec<String>,
    /// GPIO line the plugin asks for (repeat).
    #[arg(long = "grant-gpio", value_name = "LINE")]
    grant_gpio: Vec<String>,
    /// I2C device BUS:ADDRESS the plugin asks for, e.g. 1:0x48 (repeat).
    #[arg(long = "grant-i2c", value_name = "BUS:ADDR")]
    grant_i2c: Vec<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    plugin: String,
    /// New code (same rules as create).
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, value_parser = ["wasm", "process", "python"])]
    kind: Option<String>,
    #[arg(long)]
    callable: Option<bool>,
    #[arg(long)]
    public: Option<bool>,
    #[arg(long = "name")]
    new_name: Option<String>,
}

#[derive(Args, Debug)]
pub struct ActionArgs {
    board: String,
    plugin: String,
    /// Parameters as key=value (values that parse as JSON keep their type).
    params: Vec<String>,
    /// Parameters as a JSON object (key=value pairs override it).
    #[arg(long = "params", value_name = "JSON")]
    params_json: Option<String>,
    #[command(flatten)]
    call: CallFlags,
}

/// `1:0x48` → `{"bus":1,"address":72}`.
fn i2c_grant(s: &str) -> Result<Value> {
    let bad = || Failure::usage(format!("I2C grant {s:?}: give BUS:ADDRESS, e.g. 1:0x48"));
    let (bus, addr) = s.split_once(':').ok_or_else(bad)?;
    let bus: u32 = bus.parse().map_err(|_| bad())?;
    let addr = match addr.strip_prefix("0x").or_else(|| addr.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => addr.parse(),
    }
    .map_err(|_| bad())?;
    Ok(json!({"bus": bus, "address": addr}))
}

fn grants(gpio: &[String], i2c: &[String]) -> Result<Option<Value>> {
    if gpio.is_empty() && i2c.is_empty() {
        return Ok(None);
    }
    let i2c = i2c.iter().map(|s| i2c_grant(s)).collect::<Result<Vec<_>>>()?;
    Ok(Some(json!({"gpio": gpio, "i2c": i2c})))
}

/// The file as the API's `code` and its kind: base64 for binaries, source for Python.
pub fn read_code(path: &Path, kind: Option<&str>) -> Result<(String, String)> {
    let bytes = std::fs::read(path).map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let kind = match kind {
        Some(k) => k.to_owned(),
        None if ext == "wasm" || ext == "wat" || bytes.starts_with(b"\0asm") => "wasm".into(),
        None if ext == "py" => "python".into(),
        None => {
            return Err(Failure::usage(format!("{}: say what it is with --kind wasm|process|python", path.display())));
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    match kind.as_str() {
        "wasm" if !bytes.starts_with(b"\0asm") => {
            let module = wat::parse_bytes(&bytes)
                .map_err(|e| Failure::usage(format!("{} is neither WebAssembly nor valid WAT: {e}", path.display())))?;
            Ok((b64.encode(&module), kind))
        }
        "python" => {
            let text = String::from_utf8(bytes)
                .map_err(|_| Failure::usage(format!("{} is not UTF-8 text", path.display())))?;
            Ok((text, kind))
        }
        _ => Ok((b64.encode(&bytes), kind)),
    }
}

fn plugin_rows(v: &Value) -> Vec<Vec<String>> {
    items(v, "plugins")
        .iter()
        .map(|p| {
            vec![
                field(p, "name"),
                field(p, "kind"),
                field(p, "callable"),
                field(p, "public"),
                field(p, "code_size"),
                field(p, "uuid"),
            ]
        })
        .collect()
}

pub async fn run(ctx: &Ctx, cmd: PluginCmd) -> Result<()> {
    let client = ctx.client()?;
    match cmd {
        PluginCmd::List { public } => {
            let q = if public { "?with_public=true" } else { "" };
            let v = client.get_all(&format!("/v1/plugins{q}"), "plugins").await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "plugins").iter().for_each(|p| println!("{}", field(p, "name")));
            } else {
                ctx.out.table(&["NAME", "KIND", "CALLABLE", "PUBLIC", "BYTES", "UUID"], &plugin_rows(&v));
            }
        }
        PluginCmd::Show { plugin, code } => {
            let mut v = client.get(&format!("/v1/plugins/{}", seg(&plugin))).await?;
            if !code && let Some(m) = v.as_object_mut() {
                m.remove("code");
            }
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                let fields = [
                    "uuid",
                    "name",
                    "kind",
                    "callable",
                    "public",
                    "parameters",
                    "grants",
                    "code_size",
                    "code_sha256",
                    "project",
                ];
                let mut rows = kv_rows(&v, &fields);
                rows.push(vec!["created_at".into(), time_field(&v, "created_at")]);
                ctx.out.table(&["FIELD", "VALUE"], &rows);
                if code {
                    println!("{}", v.get("code").and_then(Value::as_str).map(safe_text).unwrap_or_default());
                }
            });
        }
        PluginCmd::Create(a) => {
            let (code, kind) = read_code(&a.file, a.kind.as_deref())?;
            let params: Map<String, Value> = a.params.iter().map(|p| (p.clone(), Value::Null)).collect();
            let mut body = json!({"name": a.name, "code": code, "kind": kind, "callable": a.callable,
                                  "public": a.public, "parameters": params});
            if let Some(g) = grants(&a.grant_gpio, &a.grant_i2c)? {
                body["grants"] = g;
            }
            let v = client.post("/v1/plugins", &body).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || {
                println!(
                    "created {kind} plugin {} ({} bytes, sha256 {})",
                    a.name,
                    field(&v, "code_size"),
                    field(&v, "code_sha256")
                );
            });
        }
        PluginCmd::Update(a) => {
            let mut body = json!({});
            if let Some(f) = &a.file {
                let (code, kind) = read_code(f, a.kind.as_deref())?;
                body["code"] = json!(code);
                body["kind"] = json!(kind);
            }
            for (k, v) in [("callable", a.callable), ("public", a.public)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(n) = &a.new_name {
                body["name"] = json!(n);
            }
            let v = client.call(Method::PATCH, &format!("/v1/plugins/{}", seg(&a.plugin)), Some(&body)).await?.body;
            ctx.out.result(&v, Some(&field(&v, "uuid")), || println!("updated plugin {}", field(&v, "name")));
        }
        PluginCmd::Delete { plugins } => {
            for p in &plugins {
                client.delete(&format!("/v1/plugins/{}", seg(p))).await?;
                ctx.out.say(format!("deleted plugin {p}"));
            }
            if ctx.out.json {
                ctx.out.json(&json!({"deleted": plugins}));
            }
        }
        PluginCmd::Inject { board, plugin, onboot, grant_gpio, grant_i2c, call } => {
            let mut body = json!({"plugin": plugin, "onboot": onboot});
            if let Some(g) = grants(&grant_gpio, &grant_i2c)? {
                body["grants"] = g;
            }
            let path = format!("/v1/boards/{}/plugins", seg(&board));
            match board_call(ctx, &client, &board, Method::PUT, &path, Some(&body), &call).await? {
                Called::Done(v) => ctx.out.result(&v, Some(&field(&v, "status")), || {
                    println!("plugin {plugin} is {} on {board}", field(&v, "status"));
                }),
                accepted => report(ctx, &board, accepted, &call)?,
            }
        }
        PluginCmd::Remove { board, plugin, call } => {
            let path = format!("/v1/boards/{}/plugins/{}", seg(&board), seg(&plugin));
            match board_call(ctx, &client, &board, Method::DELETE, &path, None, &call).await? {
                Called::Done(v) => ctx.out.result(&v, None, || println!("removed plugin {plugin} from {board}")),
                accepted => report(ctx, &board, accepted, &call)?,
            }
        }
        PluginCmd::Call(a) => action(ctx, &client, "PluginCall", a).await?,
        PluginCmd::Start(a) => action(ctx, &client, "PluginStart", a).await?,
        PluginCmd::Reboot(a) => action(ctx, &client, "PluginReboot", a).await?,
        PluginCmd::Stop { board, plugin, delay, call } => {
            let params = delay.map(|d| json!({"delay": d})).unwrap_or_else(|| json!({}));
            let a = ActionArgs { board, plugin, params: vec![], params_json: Some(params.to_string()), call };
            action(ctx, &client, "PluginStop", a).await?
        }
        PluginCmd::Status { board, plugin, call } => {
            let a = ActionArgs { board, plugin, params: vec![], params_json: None, call };
            action(ctx, &client, "PluginStatus", a).await?
        }
        PluginCmd::Injections { board } => {
            let v = client.get(&format!("/v1/boards/{}/plugins", seg(&board))).await?;
            if ctx.out.json {
                ctx.out.json(&v);
            } else if ctx.out.quiet {
                items(&v, "injections").iter().for_each(|i| println!("{}", field(i, "plugin_name")));
            } else {
                let rows: Vec<Vec<String>> = items(&v, "injections")
                    .iter()
                    .map(|i| {
                        let status = if i["outdated"] == json!(true) {
                            format!("{} (outdated code)", field(i, "status"))
                        } else {
                            field(i, "status")
                        };
                        vec![
                            field(i, "plugin_name"),
                            field(i, "kind"),
                            status,
                            field(i, "onboot"),
                            time_field(i, "updated_at"),
                        ]
                    })
                    .collect();
                ctx.out.table(&["PLUGIN", "KIND", "STATUS", "ONBOOT", "SINCE"], &rows);
            }
        }
    }
    Ok(())
}

async fn action(ctx: &Ctx, client: &Client, name: &str, a: ActionArgs) -> Result<()> {
    let params = params_object(&a.params, a.params_json.as_deref())?;
    let path = format!("/v1/boards/{}/plugins/{}", seg(&a.board), seg(&a.plugin));
    let body = json!({"action": name, "parameters": params});
    match board_call(ctx, client, &a.board, Method::POST, &path, Some(&body), &a.call).await {
        Ok(called) => report(ctx, &a.board, called, &a.call),
        Err(f) if f.kind == Kind::Board => Err(Failure::new(Kind::Board, f.message.clone())
            .with_hint(format!("see the plugin's state with `s4t plugin status {} {}`", a.board, a.plugin))),
        Err(f) => Err(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn i2c_grants_parse() {
        assert_eq!(i2c_grant("1:0x48").unwrap(), json!({"bus": 1, "address": 72}));
        assert_eq!(i2c_grant("0:72").unwrap(), json!({"bus": 0, "address": 72}));
        for bad in ["1", "x:1", "1:zz", ":"] {
            assert!(i2c_grant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn code_files_become_api_code() {
        let dir = tempfile::tempdir().unwrap();
        let wat = dir.path().join("p.wat");
        std::fs::write(&wat, "(module (memory (export \"memory\") 1))").unwrap();
        let (code, kind) = read_code(&wat, None).unwrap();
        assert_eq!(kind, "wasm");
        let bytes = base64::engine::general_purpose::STANDARD.decode(code).unwrap();
        assert!(bytes.starts_with(b"\0asm"));
        let py = dir.path().join("p.py");
        std::fs::write(&py, "class Worker: pass\n").unwrap();
        assert_eq!(read_code(&py, None).unwrap(), ("class Worker: pass\n".into(), "python".into()));
        let sh = dir.path().join("p.sh");
        std::fs::write(&sh, "#!/bin/sh\n").unwrap();
        assert!(read_code(&sh, None).is_err());
        assert_eq!(read_code(&sh, Some("process")).unwrap().1, "process");
        std::fs::write(&wat, "(module (bogus))").unwrap();
        assert!(read_code(&wat, None).is_err());
    }
}

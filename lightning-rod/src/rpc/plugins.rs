//! `Plugin*` procedures (S4T-REFERENCE §5.4, §6.2): the arguments of the original, checked, and
//! the original's replies (`PluginInject result: INJECTED`, `STARTED`, `ALREADY STARTED!`,
//! `STOPPED`, `REBOOTED`, `ALIVE`/`DEAD`). The work is in [`crate::plugins`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use s4t_shared::plugin::{Grants, PluginKind, pickle0_decode};
use serde_json::{Value, json};

use super::args::{Params, bad, kind};
use super::{Call, Context, Method, Outcome, Reply, message};
use crate::error::Result;
use crate::plugins::{End, NewPlugin, check_name, check_uuid};

const MAX_STOP_DELAY_S: u64 = 3600;

pub(super) async fn call(ctx: &Arc<Context>, method: Method, call: &Call) -> Result<Reply> {
    let plugins = &ctx.plugins;
    match method {
        Method::PluginInject => {
            let plugin = parse_plugin(call, plugins.config().max_code_bytes)?;
            let onboot = flag(call.args.get(1), "onboot")?;
            let updated = plugins.inject(plugin, onboot).await?;
            message(json!(format!("PluginInject result: {}", if updated { "UPDATED" } else { "INJECTED" })))
        }
        Method::PluginStart => {
            plugins.start(&uuid(call)?, params(call)?).await?;
            message(json!("STARTED"))
        }
        Method::PluginReboot => {
            plugins.reboot(&uuid(call)?, params(call)?).await?;
            message(json!("REBOOTED"))
        }
        Method::PluginCall => {
            let end = plugins.call(&uuid(call)?, params(call)?.unwrap_or_else(|| json!({}))).await?;
            Ok(call_reply(end))
        }
        Method::PluginStop => stop(ctx, call).await,
        Method::PluginStatus => message(json!(plugins.status(&uuid(call)?)?)),
        Method::PluginRemove => {
            let id = uuid(call)?;
            if plugins.remove(&id).await? {
                message(json!("PluginRemove result: REMOVED"))
            } else {
                Ok(warning(format!("plugin {id} was not injected")))
            }
        }
        _ => Err(bad(format!("{} is not a plugin procedure", method.name()))),
    }
}

fn warning(text: String) -> Reply {
    Reply { message: json!(text), result: Outcome::Warning, req_id: None }
}

/// A call's reply: SUCCESS with what the plugin returned, ERROR when it failed or was stopped.
fn call_reply(end: End) -> Reply {
    let error = |m: Value| Reply { message: m, result: Outcome::Error, req_id: None };
    match end {
        End::Done { status: 0, result } => Reply::success(None, result.unwrap_or(Value::Null)),
        End::Done { status, result: Some(r) } => {
            tracing::info!(status, "plugin call returned an error");
            error(r)
        }
        End::Done { status, result: None } => error(json!(format!("the plugin returned {status}"))),
        End::Failed(why) => error(json!(format!("the plugin was stopped: {why}"))),
        End::Stopped => error(json!("the plugin was stopped before it answered")),
    }
}

/// `PluginStop(uuid, {delay})`: at once, or RUNNING and `STOPPED` through `notify_result`
/// (at most [`crate::plugins::MAX_DELAYED_STOPS`] pending; a delayed stop ends only the run
/// under way when it was asked, never one started since).
async fn stop(ctx: &Arc<Context>, call: &Call) -> Result<Reply> {
    let id = uuid(call)?;
    let p = Params::at(&call.args, 1, "parameters", false)?;
    let delay = p.opt_int("delay", 0..=MAX_STOP_DELAY_S)?.unwrap_or(0);
    if delay == 0 {
        return stopped(ctx.plugins.stop(&id).await?, &id);
    }
    ctx.plugins.status(&id)?;
    // Bounded, and meant for the run under way now: one started after this stays.
    let slot = ctx.plugins.delayed_stop_slot()?;
    let run = ctx.plugins.current_run(&id);
    let (ctx2, req_id) = (ctx.clone(), call.req_id());
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            _ = ctx2.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(delay)) => {}
        }
        let reply = match ctx2.plugins.stop_run_of(&id, run).await {
            Ok(false) if ctx2.plugins.current_run(&id).is_some() => {
                warning(format!("plugin {id} was started again since this stop was asked: left running"))
            }
            Ok(was) => stopped(was, &id).unwrap_or_else(|e| Reply::error(None, e)),
            Err(e) => Reply::error(None, format!("PluginStop: {e}")),
        };
        let _ = ctx2.notify.send(Reply { req_id, ..reply }).await;
    });
    Ok(Reply { message: json!("RUNNING"), result: Outcome::Running, req_id: None })
}

fn stopped(was_running: bool, id: &str) -> Result<Reply> {
    if was_running { message(json!("STOPPED")) } else { Ok(warning(format!("plugin {id} was not running"))) }
}

/// The plugin uuid at `args[0]` (or its `uuid`), checked by [`check_uuid`] as at injection.
fn uuid(call: &Call) -> Result<String> {
    let (id, what) = match call.args.first() {
        Some(Value::String(s)) => (s, "plugin (first argument)"),
        Some(Value::Object(m)) => match m.get("uuid") {
            Some(Value::String(s)) => (s, "plugin.uuid"),
            Some(v) => return Err(bad(format!("plugin.uuid must be a string, got {}", kind(v)))),
            None => return Err(bad("plugin.uuid is missing".into())),
        },
        Some(v) => return Err(bad(format!("plugin (first argument) must be the plugin uuid, got {}", kind(v)))),
        None => return Err(bad("plugin (first argument) is missing".into())),
    };
    check_uuid(id).map_err(|e| bad(format!("{what} {e}")))?;
    Ok(id.clone())
}

/// The parameters at `args[1]`: an object, or absent/null (`None`).
fn params(call: &Call) -> Result<Option<Value>> {
    match call.args.get(1) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
        Some(v) => Err(bad(format!("parameters must be a JSON object, got {}", kind(v)))),
    }
}

fn flag(v: Option<&Value>, what: &str) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(bad(format!("{what} must be a boolean, got {}", kind(v)))),
    }
}

/// The plugin dict: `{uuid, name, code, callable[, kind][, grants]}`. Without `kind` it is the
/// original format, a pickled Python source.
fn parse_plugin(call: &Call, max_code: usize) -> Result<NewPlugin> {
    let p = Params::at(&call.args, 0, "plugin", true)?;
    let uuid = p.str("uuid")?.to_owned();
    check_uuid(&uuid).map_err(|e| bad(format!("plugin.uuid {e}")))?;
    let name = p.opt_str("name")?.unwrap_or(&uuid).to_owned();
    check_name(&name).map_err(|e| bad(format!("plugin.name {e}")))?;
    let kind = match p.opt_str("kind")? {
        None => PluginKind::Python,
        Some(k) => {
            PluginKind::parse(k).ok_or_else(|| bad(format!("plugin.kind {k:?} is not wasm, process or python")))?
        }
    };
    let callable = flag(p.get("callable"), "plugin.callable")?;
    let grants = match p.get("grants") {
        None => Grants::default(),
        Some(g) => serde_json::from_value(g.clone()).map_err(|e| {
            bad(format!("plugin.grants must be {{\"gpio\":[names],\"i2c\":[{{\"bus\",\"address\"}}]}}: {e}"))
        })?,
    };
    let Some(Value::String(text)) = p.get("code") else { return Err(bad("plugin.code must be a string".into())) };
    if text.len() > max_code.saturating_mul(4) / 3 + 4 {
        return Err(bad(format!("plugin.code is larger than this board accepts ({max_code} bytes)")));
    }
    let code = match kind {
        PluginKind::Python => {
            let source = pickle0_decode(text).map_err(|e| bad(format!("plugin.code: {e}")))?;
            source.into_bytes()
        }
        _ => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| bad(format!("plugin.code must be base64 for kind {}: {e}", kind.as_str())))?,
    };
    if code.len() > max_code {
        return Err(bad(format!("plugin.code is larger than this board accepts ({max_code} bytes)")));
    }
    Ok(NewPlugin { uuid, name, kind, callable, grants, code })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{bare_context as context, procedure};
    use super::super::vpn::{NoPackets, VpnManager};
    use super::*;
    use crate::rpc::Outcome;
    use crate::state::StateStore;

    /// A uuid is a file name: one that climbs out of `plugins/` is refused by every procedure,
    /// and the file it names stays.
    #[tokio::test]
    async fn a_plugin_uuid_that_is_a_path_is_refused_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let ctx = context(store.clone(), VpnManager::new(store.clone(), Box::new(NoPackets), String::new()));
        std::fs::create_dir(store.path("plugins")).unwrap();
        let victim = dir.path().join("x.code");
        std::fs::write(&victim, b"keep").unwrap();
        for method in [
            Method::PluginRemove,
            Method::PluginStart,
            Method::PluginReboot,
            Method::PluginCall,
            Method::PluginStop,
            Method::PluginStatus,
        ] {
            for arg in [json!("../x"), json!({"uuid": "../x"}), json!("a\u{0}b"), json!("")] {
                let r = procedure(&ctx, method, arg.clone()).await;
                assert_eq!(r.result, Outcome::Error, "{} {arg}: {r:?}", method.name());
                let text = r.message.as_str().unwrap();
                assert!(text.contains("letters, digits, - and _"), "{} {arg}: {text}", method.name());
            }
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "PluginRemove deleted a file outside plugins/");
        // The manager refuses it too, whoever calls it.
        assert!(ctx.plugins.remove("../x").await.is_err());
        assert!(victim.exists());
    }

    /// A delayed stop ends the run it was asked for, not one started after it; and only so
    /// many wait at once.
    #[tokio::test]
    async fn a_delayed_stop_ends_only_its_run_and_they_are_bounded() {
        use super::super::services::{NoTunnels, ServiceManager};
        use super::super::tests::context as full_context;
        use crate::plugins::MAX_DELAYED_STOPS;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let services = ServiceManager::new(store.clone(), Box::new(NoTunnels), "ws://127.0.0.1:8080/".into());
        let vpns = VpnManager::new(store.clone(), Box::new(NoPackets), String::new());
        let (ctx, (mut notify, _, _)) = full_context(store, Default::default(), services, vpns);
        let sleeper = r#"(module (import "s4t" "sleep_ms" (func $sleep (param i32)))
            (memory (export "memory") 1)
            (func (export "run") (result i32) (loop $l (call $sleep (i32.const 1000)) (br $l)) (i32.const 0)))"#;
        inject_wasm(&ctx, sleeper).await;
        ctx.plugins.start("t", None).await.unwrap();
        let r = stop_later(&ctx, 1).await;
        assert_eq!(r.result, Outcome::Running, "{r:?}");
        // Stopped and started again before the delay is over: the new run is not its run.
        ctx.plugins.stop("t").await.unwrap();
        ctx.plugins.start("t", None).await.unwrap();
        let run = ctx.plugins.current_run("t");
        let r = tokio::time::timeout(Duration::from_secs(20), notify.recv()).await.unwrap().unwrap();
        assert_eq!(r.result, Outcome::Warning, "{r:?}");
        assert!(r.message.as_str().unwrap().contains("started again"), "{r:?}");
        assert!(run.is_some());
        assert_eq!(ctx.plugins.current_run("t"), run, "the delayed stop ended a later run");
        assert_eq!(ctx.plugins.status("t").unwrap(), "ALIVE");
        // Bounded: one more than the limit is refused.
        for _ in 0..MAX_DELAYED_STOPS {
            let r = stop_later(&ctx, 3600).await;
            assert_eq!(r.result, Outcome::Running, "{r:?}");
        }
        let r = stop_later(&ctx, 3600).await;
        assert_eq!(r.result, Outcome::Error, "{r:?}");
        assert!(r.message.as_str().unwrap().contains("delayed plugin stops are pending"), "{r:?}");
        ctx.plugins.close_all().await;
    }

    /// Injects plugin `t`, the WebAssembly module `wat`, started by procedures only.
    async fn inject_wasm(ctx: &Arc<Context>, wat: &str) {
        let plugin = NewPlugin {
            uuid: "t".into(),
            name: "t".into(),
            kind: PluginKind::Wasm,
            callable: false,
            grants: Grants::default(),
            code: wat::parse_str(wat).unwrap(),
        };
        ctx.plugins.inject(plugin, false).await.unwrap();
    }

    /// `PluginStop("t", {"delay": delay})`, with a request dict first as the cloud calls it.
    async fn stop_later(ctx: &Arc<Context>, delay: u64) -> Reply {
        let args = vec![json!({"uuid": "r"}), json!("t"), json!({"delay": delay})];
        super::super::dispatch(ctx, Method::PluginStop, Call::from_positional(args)).await
    }

    /// `PluginStart` with 100 KiB of parameters is refused, naming the limit, and the plugin's
    /// entry stays as it was.
    #[tokio::test]
    async fn a_start_with_oversized_parameters_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let ctx = context(store.clone(), VpnManager::new(store, Box::new(NoPackets), String::new()));
        inject_wasm(&ctx, r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#)
            .await;
        let before = ctx.plugins.registry().unwrap();
        let args = vec![json!({"uuid": "r"}), json!("t"), json!({"data": "x".repeat(100 * 1024)})];
        let r = super::super::dispatch(&ctx, Method::PluginStart, Call::from_positional(args)).await;
        assert_eq!(r.result, Outcome::Error, "{r:?}");
        let text = r.message.as_str().unwrap();
        assert!(text.contains("65536"), "{text}");
        assert_eq!(ctx.plugins.registry().unwrap(), before);
    }

    #[tokio::test]
    async fn a_plugin_name_with_control_characters_is_refused_at_injection() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let ctx = context(store.clone(), VpnManager::new(store, Box::new(NoPackets), String::new()));
        let code = base64::engine::general_purpose::STANDARD.encode(b"\0asm\x01\0\0\0");
        let plugin = json!({"uuid": "p1", "name": "a\u{0}b", "kind": "wasm", "code": code, "callable": true});
        let r = procedure(&ctx, Method::PluginInject, plugin).await;
        assert_eq!(r.result, Outcome::Error, "{r:?}");
        assert!(r.message.as_str().unwrap().contains("plugin.name must not contain control characters"), "{r:?}");
        assert!(ctx.plugins.registry().unwrap().is_empty());
    }
}

//! Plugin benchmark (issue 11): the board's plugin manager with real WebAssembly modules, on
//! the sim HAL, in this process. Prints figures; asserts nothing about them.
//!
//! - compile (validate) time of a module, and of the Rust example `blink` if given;
//! - `PluginCall` latency of a trivial module (thread, instantiation, run, result), p50/p99;
//! - interpreter speed: fuel (≈ WebAssembly instructions) per second of a busy loop;
//! - the event loop while a runaway plugin burns CPU: latency of a 1 ms timer tick, p50/p99;
//! - memory: RSS with N started plugins sleeping, per plugin.
//!
//! Usage: `cargo run --release -p lightning-rod --example plugin_bench [-- CALLS STARTED [blink.wasm]]`
//! (default 2000 calls, 32 started plugins).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lightning_rod::hal::Hal;
use lightning_rod::plugins::{End, NewPlugin, PluginManager, PluginsConfig};
use lightning_rod::state::StateStore;
use s4t_shared::plugin::{Grants, PluginKind};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ECHO: &str = r#"(module
  (import "s4t" "params_len" (func $plen (result i32)))
  (import "s4t" "params_read" (func $pread (param i32 i32) (result i32)))
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (drop (call $pread (i32.const 0) (call $plen)))
    (drop (call $res (i32.const 0) (call $plen)))
    (i32.const 0)))"#;

/// Counts down from 100,000,000: about 4 instructions per iteration.
const SPIN: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (local $n i32)
    (local.set $n (i32.const 100000000))
    (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l (local.get $n)))
    (i32.const 0)))"#;

const RUNAWAY: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

const SLEEPER: &str = r#"(module (import "s4t" "sleep_ms" (func $s (param i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (call $s (i32.const 1000)) (br $l)) (i32.const 0)))"#;

fn plugin(uuid: &str, wat: &str, callable: bool) -> NewPlugin {
    NewPlugin {
        uuid: uuid.into(),
        name: uuid.into(),
        kind: PluginKind::Wasm,
        callable,
        grants: Grants::default(),
        code: wat::parse_str(wat).expect("WAT"),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let calls: usize = args.first().map_or(Ok(2000), |s| s.parse())?;
    let started: usize = args.get(1).map_or(Ok(32), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let store = StateStore::open(dir.path())?;
    // A whole core: the interpreter's speed is measured, not the CPU share plugins get.
    let config = PluginsConfig {
        max_running: started + 4,
        fuel: 1 << 40,
        cpu_share: 1.0,
        call_timeout_s: 3,
        ..Default::default()
    };
    let (tx, _telemetry) = mpsc::channel(64);
    let plugins =
        Arc::new(PluginManager::new(store, config, Hal::sim(32), "bench".into(), tx, CancellationToken::new()));
    let sandbox = lightning_rod::plugins::wasm::Sandbox::new();

    // Compile (validation + translation to the interpreter's code).
    let echo_bytes = wat::parse_str(ECHO)?;
    let t = Instant::now();
    for _ in 0..100 {
        sandbox.compile(&echo_bytes).map_err(anyhow::Error::msg)?;
    }
    println!("compile echo ({} B): {:.1} µs", echo_bytes.len(), t.elapsed().as_secs_f64() * 1e6 / 100.0);
    if let Some(path) = args.get(2) {
        let blink = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let t = Instant::now();
        sandbox.compile(&blink).map_err(anyhow::Error::msg)?;
        println!("compile {path} ({} B): {:.1} µs", blink.len(), t.elapsed().as_secs_f64() * 1e6);
    }

    // Call latency.
    plugins.inject(plugin("echo", ECHO, true), false).await?;
    let params = json!({"say": "hello"});
    for _ in 0..50 {
        plugins.call("echo", params.clone()).await?;
    }
    let mut lat = Vec::with_capacity(calls);
    let t0 = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let end = plugins.call("echo", params.clone()).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(matches!(end, End::Done { status: 0, .. }), "echo failed: {end:?}");
    }
    let total = t0.elapsed().as_secs_f64();
    println!(
        "PluginCall echo: {calls} calls, p50 {:.0} µs, p99 {:.0} µs, {:.0} calls/s sequential",
        pct(&mut lat, 50.0),
        pct(&mut lat, 99.0),
        calls as f64 / total
    );

    // Interpreter speed.
    plugins.inject(plugin("spin", SPIN, true), false).await?;
    let t = Instant::now();
    let end = plugins.call("spin", json!({})).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "busy loop of 1e8 iterations (~4e8 instructions): {:.2} s, ~{:.0} M instructions/s ({end:?})",
        secs,
        4e8 / secs / 1e6
    );

    // The event loop while a runaway runs until its 3 s time limit.
    plugins.inject(plugin("runaway", RUNAWAY, true), false).await?;
    let p2 = plugins.clone();
    let runaway = tokio::spawn(async move { p2.call("runaway", json!({})).await });
    let mut ticks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut last = Instant::now();
    while !runaway.is_finished() {
        tick.tick().await;
        let now = Instant::now();
        ticks.push(now.duration_since(last).as_secs_f64() * 1e3);
        last = now;
    }
    let end = runaway.await??;
    println!(
        "1 ms timer while a runaway call runs: {} ticks, gap p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; the runaway: {end:?}",
        ticks.len(),
        pct(&mut ticks, 50.0),
        pct(&mut ticks, 99.0),
        ticks.iter().cloned().fold(0.0, f64::max)
    );

    // Memory of started plugins (each a thread with its store and 64 KiB of linear memory).
    let before = rss_kib();
    for i in 0..started {
        let id = format!("sleeper{i}");
        plugins.inject(plugin(&id, SLEEPER, false), false).await?;
        plugins.start(&id, None).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && (0..started).any(|i| plugins.status(&format!("sleeper{i}")).ok().as_deref() != Some("ALIVE"))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "{started} started plugins sleeping: RSS {before} KiB -> {after} KiB, {:.0} KiB per plugin",
        (after.saturating_sub(before)) as f64 / started.max(1) as f64
    );
    plugins.close_all().await;
    Ok(())
}

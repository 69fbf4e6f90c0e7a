//! The plugin manager against real runs: WebAssembly modules written in WAT (runaway loops,
//! traps, grants, memory limits, start/stop, onboot), shell-script process plugins and, when
//! `python3` exists, an original lightning-rod plugin.

use std::sync::Arc;
use std::time::Duration;

use s4t_shared::plugin::{Grants, I2cGrant, PluginKind, pickle0_decode, pickle0_encode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::hal::Hal;
use crate::state::StateStore;

const DEADLINE: Duration = Duration::from_secs(20);

struct Harness {
    plugins: Arc<PluginManager>,
    hal: Hal,
    telemetry: mpsc::Receiver<Telemetry>,
    store: StateStore,
    _dir: tempfile::TempDir,
}

fn config() -> PluginsConfig {
    PluginsConfig {
        // Debug builds interpret slowly: a small budget keeps runaway tests short.
        fuel: 3_000_000,
        call_timeout_s: 5,
        allow_gpio: vec!["GPIO17".into()],
        allow_i2c: vec![I2cGrant { bus: 1, address: 0x48 }],
        process: true,
        python: true,
        ..PluginsConfig::default()
    }
}

fn harness(config: PluginsConfig) -> Harness {
    harness_until(config, CancellationToken::new())
}

/// A harness whose manager shuts down when `shutdown` is cancelled.
fn harness_until(config: PluginsConfig, shutdown: CancellationToken) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let hal = Hal::sim(32);
    let (tx, telemetry) = mpsc::channel(16);
    let plugins = Arc::new(PluginManager::new(store.clone(), config, hal.clone(), "b1".into(), tx, shutdown));
    Harness { plugins, hal, telemetry, store, _dir: dir }
}

/// Whether this test process may run process plugins (as root, it runs them as `nobody`); the
/// tests of process plugins need it and say they are skipped otherwise.
fn processes_runnable() -> bool {
    match process::run_as(&config()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: this test process cannot run process plugins: {e}");
            false
        }
    }
}

fn wasm(uuid: &str, wat: &str, grants: Grants) -> NewPlugin {
    NewPlugin {
        uuid: uuid.into(),
        name: uuid.into(),
        kind: PluginKind::Wasm,
        callable: true,
        grants,
        code: wat::parse_str(wat).unwrap(),
    }
}

const ECHO: &str = r#"(module
  (import "s4t" "params_len" (func $plen (result i32)))
  (import "s4t" "params_read" (func $pread (param i32 i32) (result i32)))
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (drop (call $pread (i32.const 0) (call $plen)))
    (drop (call $res (i32.const 0) (call $plen)))
    (i32.const 0)))"#;

const RUNAWAY: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

const TRAP: &str = r#"(module (memory (export "memory") 1) (func (export "run") (result i32) unreachable))"#;

const HUGE_MEMORY: &str =
    r#"(module (memory (export "memory") 1000) (func (export "run") (result i32) (i32.const 0)))"#;

/// Drives GPIO17 high; on failure returns 1 with the host's error text as result.
const SET_GPIO17: &str = r#"(module
  (import "s4t" "gpio_write" (func $gw (param i32 i32 i32) (result i32)))
  (import "s4t" "last_error" (func $le (param i32 i32) (result i32)))
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "GPIO17")
  (func (export "run") (result i32) (local $n i32)
    (if (result i32) (i32.lt_s (call $gw (i32.const 0) (i32.const 6) (i32.const 1)) (i32.const 0))
      (then (local.set $n (call $le (i32.const 100) (i32.const 200)))
            (drop (call $res (i32.const 100) (local.get $n)))
            (i32.const 1))
      (else (i32.const 0)))))"#;

/// Publishes `{"tick":1}` and sleeps 10 ms, forever.
const TICKER: &str = r#"(module
  (import "s4t" "sleep_ms" (func $sleep (param i32)))
  (import "s4t" "publish" (func $pub (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{\"tick\":1}")
  (func (export "run") (result i32)
    (loop $l (drop (call $pub (i32.const 0) (i32.const 10))) (call $sleep (i32.const 10)) (br $l))
    (i32.const 0)))"#;

fn gpio17() -> Grants {
    Grants { gpio: vec!["GPIO17".into()], i2c: vec![] }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("{what} not within {DEADLINE:?}"))
}

#[tokio::test]
async fn a_call_returns_what_the_module_sets() {
    let h = harness(config());
    assert!(!h.plugins.inject(wasm("echo", ECHO, Grants::default()), false).await.unwrap());
    let end = h.plugins.call("echo", json!({"n": 3})).await.unwrap();
    assert_eq!(end, End::Done { status: 0, result: Some(json!({"n": 3})) });
    assert!(h.plugins.inject(wasm("echo", ECHO, Grants::default()), false).await.unwrap(), "re-inject is an update");
    assert_eq!(h.plugins.registry().unwrap()["echo"].status, "updated");
}

/// A board holds at most `max_plugins`: another is refused (nothing written), an update of
/// one it holds is not, and removing one makes room.
#[tokio::test]
async fn a_board_holds_at_most_max_plugins() {
    let h = harness(PluginsConfig { max_plugins: 2, ..config() });
    for uuid in ["a", "b"] {
        h.plugins.inject(wasm(uuid, ECHO, Grants::default()), false).await.unwrap();
    }
    let e = h.plugins.inject(wasm("c", ECHO, Grants::default()), false).await.unwrap_err().to_string();
    assert!(e.contains("plugins.max_plugins = 2"), "{e}");
    assert!(!h.store.path("plugins/c.code").exists() && !h.plugins.registry().unwrap().contains_key("c"));
    assert!(h.plugins.inject(wasm("b", ECHO, Grants::default()), false).await.unwrap(), "an update");
    assert!(h.plugins.remove("a").await.unwrap());
    h.plugins.inject(wasm("c", ECHO, Grants::default()), false).await.unwrap();
    assert_eq!(h.plugins.registry().unwrap().len(), 2);
}

#[tokio::test]
async fn runaway_and_trapping_plugins_are_stopped_and_reported() {
    let h = harness(config());
    h.plugins.inject(wasm("loop", RUNAWAY, Grants::default()), false).await.unwrap();
    h.plugins.inject(wasm("trap", TRAP, Grants::default()), false).await.unwrap();
    let End::Failed(why) = h.plugins.call("loop", json!({})).await.unwrap() else { panic!("not stopped") };
    assert!(why.contains("fuel"), "{why}");
    let End::Failed(why) = h.plugins.call("trap", json!({})).await.unwrap() else { panic!("no trap") };
    assert!(why.contains("trapped"), "{why}");
    // With fuel to burn, the call's time limit stops it.
    let h = harness(PluginsConfig { fuel: u64::MAX / 4, call_timeout_s: 1, ..config() });
    h.plugins.inject(wasm("loop", RUNAWAY, Grants::default()), false).await.unwrap();
    let End::Failed(why) = h.plugins.call("loop", json!({})).await.unwrap() else { panic!("not stopped") };
    assert!(why.contains("time limit"), "{why}");
}

/// Loops on `sleep_ms(0)` forever: it sleeps no time at all.
const YIELDER: &str = r#"(module
  (import "s4t" "sleep_ms" (func $sleep (param i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (call $sleep (i32.const 0)) (br $l)) (i32.const 0)))"#;

/// `sleep_ms(0)` earns no fuel: a plugin calling it in a loop burns its budget and is stopped
/// (instead of spinning a core until its deadline, or for ever once started).
#[tokio::test]
async fn sleeping_no_time_earns_no_fuel() {
    // This loop spends its CPU in host calls, little of it in fuel: held to a share of a core,
    // a debug build would reach the call's time limit first. A whole core is no limit.
    let mut h = harness(PluginsConfig { cpu_share: 1.0, ..config() });
    h.plugins.inject(wasm("yield", YIELDER, Grants::default()), false).await.unwrap();
    let End::Failed(why) = h.plugins.call("yield", json!({})).await.unwrap() else { panic!("not stopped") };
    assert!(why.contains("used all its fuel"), "{why}");
    // Started, it ends by itself the same way.
    h.plugins.start("yield", None).await.unwrap();
    let t = within("end event", h.telemetry.recv()).await.unwrap();
    assert_eq!(t.data["event"], "ended");
    let status = h.plugins.status("yield").unwrap();
    assert!(status.contains("used all its fuel"), "{status}");
}

/// Publishes 100 messages of 1000 bytes of JSON (a string of 998 `a`) at once; returns how
/// many were taken.
const FLOODER: &str = r#"(module
  (import "s4t" "publish" (func $pub (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) (local $i i32) (local $ok i32)
    (loop $fill
      (i32.store8 (local.get $i) (i32.const 97))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (i32.const 998))))
    (local.set $i (i32.const 0))
    (loop $flood
      (if (i32.eqz (call $pub (i32.const 0) (i32.const 998)))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $flood (i32.lt_u (local.get $i) (i32.const 100))))
    (local.get $ok)))"#;

/// A run publishes at most its burst at once, then its rate: the rest is dropped, and the
/// plugin told so.
#[tokio::test]
async fn telemetry_is_held_to_its_rate() {
    // 1 byte a second: nothing measurable refills during the run, so exactly the burst passes:
    // 4 messages of 1000 bytes of data, each with its uuid, name, board and framing (1112).
    let mut h = harness(PluginsConfig { telemetry_bytes_per_s: 1, telemetry_burst_bytes: 4500, ..config() });
    h.plugins.inject(wasm("flood", FLOODER, Grants::default()), false).await.unwrap();
    assert_eq!(h.plugins.call("flood", json!({})).await.unwrap(), End::Done { status: 4, result: None });
    let mut got = 0;
    while let Ok(t) = h.telemetry.try_recv() {
        assert_eq!(t.data.as_str().map(str::len), Some(998));
        got += 1;
    }
    assert_eq!(got, 4);
    // Each run has a bucket of its own.
    assert_eq!(h.plugins.call("flood", json!({})).await.unwrap(), End::Done { status: 4, result: None });
    let defaults = PluginsConfig::default();
    assert_eq!((defaults.telemetry_bytes_per_s, defaults.telemetry_burst_bytes), (16 * 1024, 64 * 1024));
    let zero = PluginsConfig { telemetry_bytes_per_s: 0, ..PluginsConfig::default() };
    assert!(zero.validate().unwrap_err().to_string().contains("plugins.telemetry_bytes_per_s"));
}

/// Telemetry is charged what it puts on the wire, not its data alone: a plugin publishing
/// `1` over and over gets no more onto the wire than its burst (and one message).
#[test]
fn telemetry_is_charged_what_it_puts_on_the_wire() {
    let burst = 4096;
    let limits = PluginsConfig { telemetry_bytes_per_s: 1, telemetry_burst_bytes: burst, ..config() };
    let (tx, mut rx) = mpsc::channel(100_000);
    let job = run::Job {
        uuid: "u1".into(),
        name: "a-name".into(),
        board: "b1".into(),
        params: json!({}),
        grants: Grants::default(),
        mode: Mode::Start,
        signal: Arc::new(StopSignal::default()),
        hal: Hal::sim(32),
        limits: limits.clone(),
        telemetry: tx,
        rate: run::TelemetryRate::new(&limits),
    };
    let accepted = (0..10_000).filter(|_| job.publish(json!(1))).count() as u64;
    // What the session sends for one: its payload on the board's telemetry topic, in a
    // PUBLISH (a WebSocket frame header comes on top).
    let t = rx.try_recv().unwrap();
    let payload = json!({"plugin": t.plugin, "name": t.name, "data": t.data});
    let publish = json!([16, 1u64 << 52, {}, "board.b1.telemetry", [payload]]);
    let wire = serde_json::to_vec(&publish).unwrap().len() as u64;
    assert!(accepted > 0);
    assert!(
        accepted * wire <= burst + wire,
        "{accepted} messages of {wire} bytes on the wire passed a burst of {burst} bytes"
    );
}

/// A name goes with every telemetry message: at most 255 bytes.
#[tokio::test]
async fn a_plugin_name_is_at_most_255_bytes() {
    let h = harness(config());
    let mut p = wasm("echo", ECHO, Grants::default());
    p.name = "n".repeat(MAX_NAME + 1);
    let err = h.plugins.inject(p.clone(), false).await.unwrap_err().to_string();
    assert!(err.contains("at most 255 bytes"), "{err}");
    assert!(h.plugins.registry().unwrap().is_empty());
    p.name = "é".repeat(MAX_NAME / 2);
    h.plugins.inject(p, false).await.unwrap();
}

/// Start parameters are saved in the plugin's entry: larger than 64 KiB they are refused,
/// by a start or a reboot, naming the limit, and nothing changes (a reboot does not stop the
/// run either).
#[tokio::test]
async fn start_parameters_over_the_limit_are_refused_and_not_saved() {
    let h = harness(config());
    let mut p = wasm("ticker", TICKER, Grants::default());
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    let big = json!({"data": "x".repeat(100 * 1024)});
    let before = h.plugins.registry().unwrap()["ticker"].clone();
    let err = h.plugins.start("ticker", Some(big.clone())).await.unwrap_err().to_string();
    assert!(err.contains("65536"), "{err}");
    assert_eq!(h.plugins.registry().unwrap()["ticker"], before);
    assert_eq!(h.plugins.status("ticker").unwrap(), "DEAD");
    let fits = json!({"data": "x".repeat(MAX_START_PARAMS - 20)});
    h.plugins.start("ticker", Some(fits.clone())).await.unwrap();
    let before = h.plugins.registry().unwrap()["ticker"].clone();
    assert_eq!(before.params, fits);
    let err = h.plugins.reboot("ticker", Some(big)).await.unwrap_err().to_string();
    assert!(err.contains("65536"), "{err}");
    assert_eq!(h.plugins.registry().unwrap()["ticker"], before);
    assert_eq!(h.plugins.status("ticker").unwrap(), "ALIVE");
    assert!(within("stop", h.plugins.stop("ticker")).await.unwrap());
    // Nested deep with many short values, they take about their size in plugins.json too
    // (indented, they would take megabytes).
    let mut deep = Value::Array(vec![json!(0); 25_000]);
    for _ in 0..100 {
        deep = Value::Array(vec![deep]);
    }
    h.plugins.start("ticker", Some(deep.clone())).await.unwrap();
    assert_eq!(h.plugins.registry().unwrap()["ticker"].params, deep);
    let saved = std::fs::metadata(h.store.path(PLUGINS_FILE)).unwrap().len();
    assert!(saved < MAX_START_PARAMS as u64 + 1024, "plugins.json is {saved} bytes");
    assert!(within("stop", h.plugins.stop("ticker")).await.unwrap());
}

/// Sleeps 1 ms, then works (counts down from 1,000,000), for ever: every sleep earns back the
/// fuel of the work after it.
const SLEEP_AND_SPIN: &str = r#"(module
  (import "s4t" "sleep_ms" (func $sleep (param i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) (local $i i32)
    (loop $l
      (call $sleep (i32.const 1))
      (local.set $i (i32.const 1000000))
      (loop $spin
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br_if $spin (local.get $i)))
      (br $l))
    (i32.const 0)))"#;

/// CPU time of this process's thread named `name` (`/proc/self/task/*/comm`), if it runs.
fn thread_cpu(name: &str) -> Option<Duration> {
    // SAFETY: sysconf only reads a system constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&t| t > 0)?;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // After the name: state is the first field, utime and stime the 12th and 13th.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            return Some(Duration::from_millis(ticks * 1000 / hz));
        }
    }
    None
}

/// A plugin that sleeps a little between bursts of work earns all its fuel back, so fuel does
/// not bound its CPU; its CPU share does. It keeps running (made to wait, not stopped), and
/// its thread uses at most its share of the time since it started, plus the burst (1 s of
/// CPU, `wasm::CPU_BURST`) and a margin. Without the share it uses most of a core.
#[tokio::test]
async fn a_plugin_that_sleeps_between_work_is_held_to_its_cpu_share() {
    let share = 0.05;
    let h = harness(PluginsConfig { fuel: u64::MAX / 4, cpu_share: share, ..config() });
    let mut p = wasm("cpu", SLEEP_AND_SPIN, Grants::default());
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    let started = std::time::Instant::now();
    h.plugins.start("cpu", None).await.unwrap();
    // Long enough that the burst does not hide the rest: unbounded, it uses a core (half of
    // one on a loaded machine), 2.5 s or more; bounded, 1.25 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = thread_cpu("plugin-cpu").expect("the plugin's thread");
    let elapsed = started.elapsed();
    assert_eq!(h.plugins.status("cpu").unwrap(), "ALIVE");
    // The margin: the slice or the work run past the last reading of the clock (about 0.1 s
    // of CPU in a debug build), and clock ticks.
    let bound = elapsed.mul_f64(share) + Duration::from_secs(1) + Duration::from_millis(400);
    eprintln!("the plugin used {used:?} of CPU in {elapsed:?} (bound {bound:?})");
    assert!(used <= bound, "the plugin used {used:?} of CPU in {elapsed:?}, more than {bound:?}");
    assert!(within("stop", h.plugins.stop("cpu")).await.unwrap());
    assert_eq!(PluginsConfig::default().cpu_share, 0.25);
    for bad in [0.0, 1.5, f64::NAN] {
        let e = PluginsConfig { cpu_share: bad, ..PluginsConfig::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("plugins.cpu_share"), "{e}");
    }
}

/// The agent runs a current-thread runtime: a busy plugin must not hold it.
#[tokio::test]
async fn a_busy_plugin_does_not_block_the_event_loop() {
    let h = harness(PluginsConfig { fuel: u64::MAX / 4, call_timeout_s: 3, ..config() });
    h.plugins.inject(wasm("loop", RUNAWAY, Grants::default()), false).await.unwrap();
    h.plugins.inject(wasm("echo", ECHO, Grants::default()), false).await.unwrap();
    let busy = h.plugins.call("loop", json!({}));
    tokio::pin!(busy);
    // Another call runs to its end while the runaway one is still going.
    let other = async { h.plugins.call("echo", json!(1)).await.unwrap() };
    tokio::select! {
        _ = &mut busy => panic!("the runaway plugin ended before the other call answered"),
        end = other => assert_eq!(end, End::Done { status: 0, result: Some(json!(1)) }),
    }
    assert!(matches!(within("runaway", busy).await.unwrap(), End::Failed(_)));
}

#[tokio::test]
async fn hardware_needs_a_grant_within_what_the_board_allows() {
    let h = harness(config());
    h.plugins.inject(wasm("nogrant", SET_GPIO17, Grants::default()), false).await.unwrap();
    let end = h.plugins.call("nogrant", json!({})).await.unwrap();
    assert_eq!(end, End::Done { status: 1, result: Some(json!("GPIO line GPIO17 is not granted to this plugin")) });
    assert_eq!(h.hal.gpio.read("GPIO17").unwrap(), 0, "the line was touched");
    h.plugins.inject(wasm("granted", SET_GPIO17, gpio17()), false).await.unwrap();
    assert_eq!(h.plugins.call("granted", json!({})).await.unwrap(), End::Done { status: 0, result: None });
    assert_eq!(h.hal.gpio.read("GPIO17").unwrap(), 1);
    let greedy = Grants { gpio: vec!["GPIO4".into()], i2c: vec![] };
    let err = h.plugins.inject(wasm("greedy", SET_GPIO17, greedy), false).await.unwrap_err().to_string();
    assert!(err.contains("GPIO4") && err.contains("not allowed"), "{err}");
    let i2c = Grants { gpio: vec![], i2c: vec![I2cGrant { bus: 1, address: 0x49 }] };
    assert!(h.plugins.inject(wasm("i2c", ECHO, i2c), false).await.is_err());
}

#[tokio::test]
async fn bad_modules_and_disabled_kinds_are_refused_at_injection() {
    let h = harness(PluginsConfig { process: false, python: false, ..config() });
    let mut bad = wasm("bad", ECHO, Grants::default());
    bad.code = b"\0asm\x01\0\0\0garbage".to_vec();
    assert!(h.plugins.inject(bad, false).await.unwrap_err().to_string().contains("not a valid WebAssembly"));
    let wasi = r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(h.plugins.inject(wasm("wasi", wasi, Grants::default()), false).await.is_err());
    let mut p = wasm("p", ECHO, Grants::default());
    p.kind = PluginKind::Process;
    assert!(h.plugins.inject(p.clone(), false).await.unwrap_err().to_string().contains("plugins.process"));
    p.kind = PluginKind::Python;
    assert!(h.plugins.inject(p, false).await.unwrap_err().to_string().contains("plugins.python"));
    assert!(h.plugins.registry().unwrap().is_empty());
    // Memory beyond the limit fails the run, not the agent.
    h.plugins.inject(wasm("huge", HUGE_MEMORY, Grants::default()), false).await.unwrap();
    assert!(matches!(h.plugins.call("huge", json!({})).await.unwrap(), End::Failed(_)));
}

#[tokio::test]
async fn started_plugins_publish_stop_and_come_back_onboot() {
    let mut h = harness(config());
    let mut p = wasm("ticker", TICKER, Grants::default());
    p.callable = false;
    h.plugins.inject(p, true).await.unwrap();
    h.plugins.start("ticker", Some(json!({"every": 10}))).await.unwrap();
    assert_eq!(h.plugins.start("ticker", None).await.unwrap_err().to_string(), "ALREADY STARTED!");
    let t = within("telemetry", h.telemetry.recv()).await.unwrap();
    assert_eq!((t.plugin.as_str(), t.data.clone()), ("ticker", json!({"tick": 1})));
    assert_eq!(h.plugins.status("ticker").unwrap(), "ALIVE");
    // Sleeping refills the fuel: it runs far past one call's budget.
    for _ in 0..20 {
        within("telemetry", h.telemetry.recv()).await.unwrap();
    }
    // A reboot of the agent: a new manager on the same state starts it again.
    h.plugins.close_all().await;
    assert_eq!(h.plugins.status("ticker").unwrap(), "DEAD");
    let (tx, mut telemetry) = mpsc::channel(16);
    let again = Arc::new(PluginManager::new(
        h.store.clone(),
        config(),
        h.hal.clone(),
        "b1".into(),
        tx,
        CancellationToken::new(),
    ));
    assert_eq!(again.restore_onboot().await, 0);
    assert_eq!(again.status("ticker").unwrap(), "ALIVE");
    assert_eq!(again.registry().unwrap()["ticker"].params, json!({"every": 10}));
    within("telemetry after reboot", telemetry.recv()).await.unwrap();
    assert!(within("stop", again.stop("ticker")).await.unwrap());
    assert_eq!(again.status("ticker").unwrap(), "DEAD");
    assert!(!again.stop("ticker").await.unwrap(), "a second stop finds nothing running");
    assert!(again.remove("ticker").await.unwrap());
    assert!(again.status("ticker").is_err());
    assert!(!again.remove("ticker").await.unwrap());
}

#[tokio::test]
async fn a_started_runaway_is_stopped_and_reported_dead() {
    let mut h = harness(config());
    let mut p = wasm("loop", RUNAWAY, Grants::default());
    p.callable = false;
    h.plugins.inject(p, true).await.unwrap();
    h.plugins.start("loop", None).await.unwrap();
    let t = within("end event", h.telemetry.recv()).await.unwrap();
    assert_eq!(t.data["event"], "ended");
    let status = h.plugins.status("loop").unwrap();
    assert!(status.starts_with("DEAD: ") && status.contains("fuel"), "{status}");
    assert_eq!(h.plugins.registry().unwrap()["loop"].status, "failed", "a failed plugin is not restarted at boot");
}

#[tokio::test]
async fn only_max_running_runs_at_once() {
    let h = harness(PluginsConfig { max_running: 1, ..config() });
    let mut p = wasm("ticker", TICKER, Grants::default());
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    h.plugins.inject(wasm("echo", ECHO, Grants::default()), false).await.unwrap();
    h.plugins.start("ticker", None).await.unwrap();
    let err = h.plugins.call("echo", json!({})).await.unwrap_err().to_string();
    assert!(err.contains("max_running"), "{err}");
    h.plugins.stop("ticker").await.unwrap();
    assert!(matches!(h.plugins.call("echo", json!({})).await.unwrap(), End::Done { .. }));
}

fn script(uuid: &str, text: &str) -> NewPlugin {
    NewPlugin {
        uuid: uuid.into(),
        name: uuid.into(),
        kind: PluginKind::Process,
        callable: true,
        grants: Grants::default(),
        code: text.as_bytes().to_vec(),
    }
}

#[tokio::test]
async fn process_plugins_get_json_on_stdin_and_answer_on_stdout() {
    if !processes_runnable() {
        return;
    }
    let h = harness(PluginsConfig { call_timeout_s: 1, max_output_bytes: 100, ..config() });
    h.plugins.inject(script("echo", "#!/bin/sh\nread p\necho \"{\\\"got\\\": $p}\"\n"), false).await.unwrap();
    let end = h.plugins.call("echo", json!({"x": 1})).await.unwrap();
    assert_eq!(end, End::Done { status: 0, result: Some(json!({"got": {"x": 1}})) });
    h.plugins.inject(script("fail", "#!/bin/sh\necho broken >&2\nexit 3\n"), false).await.unwrap();
    assert_eq!(
        h.plugins.call("fail", json!({})).await.unwrap(),
        End::Done { status: 3, result: Some(json!("broken")) }
    );
    h.plugins.inject(script("slow", "#!/bin/sh\nexec sleep 60\n"), false).await.unwrap();
    let End::Failed(why) = h.plugins.call("slow", json!({})).await.unwrap() else { panic!("no timeout") };
    assert!(why.contains("time limit"), "{why}");
    h.plugins.inject(script("chatty", "#!/bin/sh\nhead -c 1000 /dev/zero\n"), false).await.unwrap();
    let End::Failed(why) = h.plugins.call("chatty", json!({})).await.unwrap() else { panic!("no limit") };
    assert!(why.contains("more than 100 bytes"), "{why}");
    if nix::unistd::Uid::effective().is_root() {
        h.plugins.inject(script("who", "#!/bin/sh\nid -u\n"), false).await.unwrap();
        let end = h.plugins.call("who", json!({})).await.unwrap();
        assert_ne!(end, End::Done { status: 0, result: Some(json!(0)) }, "a process plugin ran as root");
    }
}

#[tokio::test]
async fn started_process_plugins_stream_lines_and_stop_on_sigterm() {
    if !processes_runnable() {
        return;
    }
    let mut h = harness(config());
    let mut p = script("lines", "#!/bin/sh\nwhile true; do echo '{\"n\":1}'; sleep 0.05; done\n");
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    h.plugins.start("lines", None).await.unwrap();
    let t = within("a line", h.telemetry.recv()).await.unwrap();
    assert_eq!(t.data, json!({"n": 1}));
    assert!(within("stop", h.plugins.stop("lines")).await.unwrap());
    assert_eq!(h.plugins.status("lines").unwrap(), "DEAD");
}

/// A started plugin that logs 64 MiB to stderr: the agent keeps only its end, and reports it
/// when the plugin fails.
#[tokio::test]
async fn a_started_process_plugin_keeps_only_the_end_of_its_stderr() {
    if !processes_runnable() {
        return;
    }
    let mut h = harness(config());
    let mut p = script(
        "noisy",
        "#!/bin/sh\nhead -c 67108864 /dev/zero | tr '\\0' x >&2\necho >&2\necho 'the real error' >&2\nexit 3\n",
    );
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    h.plugins.start("noisy", None).await.unwrap();
    let t = within("end event", h.telemetry.recv()).await.unwrap();
    assert_eq!((t.data["event"].as_str(), t.data["status"].as_str()), (Some("ended"), Some("failed")), "{}", t.data);
    let reason = t.data["reason"].as_str().unwrap();
    assert!(reason.ends_with("xxx\nthe real error") && reason.len() < 4096, "{} bytes", reason.len());
    let status = h.plugins.status("noisy").unwrap();
    assert!(status.starts_with("DEAD: ") && status.contains("the real error") && status.len() < 4200, "{status:.80}");
}

/// A failed call answers with the end of its stderr, where the error is, however long it is.
#[tokio::test]
async fn a_failed_call_answers_with_the_end_of_its_stderr() {
    if !processes_runnable() {
        return;
    }
    let h = harness(PluginsConfig { call_timeout_s: 20, ..config() });
    let text = "#!/bin/sh\nhead -c 67108864 /dev/zero | tr '\\0' x >&2\necho >&2\necho 'the real error' >&2\nexit 1\n";
    h.plugins.inject(script("noisy", text), false).await.unwrap();
    let End::Done { status: 1, result: Some(Value::String(err)) } = h.plugins.call("noisy", json!({})).await.unwrap()
    else {
        panic!("no error text")
    };
    assert!(err.ends_with("xxx\nthe real error") && err.len() <= 4096, "{} bytes", err.len());
}

/// A start whose state cannot be saved (full disk) fails and leaves the plugin stopped, not
/// "ALREADY STARTED!" for good.
#[tokio::test]
async fn a_start_that_cannot_be_saved_leaves_the_plugin_startable() {
    let h = harness(config());
    let mut p = wasm("ticker", TICKER, Grants::default());
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    // Where the save writes its temporary file, a directory: the save fails. (Every name it
    // may take is one: writes of other tests in this process move the numbering on.)
    let obstacles = crate::state::next_tmp_paths(&h.store.path(PLUGINS_FILE), 256);
    for obstacle in &obstacles {
        std::fs::create_dir(obstacle).unwrap();
    }
    let err = h.plugins.start("ticker", None).await.unwrap_err().to_string();
    assert!(err.contains(PLUGINS_FILE), "{err}");
    for obstacle in &obstacles {
        std::fs::remove_dir(obstacle).unwrap();
    }
    assert_eq!(h.plugins.status("ticker").unwrap(), "DEAD");
    assert_eq!(h.plugins.registry().unwrap()["ticker"].status, "injected");
    h.plugins.start("ticker", None).await.unwrap();
    assert_eq!(h.plugins.status("ticker").unwrap(), "ALIVE");
    let err = h.plugins.reboot("ticker", None).await;
    assert!(err.is_ok(), "{err:?}");
    assert!(within("stop", h.plugins.stop("ticker")).await.unwrap());
}

/// An injection whose entry cannot be saved (full disk) after its code was written leaves
/// neither code running with the other's grants: the old entry granted GPIO17 to harmless
/// code, the new code drives GPIO17 and was injected without the grant; calls are refused
/// until an injection completes, and the line is never touched.
#[tokio::test]
async fn code_whose_entry_was_not_saved_does_not_run_with_the_old_grants() {
    let h = harness(config());
    h.plugins.inject(wasm("p", ECHO, gpio17()), false).await.unwrap();
    let obstacles = crate::state::next_tmp_paths(&h.store.path(PLUGINS_FILE), 256);
    for obstacle in &obstacles {
        std::fs::create_dir(obstacle).unwrap();
    }
    let err = h.plugins.inject(wasm("p", SET_GPIO17, Grants::default()), false).await.unwrap_err().to_string();
    assert!(err.contains(PLUGINS_FILE), "{err}");
    for obstacle in &obstacles {
        std::fs::remove_dir(obstacle).unwrap();
    }
    assert_eq!(h.plugins.registry().unwrap()["p"].grants, gpio17(), "the old entry stays");
    let end = h.plugins.call("p", json!({})).await.unwrap();
    assert!(matches!(&end, End::Failed(e) if e.contains("does not match its entry")), "{end:?}");
    assert_eq!(h.hal.gpio.read("GPIO17").unwrap(), 0, "the new code ran with the old grant");
    h.plugins.inject(wasm("p", SET_GPIO17, Grants::default()), false).await.unwrap();
    let end = h.plugins.call("p", json!({})).await.unwrap();
    assert_eq!(end, End::Done { status: 1, result: Some(json!("GPIO line GPIO17 is not granted to this plugin")) });
}

/// The board owner's `[plugins]` bind the plugins injected before they changed: a line taken
/// out of `allow_gpio` is no longer driven by a plugin granted it, and process plugins no
/// longer run once `process` is off, at a call or a start (also the one at boot). They were
/// checked at injection only.
#[tokio::test]
async fn narrowed_plugin_rules_bind_plugins_injected_before() {
    let h = harness(config());
    h.plugins.inject(wasm("g", SET_GPIO17, gpio17()), true).await.unwrap();
    let script_ok = processes_runnable();
    if script_ok {
        h.plugins.inject(script("sh", "#!/bin/sh\necho '{}'\n"), false).await.unwrap();
    }
    // The agent restarts with narrower rules, over the same state.
    let narrow = PluginsConfig { allow_gpio: vec![], process: false, ..config() };
    let (tx, _telemetry) = mpsc::channel(16);
    let again =
        Arc::new(PluginManager::new(h.store.clone(), narrow, h.hal.clone(), "b1".into(), tx, CancellationToken::new()));
    let err = again.call("g", json!({})).await.unwrap_err().to_string();
    assert!(err.contains("GPIO17") && err.contains("not allowed"), "{err}");
    let err = again.start("g", None).await.unwrap_err().to_string();
    assert!(err.contains("GPIO17"), "{err}");
    assert_eq!(h.hal.gpio.read("GPIO17").unwrap(), 0, "the line was driven");
    if script_ok {
        let err = again.call("sh", json!({})).await.unwrap_err().to_string();
        assert!(err.contains("plugins.process"), "{err}");
    }
}

/// A started plugin that ends by itself saves its status while injections save theirs: no
/// change is lost (neither an injected plugin, nor the end: a plugin left `operative` would
/// start again at every boot). Each round the plugin ends amid a series of injections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_ending_by_itself_during_injections_loses_no_change() {
    if !processes_runnable() {
        return;
    }
    const ROUNDS: usize = 25;
    const INJECTIONS: usize = 8;
    let mut h = harness(PluginsConfig { max_plugins: 1 + ROUNDS * INJECTIONS, ..config() });
    let mut quick = script("quick", "#!/bin/sh\nexit 0\n");
    quick.callable = false;
    h.plugins.inject(quick, true).await.unwrap();
    let mut injected = Vec::new();
    for round in 0..ROUNDS {
        h.plugins.start("quick", None).await.unwrap();
        let names: Vec<String> = (0..INJECTIONS).map(|i| format!("p{round}-{i}")).collect();
        let injections = async {
            for name in &names {
                h.plugins.inject(script(name, "#!/bin/sh\n"), false).await.unwrap();
            }
        };
        let ((), end) = tokio::join!(injections, within("end event", h.telemetry.recv()));
        assert_eq!(end.unwrap().data["status"], "finished");
        injected.extend(names);
        let reg = h.plugins.registry().unwrap();
        let lost: Vec<_> = injected.iter().filter(|n| !reg.contains_key(*n)).collect();
        assert!(lost.is_empty(), "round {round}: injected plugins lost: {lost:?}");
        assert_eq!(reg["quick"].status, "finished", "round {round}: the end of the plugin was lost");
    }
}

/// A process plugin that never reads its parameters, started with more than a pipe holds: a
/// stop ends it (its process is gone) and frees its slot for the next run.
#[tokio::test]
async fn a_process_plugin_that_never_reads_its_parameters_is_stopped() {
    if !processes_runnable() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let h = harness(PluginsConfig { max_running: 1, ..config() });
    // The plugin tells its pid through a FIFO; open to all (run by root, it runs as nobody).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pid_pipe = dir.path().join("pid");
    nix::unistd::mkfifo(&pid_pipe, nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::set_permissions(&pid_pipe, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut p = script("deaf", &format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pid_pipe.display()));
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    // A start takes at most 64 KiB of parameters, about what a pipe holds; saved by an older
    // agent, they can be larger.
    let mut reg = h.plugins.registry().unwrap();
    reg.get_mut("deaf").unwrap().params = json!({"data": "x".repeat(100_000)});
    h.store.save(PLUGINS_FILE, &reg).unwrap();
    h.plugins.start("deaf", None).await.unwrap();
    // Read on a thread of its own: a plugin that never writes leaves no blocked runtime thread.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || tx.send(std::fs::read_to_string(&pid_pipe).unwrap()));
    let pid: i32 = within("the plugin's pid", rx).await.unwrap().trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    assert_eq!(h.plugins.status("deaf").unwrap(), "ALIVE");
    assert!(within("stop", h.plugins.stop("deaf")).await.unwrap());
    assert_eq!(nix::sys::signal::kill(pid, None), Err(nix::errno::Errno::ESRCH), "the stopped plugin still runs");
    assert_eq!(h.plugins.status("deaf").unwrap(), "DEAD");
    // Its slot is free: the next run starts (max_running is 1).
    h.plugins.inject(script("echo", "#!/bin/sh\nread p\necho \"$p\"\n"), false).await.unwrap();
    assert_eq!(h.plugins.call("echo", json!(7)).await.unwrap(), End::Done { status: 0, result: Some(json!(7)) });
}

/// A name is free text: one with a NUL (refused at injection now, but saved by an older
/// agent) must not kill the agent when the plugin runs.
#[tokio::test]
async fn a_plugin_whose_name_holds_a_nul_runs_without_a_panic() {
    let h = harness(config());
    let mut bad = wasm("echo", ECHO, Grants::default());
    bad.name = "a\u{0}b".into();
    let err = h.plugins.inject(bad, false).await.unwrap_err().to_string();
    assert!(err.contains("control characters"), "{err}");
    h.plugins.inject(wasm("echo", ECHO, Grants::default()), false).await.unwrap();
    let mut p = wasm("ticker", TICKER, Grants::default());
    p.callable = false;
    h.plugins.inject(p, false).await.unwrap();
    let mut reg = h.plugins.registry().unwrap();
    for e in reg.values_mut() {
        e.name = "a\u{0}b".into();
    }
    h.store.save(PLUGINS_FILE, &reg).unwrap();
    let end = h.plugins.call("echo", json!({"n": 1})).await.unwrap();
    assert_eq!(end, End::Done { status: 0, result: Some(json!({"n": 1})) });
    h.plugins.start("ticker", None).await.unwrap();
    assert_eq!(h.plugins.status("ticker").unwrap(), "ALIVE");
    assert!(within("stop", h.plugins.stop("ticker")).await.unwrap());
}

fn python_available() -> bool {
    std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
}

/// `plugins_examples/generics/echo.py` of the original lightning-rod 0.5.0, pickled as its
/// cloud does.
const ORIGINAL_ECHO: &str = r#"from iotronic_lightningrod.modules.plugins import Plugin
from oslo_log import log as logging
LOG = logging.getLogger(__name__)


class Worker(Plugin.Plugin):
    def __init__(self, uuid, name, q_result, params=None):
        super(Worker, self).__init__(uuid, name, q_result, params)

    def run(self):
        LOG.info("Input parameters: " + str(self.params['name']))
        self.q_result.put("ECHO RESULT: " + str(self.params['name']))
"#;

const ORIGINAL_RUNNER: &str = r#"from iotronic_lightningrod.modules.plugins import Plugin
import time


class Worker(Plugin.Plugin):
    def __init__(self, uuid, name, q_result=None, params=None):
        super(Worker, self).__init__(uuid, name, q_result, params)

    def run(self):
        while(self._is_running):
            time.sleep(0.05)
"#;

fn python(uuid: &str, source: &str, callable: bool) -> NewPlugin {
    let pickled = pickle0_encode(source);
    NewPlugin {
        uuid: uuid.into(),
        name: uuid.into(),
        kind: PluginKind::Python,
        callable,
        grants: Grants::default(),
        code: pickle0_decode(&pickled).unwrap().into_bytes(),
    }
}

#[tokio::test]
async fn original_python_plugins_keep_working() {
    if !python_available() {
        eprintln!("skipped: no python3 on this machine");
        return;
    }
    if !processes_runnable() {
        return;
    }
    let h = harness(config());
    h.plugins.inject(python("echo", ORIGINAL_ECHO, true), false).await.unwrap();
    let end = h.plugins.call("echo", json!({"name": "board"})).await.unwrap();
    assert_eq!(end, End::Done { status: 0, result: Some(Value::String("ECHO RESULT: board".into())) });
    h.plugins.inject(python("runner", ORIGINAL_RUNNER, false), false).await.unwrap();
    h.plugins.start("runner", None).await.unwrap();
    assert_eq!(h.plugins.status("runner").unwrap(), "ALIVE");
    assert!(within("stop", h.plugins.stop("runner")).await.unwrap());
}

/// A process plugin never runs as root, as the agent's own user, or as a user that does not
/// exist (it used to fall back to `nobody`): injection says why.
#[tokio::test]
async fn process_plugins_never_run_as_root_or_an_unknown_user() {
    if !processes_runnable() {
        return;
    }
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    for (run_as, why) in [("root", "root"), (me.as_str(), "root"), ("no-such-user-s4t", "not a user")] {
        let h = harness(PluginsConfig { run_as: run_as.into(), ..config() });
        let err = h.plugins.inject(script("who", "#!/bin/sh\nid -u\n"), false).await.unwrap_err().to_string();
        assert!(err.contains("plugins.run_as") && err.contains(why), "{run_as}: {err}");
        let mut p = python("py", ORIGINAL_ECHO, true);
        p.uuid = "py".into();
        let err = h.plugins.inject(p, false).await.unwrap_err().to_string();
        assert!(err.contains("plugins.run_as"), "{run_as}: {err}");
    }
}

const UNPRIVILEGED: &str = "S4T_TEST_UNPRIVILEGED";

/// An agent that cannot switch to another user (not root, no CAP_SETUID) refuses process and
/// Python plugins: at injection, and at call and start of one injected earlier (it would run
/// them as itself, with access to the board's secret). As root, the test runs itself again as
/// an unprivileged uid.
#[tokio::test]
async fn an_agent_that_cannot_switch_users_refuses_process_plugins() {
    use std::os::unix::process::CommandExt;
    if nix::unistd::geteuid().is_root() && std::env::var_os(UNPRIVILEGED).is_none() {
        let run = |exe: &std::path::Path| {
            std::process::Command::new(exe)
                .args([
                    "plugins::tests::an_agent_that_cannot_switch_users_refuses_process_plugins",
                    "--exact",
                    "--nocapture",
                ])
                .env(UNPRIVILEGED, "1")
                .env("TMPDIR", "/tmp")
                .uid(65533)
                .gid(65533)
                .output()
        };
        let exe = std::env::current_exe().unwrap();
        let copy = tempfile::Builder::new().prefix("s4t-test-").tempdir_in("/tmp").unwrap();
        let out = match run(&exe) {
            // A target directory the unprivileged uid cannot reach: a copy of the binary it can.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
                let exe = copy.path().join("tests");
                std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
                run(&exe)
            }
            other => other,
        }
        .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "unprivileged run: {text}");
        return;
    }
    assert!(!nix::unistd::geteuid().is_root(), "{UNPRIVILEGED} is set, yet this runs as root");
    let h = harness(config());
    let err = h.plugins.inject(script("who", "#!/bin/sh\nid -u\n"), false).await.unwrap_err().to_string();
    assert!(err.contains("cannot switch") && err.contains("CAP_SETUID"), "{err}");
    // Injected while the agent could (or by an older agent): still refused.
    let mut p = script("who", "#!/bin/sh\nid -u\n");
    p.callable = true;
    let code = h.store.path(CODE_DIR);
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("who.code"), &p.code).unwrap();
    let entry = PluginEntry {
        name: "who".into(),
        kind: PluginKind::Process,
        callable: true,
        onboot: false,
        grants: Grants::default(),
        status: "injected".into(),
        params: Value::Null,
        injected_at: String::new(),
        updated_at: String::new(),
        code_sha256: None,
    };
    h.store.save(PLUGINS_FILE, &Registry::from([("who".to_owned(), entry)])).unwrap();
    let err = h.plugins.call("who", json!({})).await.unwrap_err().to_string();
    assert!(err.contains("cannot switch"), "{err}");
    let err = h.plugins.start("who", None).await.unwrap_err().to_string();
    assert!(err.contains("cannot switch"), "{err}");
    assert_eq!(h.plugins.status("who").unwrap(), "DEAD");
}

/// Whether process `pid` has ended (gone, or a zombie waiting for its parent).
fn ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (bounded) for every process of `pids` to end; kills and returns those still running.
async fn survivors(pids: &[i32]) -> Vec<i32> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|&p| ended(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<i32> = pids.iter().copied().filter(|&p| !ended(p)).collect();
    for &p in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
    }
    left
}

/// Forks off two processes that leave the plugin's process group and session (one with
/// `setsid`, one double-forked and orphaned at once, its output closed), each printing its pid
/// as `{"pid": N}` on stdout, then prints its own and sleeps.
const ESCAPER: &str = r#"#!/bin/sh
setsid sh -c 'echo "{\"pid\": $$}"; exec sleep 1000' &
( setsid sh -c 'echo "{\"pid\": $$}"; exec sleep 1000 >/dev/null 2>&1 </dev/null' & )
echo "{\"pid\": $$}"
exec sleep 1000
"#;

/// A started plugin whose processes leave its process group and session: stop and remove
/// still end every one of them.
#[tokio::test]
async fn stop_and_remove_end_processes_that_left_the_plugins_group() {
    if !processes_runnable() {
        return;
    }
    let mut h = harness(config());
    for how in ["stop", "remove"] {
        let mut p = script("escaper", ESCAPER);
        p.callable = false;
        h.plugins.inject(p, false).await.unwrap();
        h.plugins.start("escaper", None).await.unwrap();
        let mut pids = Vec::new();
        while pids.len() < 3 {
            let t = within("the plugin's pids", h.telemetry.recv()).await.unwrap();
            pids.push(t.data["pid"].as_i64().unwrap_or_else(|| panic!("{}", t.data)) as i32);
        }
        assert!(pids.iter().all(|&p| !ended(p)), "{pids:?}");
        match how {
            "stop" => assert!(within("stop", h.plugins.stop("escaper")).await.unwrap()),
            _ => assert!(within("remove", h.plugins.remove("escaper")).await.unwrap()),
        }
        assert_eq!(survivors(&pids).await, Vec::<i32>::new(), "{how}: processes of the plugin survived");
    }
}

/// A call's plugin ends while a process it started keeps its stdout open: the call answers
/// when the plugin ends (not at its time limit), and that process is ended too.
#[tokio::test]
async fn a_call_ends_with_its_plugin_and_so_do_its_background_processes() {
    use std::os::unix::fs::PermissionsExt;
    if !processes_runnable() {
        return;
    }
    let h = harness(PluginsConfig { call_timeout_s: 20, ..config() });
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = dir.path().join("bg");
    let text = format!(
        "#!/bin/sh\nsh -c 'echo $$ > {f}; exec sleep 1000' &\nuntil [ -s {f} ]; do sleep 0.01; done\necho 42\n",
        f = file.display()
    );
    h.plugins.inject(script("bg", &text), false).await.unwrap();
    let started = std::time::Instant::now();
    let end = within("the call", h.plugins.call("bg", json!({}))).await.unwrap();
    assert_eq!(end, End::Done { status: 0, result: Some(json!(42)) });
    assert!(started.elapsed() < Duration::from_secs(10), "answered after {:?}", started.elapsed());
    let pid: i32 = std::fs::read_to_string(&file).unwrap().trim().parse().unwrap();
    assert_eq!(survivors(&[pid]).await, Vec::<i32>::new(), "the background process survived the call");
}

/// A call dropped half-way (the agent shuts down) ends the processes of its plugin, also
/// those outside its process group.
#[tokio::test]
async fn a_dropped_call_ends_every_process_of_its_plugin() {
    use std::os::unix::fs::PermissionsExt;
    if !processes_runnable() {
        return;
    }
    let shutdown = CancellationToken::new();
    let h = harness_until(config(), shutdown.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = dir.path().join("pid");
    let text = format!(
        "#!/bin/sh\nsetsid sh -c 'echo $$ > {f}.tmp; mv {f}.tmp {f}; exec sleep 1000' &\nexec sleep 1000\n",
        f = file.display()
    );
    h.plugins.inject(script("hang", &text), false).await.unwrap();
    let plugins = h.plugins.clone();
    let call = tokio::spawn(async move { plugins.call("hang", json!({})).await });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !file.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the plugin did not write its pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: i32 = std::fs::read_to_string(&file).unwrap().trim().parse().unwrap();
    shutdown.cancel();
    assert_eq!(within("the call", call).await.unwrap().unwrap(), End::Stopped);
    assert_eq!(survivors(&[pid]).await, Vec::<i32>::new(), "a process of the dropped call survived");
}

/// Process plugins run under the configured limits: processes of their user, file size, no
/// core dumps.
#[tokio::test]
async fn process_plugins_run_under_rlimits() {
    if !processes_runnable() {
        return;
    }
    let h = harness(PluginsConfig { max_processes: 100, max_file_bytes: 1 << 20, ..config() });
    h.plugins.inject(script("limits", "#!/bin/sh\ncat /proc/self/limits\n"), false).await.unwrap();
    let End::Done { status: 0, result: Some(Value::String(limits)) } =
        h.plugins.call("limits", json!({})).await.unwrap()
    else {
        panic!("no limits")
    };
    let limit = |name: &str| {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {limits}"));
        line[name.len()..].split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(limit("Max processes"), "100 100");
    assert_eq!(limit("Max file size"), "1048576 1048576");
    assert_eq!(limit("Max core file size"), "0 0");
}

/// The shipped unit keeps the capabilities process plugins need in its bounding set (without
/// them every process plugin is refused).
#[test]
fn the_shipped_unit_lets_the_agent_run_process_plugins() {
    let unit = include_str!("../../../systemd/lightning-rod.service");
    let set = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit has a CapabilityBoundingSet");
    let set: Vec<&str> = set.split_whitespace().collect();
    for (_, cap) in process::NEEDED_CAPS {
        assert!(set.contains(&cap), "{cap} is not in the unit's CapabilityBoundingSet {set:?}");
    }
}

/// Returns the JSON string `"<version>"`.
fn versioned(version: &str) -> String {
    format!(
        r#"(module
  (import "s4t" "set_result" (func $res (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\"{version}\"")
  (func (export "run") (result i32) (drop (call $res (i32.const 0) (i32.const {len}))) (i32.const 0)))"#,
        len = version.len() + 2
    )
}

struct Woken(tokio::sync::Notify);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

/// Polls `fut` until it has waited `waits` times for something that then completed, and
/// drops it there, as a dropped WAMP session drops a procedure's future; true when it
/// finished first.
async fn drop_after<F: std::future::Future>(fut: F, waits: usize) -> bool {
    let woken = Arc::new(Woken(tokio::sync::Notify::new()));
    let waker = std::task::Waker::from(woken.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    for _ in 0..waits {
        if fut.as_mut().poll(&mut cx).is_ready() {
            return true;
        }
        woken.0.notified().await;
    }
    false
}

/// Waits until nothing is changing plugins any more, in a task or a blocking write.
async fn settle(h: &Harness) {
    h.plugins.settled().await;
    let _edit = h.plugins.edit.lock().await;
    let _registry = h.plugins.registry_lock.lock().await;
}

/// A procedure whose caller goes away at any of its waits still leaves the registry, the code
/// file, the compiled module and the runs in step.
#[tokio::test]
async fn procedures_dropped_at_any_wait_leave_plugins_consistent() {
    let h = harness(config());
    let version = |v: &str| {
        let grants = if v == "v2" { gpio17() } else { Grants::default() };
        NewPlugin { name: v.into(), ..wasm("p", &versioned(v), grants) }
    };
    let code_of = |v: &str| wat::parse_str(versioned(v)).unwrap();
    h.plugins.inject(version("v1"), false).await.unwrap();
    // Inject: the new code, entry and module, or the old ones, never a mix.
    for waits in 1.. {
        let finished = drop_after(h.plugins.inject(version("v2"), false), waits).await;
        settle(&h).await;
        let entry = h.plugins.registry().unwrap()["p"].clone();
        let code = std::fs::read(h.store.path("plugins/p.code")).unwrap();
        assert!(code == code_of(&entry.name), "the code file is not {} after {waits} waits", entry.name);
        assert_eq!(entry.grants == gpio17(), entry.name == "v2");
        let end = h.plugins.call("p", json!({})).await.unwrap();
        assert_eq!(end, End::Done { status: 0, result: Some(json!(entry.name)) }, "after {waits} waits");
        if finished {
            break;
        }
        h.plugins.inject(version("v1"), false).await.unwrap();
    }
    // Start: saved as operative only with a run.
    let ticker = || NewPlugin { callable: false, ..wasm("t", TICKER, Grants::default()) };
    h.plugins.inject(ticker(), false).await.unwrap();
    for waits in 1.. {
        let finished = drop_after(h.plugins.start("t", None), waits).await;
        settle(&h).await;
        let operative = h.plugins.registry().unwrap()["t"].status == "operative";
        assert_eq!(operative, h.plugins.current_run("t").is_some(), "after {waits} waits");
        h.plugins.stop("t").await.unwrap();
        if finished {
            break;
        }
    }
    // Remove: the entry, the code file and the module go together.
    for waits in 1.. {
        let finished = drop_after(h.plugins.remove("t"), waits).await;
        settle(&h).await;
        let known = h.plugins.registry().unwrap().contains_key("t");
        assert_eq!(known, h.store.path("plugins/t.code").exists(), "after {waits} waits");
        assert!(known || !lock(&h.plugins.modules).contains_key("t"), "after {waits} waits");
        if finished {
            assert!(!known);
            break;
        }
        h.plugins.inject(ticker(), false).await.unwrap();
    }
}

/// At exit every run is told to stop at once and all are waited for together, at most
/// `STOP_WAIT` in all (systemd's stop timeout is 20 s), not `STOP_WAIT` each.
#[tokio::test(start_paused = true)]
async fn close_all_stops_every_run_at_once() {
    let h = harness(config());
    // Runs that never end: each would cost a whole STOP_WAIT if they were waited for in turn.
    let mut runs = vec![];
    for uuid in ["a", "b", "c"] {
        let (tx, done) = watch::channel(false);
        let signal = Arc::new(StopSignal::default());
        let started = Started { run: 0, signal: signal.clone(), end: Arc::default(), done };
        lock(&h.plugins.started).insert(uuid.into(), started);
        runs.push((tx, signal));
    }
    let t = tokio::time::Instant::now();
    h.plugins.close_all().await;
    assert!(runs.iter().all(|(_, s)| s.is_stopped()), "a run was not told to stop");
    assert_eq!(t.elapsed(), STOP_WAIT);
}

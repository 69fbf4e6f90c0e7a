//! Sandboxed plugins: WebAssembly modules run by the `wasmi` interpreter.
//!
//! Why `wasmi`: it is a pure-Rust interpreter, so it builds and runs on every board target
//! (armv7, armv6, aarch64, MIPS) with no JIT, no per-architecture code generator and no C;
//! `wasmtime` has no Cranelift back-end for 32-bit ARM or MIPS. It validates modules before
//! running them, meters execution with fuel and can pause a run that ran out of fuel and resume
//! it, which is how limits are enforced without signals or a second thread.
//!
//! A module exports `memory` and `run: () -> i32` (0 is success) and imports only what the
//! `s4t` host module offers (see [`ABI`]). Limits per run: linear memory
//! (`plugins.memory_limit_bytes`), fuel (`plugins.fuel`, earned back by sleeping: all of it
//! for [`FUEL_REFILL_PERIOD`] of sleep, a share for less, nothing for `sleep_ms(0)`), wall
//! clock for calls (`plugins.call_timeout_s`), output size (`plugins.max_output_bytes`),
//! telemetry bytes a second (`plugins.telemetry_bytes_per_s`). Fuel is handed out in slices; between slices the run checks
//! the stop signal and the deadline, so a busy loop stops within one slice.
//!
//! Fuel and CPU bound different things. Fuel counts instructions: a run that never sleeps
//! runs out and is stopped, but one that sleeps a little between bursts of work earns its fuel
//! back, and what `fuel` instructions cost in CPU depends on the board (the interpreter runs
//! several times slower on a small ARM board than on a PC). So the CPU time of the run's
//! thread is metered too, at every slice and every `sleep_ms`: it may use `plugins.cpu_share`
//! of a core on average, after a burst of [`CPU_BURST`]; beyond that the run is made to wait
//! (as in a sleep: a stop ends the wait, and a call's deadline still applies), not stopped.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A validated, compiled plugin module.
pub use wasmi::Module;
use wasmi::{
    Caller, Config, Engine, Error as WasmError, Extern, Linker, Memory, Store, StoreLimits, StoreLimitsBuilder,
    TypedResumableCall,
};

use s4t_shared::plugin::{HOST_FUNCTIONS, HOST_MODULE};

use super::run::{End, Job, output_value};

/// The host functions, for plugin authors (module `s4t`; pointers and lengths are `i32`):
pub const ABI: &str = "\
log(level, ptr, len)                    0 error, 1 warn, 2 info, 3 debug
sleep_ms(ms)                            sleeps, earning fuel back for the time slept; ends a stopped run
now_ms() -> i64                         Unix time in milliseconds
params_len() -> i32                     size of the JSON parameters
params_read(ptr, len) -> i32            copies them; returns their full size
set_result(ptr, len) -> i32             the run's result (JSON or text)
publish(ptr, len) -> i32                telemetry on board.<uuid>.telemetry (JSON or text)
gpio_read(name_ptr, name_len) -> i32    0 or 1
gpio_write(name_ptr, name_len, v) -> i32
i2c_read(bus, addr, reg, ptr, len) -> i32   reg -1: none; returns bytes read
i2c_write(bus, addr, reg, ptr, len) -> i32  returns bytes written
last_error(ptr, len) -> i32             text of the last error; returns its size
errors: -1 not granted, -2 hardware, -3 bad argument, -4 too large, -5 queue full or over the rate";

pub const ERR_DENIED: i32 = -1;
pub const ERR_HARDWARE: i32 = -2;
pub const ERR_ARGUMENT: i32 = -3;
pub const ERR_TOO_LARGE: i32 = -4;
pub const ERR_BUSY: i32 = -5;

/// Fuel handed out at a time: the stop signal and deadline are checked between slices.
const FUEL_SLICE: u64 = 2_000_000;
/// Sleeping this long earns back all of `plugins.fuel`; shorter sleeps earn their share. A run
/// thus executes at most `fuel` instructions plus `fuel` per second it slept, however it calls
/// `sleep_ms` (a loop on `sleep_ms(0)` earns nothing and ends out of fuel). What that costs in
/// CPU is bounded apart, by [`CpuBudget`].
pub const FUEL_REFILL_PERIOD: Duration = Duration::from_secs(1);
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// CPU time a run may use at once (its start, a burst of work) before `plugins.cpu_share`
/// holds it back.
pub const CPU_BURST: Duration = Duration::from_secs(1);
/// The CPU clock is read at most this often: reading it is a system call, and a plugin may
/// call `sleep_ms(0)` in a loop. What runs in between is charged at the next reading.
const CPU_CHECK_EVERY: Duration = Duration::from_millis(10);
const MAX_LOG_BYTES: usize = 1024;
const LOGS_PER_SECOND: u32 = 50;

/// Why a host function ended the run.
enum Halt {
    Stopped,
    Failed(String),
}

struct Host {
    job: Arc<Job>,
    limits: StoreLimits,
    params: Vec<u8>,
    result: Option<Vec<u8>>,
    last_error: String,
    /// Fuel left, the current slice included: spent by running, earned back by sleeping.
    budget: u64,
    /// Fuel handed to the store for the current slice.
    slice: u64,
    halt: Option<Halt>,
    log_window: (u64, u32),
    cpu: CpuBudget,
}

/// Token bucket on the CPU time of the run's thread: filled at `plugins.cpu_share` of the
/// wall time that passes, up to [`CPU_BURST`], emptied by the CPU time the thread uses. Read
/// at slice boundaries and in `sleep_ms` (at most every [`CPU_CHECK_EVERY`]), so a run
/// overdraws it by about one slice or [`CPU_CHECK_EVERY`] at most before it waits.
struct CpuBudget {
    share: f64,
    /// CPU seconds the run may still use; below zero, what it owes.
    tokens: f64,
    wall: Instant,
    cpu: Duration,
}

impl CpuBudget {
    /// Starts full; to be made on the run's own thread, whose CPU time it meters.
    fn new(share: f64) -> CpuBudget {
        let wall = Instant::now();
        CpuBudget { share, tokens: CPU_BURST.as_secs_f64(), wall, cpu: thread_cpu_time().unwrap_or_default() }
    }

    /// Charges the CPU time used since the last check, credits the share of the wall time
    /// that passed, and returns how long the run must wait to be back within its share.
    fn check(&mut self) -> Duration {
        let wall = Instant::now();
        let elapsed = wall.saturating_duration_since(self.wall);
        if elapsed < CPU_CHECK_EVERY {
            return Duration::ZERO;
        }
        // Without a CPU clock (never on Linux), the thread is taken to have run all along.
        let cpu = thread_cpu_time().unwrap_or(self.cpu + elapsed);
        let used = cpu.saturating_sub(self.cpu).as_secs_f64();
        let credit = elapsed.as_secs_f64() * self.share;
        self.tokens = (self.tokens + credit).min(CPU_BURST.as_secs_f64()) - used;
        (self.wall, self.cpu) = (wall, cpu);
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        // A share of 0 (refused by the configuration's check) waits the longest, not a panic.
        Duration::try_from_secs_f64(-self.tokens / self.share).unwrap_or(MAX_SLEEP).min(MAX_SLEEP)
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`, also on musl).
fn thread_cpu_time() -> Option<Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok().map(Duration::from)
}

/// Makes a run over its CPU share wait until it is back within it, as a sleep does: a stop
/// ends the wait (true), and it never lasts past a call's deadline. The wait earns no fuel,
/// or a runaway loop would never run out.
fn throttle(host: &mut Host) -> bool {
    let mut wait = host.cpu.check();
    if wait.is_zero() {
        return false;
    }
    if let Some(d) = host.job.mode.deadline() {
        wait = wait.min(d.saturating_duration_since(Instant::now()));
    }
    host.job.signal.sleep(wait)
}

/// The engine and the host functions, shared by every run.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<Host>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").finish_non_exhaustive()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let mut config = Config::default();
        config.consume_fuel(true);
        let engine = Engine::new(&config);
        let mut linker = Linker::new(&engine);
        if let Err(e) = define_host(&mut linker) {
            // Only a duplicate name fails here; every plugin would then fail to link, loudly.
            tracing::error!(cause = %e, "plugin host functions not defined");
        }
        Sandbox { engine, linker }
    }

    /// Validates and compiles `bytes`; checks the exports a plugin needs.
    pub fn compile(&self, bytes: &[u8]) -> Result<Module, String> {
        let module = Module::new(&self.engine, bytes).map_err(|e| format!("not a valid WebAssembly module: {e}"))?;
        let has = |name: &str| module.exports().any(|e| e.name() == name);
        if !has("run") || !has("memory") {
            return Err("the module must export `memory` and `run: () -> i32`".into());
        }
        if let Some(i) = module.imports().find(|i| i.module() != HOST_MODULE || !HOST_FUNCTIONS.contains(&i.name())) {
            return Err(format!(
                "the module imports {}.{}; only the host functions {HOST_MODULE}.{{{}}} exist",
                i.module(),
                i.name(),
                HOST_FUNCTIONS.join(",")
            ));
        }
        Ok(module)
    }

    /// Runs the module's `run` to its end, a limit, a trap or a stop. Blocks: call it from a
    /// thread of its own, never from the async runtime.
    pub fn run(&self, module: &Module, job: Arc<Job>) -> End {
        let limits = StoreLimitsBuilder::new()
            .memory_size(job.limits.memory_limit_bytes)
            .instances(1)
            .tables(4)
            .memories(1)
            .table_elements(100_000)
            .build();
        let params = serde_json::to_vec(&job.params).unwrap_or_else(|_| b"{}".to_vec());
        let fuel = job.limits.fuel;
        let cpu = CpuBudget::new(job.limits.cpu_share);
        let host = Host {
            job,
            limits,
            params,
            result: None,
            last_error: String::new(),
            budget: fuel,
            slice: FUEL_SLICE.min(fuel),
            halt: None,
            log_window: (0, 0),
            cpu,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        if store.set_fuel(store.data().slice).is_err() {
            return End::Failed("fuel metering is off".into());
        }
        let instance = match self.linker.instantiate_and_start(&mut store, module) {
            Ok(i) => i,
            Err(e) => return failure(&mut store, e),
        };
        let run = match instance.get_typed_func::<(), i32>(&store, "run") {
            Ok(f) => f,
            Err(e) => return End::Failed(format!("`run` is not a function () -> i32: {e}")),
        };
        let mut call = run.call_resumable(&mut store, ());
        loop {
            match call {
                Err(e) => return failure(&mut store, e),
                Ok(TypedResumableCall::Finished(status)) => {
                    let result = store.data_mut().result.take().map(|r| output_value(&r));
                    return End::Done { status, result };
                }
                Ok(TypedResumableCall::HostTrap(t)) => {
                    let e = WasmError::new(t.host_error().to_string());
                    return failure(&mut store, e);
                }
                Ok(TypedResumableCall::OutOfFuel(t)) => {
                    if let Some(end) = out_of_slice(store.data_mut()) {
                        return end;
                    }
                    let next = store.data().slice;
                    if let Err(e) = store.set_fuel(next) {
                        return failure(&mut store, e);
                    }
                    call = t.resume(&mut store);
                }
            }
        }
    }
}

/// Between two fuel slices: waits while over the CPU share; stopped, past the deadline, or
/// out of fuel ends the run.
fn out_of_slice(host: &mut Host) -> Option<End> {
    // A stop or the deadline reached during the wait is seen just below.
    throttle(host);
    if host.job.signal.is_stopped() {
        return Some(End::Stopped);
    }
    if host.job.mode.deadline().is_some_and(|d| Instant::now() >= d) {
        return Some(End::Failed(format!("exceeded its time limit of {} s", host.job.limits.call_timeout_s)));
    }
    host.budget = host.budget.saturating_sub(host.slice);
    if host.budget == 0 {
        return Some(End::Failed(out_of_fuel(host)));
    }
    host.slice = FUEL_SLICE.min(host.budget);
    None
}

fn out_of_fuel(host: &Host) -> String {
    format!("used all its fuel ({}) without sleeping enough", host.job.limits.fuel)
}

/// Fuel earned by sleeping `slept`: `fuel` per [`FUEL_REFILL_PERIOD`].
fn fuel_earned(fuel: u64, slept: Duration) -> u64 {
    let earned = u128::from(fuel) * slept.as_nanos() / FUEL_REFILL_PERIOD.as_nanos();
    u64::try_from(earned).unwrap_or(u64::MAX)
}

fn failure(store: &mut Store<Host>, e: WasmError) -> End {
    match store.data_mut().halt.take() {
        Some(Halt::Stopped) => End::Stopped,
        Some(Halt::Failed(why)) => End::Failed(why),
        None => End::Failed(format!("trapped: {e}")),
    }
}

fn halt(caller: &mut Caller<'_, Host>, h: Halt) -> WasmError {
    let text = match &h {
        Halt::Stopped => "stopped".to_owned(),
        Halt::Failed(why) => why.clone(),
    };
    caller.data_mut().halt = Some(h);
    WasmError::new(text)
}

fn memory(caller: &Caller<'_, Host>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

/// `len` bytes at `ptr` of the plugin's memory, at most `max`.
fn read_mem(caller: &mut Caller<'_, Host>, ptr: i32, len: i32, max: usize) -> Result<Vec<u8>, i32> {
    let len = len as u32 as usize;
    if len > max {
        return Err(fail(caller, ERR_TOO_LARGE, format!("{len} bytes is more than the limit of {max}")));
    }
    let Some(mem) = memory(caller) else { return Err(fail(caller, ERR_ARGUMENT, "no exported memory".into())) };
    let mut buf = vec![0u8; len];
    match mem.read(&*caller, ptr as u32 as usize, &mut buf) {
        Ok(()) => Ok(buf),
        Err(_) => Err(fail(caller, ERR_ARGUMENT, format!("{len} bytes at {ptr:#x} are outside memory"))),
    }
}

fn write_mem(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let Some(mem) = memory(caller) else { return Err(fail(caller, ERR_ARGUMENT, "no exported memory".into())) };
    mem.write(&mut *caller, ptr as u32 as usize, bytes)
        .map_err(|_| fail(caller, ERR_ARGUMENT, format!("{} bytes at {ptr:#x} are outside memory", bytes.len())))
}

/// Records the error text for `last_error` and returns `code`.
fn fail(caller: &mut Caller<'_, Host>, code: i32, text: String) -> i32 {
    caller.data_mut().last_error = text;
    code
}

fn line_name(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Result<String, i32> {
    let bytes = read_mem(caller, ptr, len, 64)?;
    String::from_utf8(bytes).map_err(|_| fail(caller, ERR_ARGUMENT, "line name is not UTF-8".into()))
}

fn define_host(linker: &mut Linker<Host>) -> Result<(), wasmi::errors::LinkerError> {
    linker.func_wrap("s4t", "log", host_log)?;
    linker.func_wrap("s4t", "sleep_ms", host_sleep)?;
    linker.func_wrap("s4t", "now_ms", |_: Caller<'_, Host>| -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    })?;
    linker.func_wrap("s4t", "params_len", |c: Caller<'_, Host>| -> i32 { c.data().params.len() as i32 })?;
    linker.func_wrap("s4t", "params_read", |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
        let params = c.data().params.clone();
        let n = params.len().min(len as u32 as usize);
        match write_mem(&mut c, ptr, &params[..n]) {
            Ok(()) => params.len() as i32,
            Err(code) => code,
        }
    })?;
    linker.func_wrap("s4t", "set_result", |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
        let max = c.data().job.limits.max_output_bytes;
        match read_mem(&mut c, ptr, len, max) {
            Ok(bytes) => {
                c.data_mut().result = Some(bytes);
                0
            }
            Err(code) => code,
        }
    })?;
    linker.func_wrap("s4t", "publish", host_publish)?;
    linker.func_wrap("s4t", "gpio_read", host_gpio_read)?;
    linker.func_wrap("s4t", "gpio_write", host_gpio_write)?;
    linker.func_wrap("s4t", "i2c_read", host_i2c_read)?;
    linker.func_wrap("s4t", "i2c_write", host_i2c_write)?;
    linker.func_wrap("s4t", "last_error", |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
        let text = c.data().last_error.clone().into_bytes();
        let n = text.len().min(len as u32 as usize);
        match write_mem(&mut c, ptr, &text[..n]) {
            Ok(()) => text.len() as i32,
            Err(code) => code,
        }
    })?;
    Ok(())
}

fn host_log(mut c: Caller<'_, Host>, level: i32, ptr: i32, len: i32) {
    let len = len.clamp(0, MAX_LOG_BYTES as i32);
    let Ok(bytes) = read_mem(&mut c, ptr, len, MAX_LOG_BYTES) else { return };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let host = c.data_mut();
    if host.log_window.0 != now {
        host.log_window = (now, 0);
    }
    host.log_window.1 += 1;
    if host.log_window.1 > LOGS_PER_SECOND {
        return;
    }
    let text = String::from_utf8_lossy(&bytes);
    let plugin = host.job.name.as_str();
    match level {
        0 => tracing::error!(plugin, "{text}"),
        1 => tracing::warn!(plugin, "{text}"),
        2 => tracing::info!(plugin, "{text}"),
        _ => tracing::debug!(plugin, "{text}"),
    }
}

fn host_sleep(mut c: Caller<'_, Host>, ms: i32) -> Result<(), WasmError> {
    let want = Duration::from_millis(ms.max(0) as u64).min(MAX_SLEEP);
    let job = c.data().job.clone();
    let deadline = job.mode.deadline();
    let until = Instant::now() + want;
    let (d, past_deadline) = match deadline {
        Some(dl) if dl < until => (dl.saturating_duration_since(Instant::now()), true),
        _ => (want, false),
    };
    // What ran of the current slice is spent; only the time really slept earns fuel back.
    let used = c.data().slice.saturating_sub(c.get_fuel()?);
    let start = Instant::now();
    if job.signal.sleep(d) {
        return Err(halt(&mut c, Halt::Stopped));
    }
    if past_deadline {
        let why = format!("exceeded its time limit of {} s", job.limits.call_timeout_s);
        return Err(halt(&mut c, Halt::Failed(why)));
    }
    let slept = start.elapsed().min(d);
    let fuel = job.limits.fuel;
    let host = c.data_mut();
    host.budget = host.budget.saturating_sub(used).saturating_add(fuel_earned(fuel, slept)).min(fuel);
    if host.budget == 0 {
        let why = out_of_fuel(host);
        return Err(halt(&mut c, Halt::Failed(why)));
    }
    host.slice = FUEL_SLICE.min(host.budget);
    // Sleeping credits the CPU budget; a plugin that still works more than its share between
    // sleeps (`loop { sleep_ms(1); work }` earns fuel for all that work) waits here.
    if throttle(host) {
        return Err(halt(&mut c, Halt::Stopped));
    }
    if deadline.is_some_and(|dl| Instant::now() >= dl) {
        let why = format!("exceeded its time limit of {} s", job.limits.call_timeout_s);
        return Err(halt(&mut c, Halt::Failed(why)));
    }
    let slice = c.data().slice;
    c.set_fuel(slice)
}

fn host_publish(mut c: Caller<'_, Host>, ptr: i32, len: i32) -> i32 {
    let max = c.data().job.limits.max_output_bytes;
    let bytes = match read_mem(&mut c, ptr, len, max) {
        Ok(b) => b,
        Err(code) => return code,
    };
    if c.data().job.publish(output_value(&bytes)) {
        0
    } else {
        fail(
            &mut c,
            ERR_BUSY,
            "the telemetry queue is full or this run is over its rate (plugins.telemetry_bytes_per_s); message dropped"
                .into(),
        )
    }
}

fn host_gpio_read(mut c: Caller<'_, Host>, ptr: i32, len: i32) -> i32 {
    let line = match line_name(&mut c, ptr, len) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let job = c.data().job.clone();
    if !job.grants.allows_gpio(&line) {
        return fail(&mut c, ERR_DENIED, format!("GPIO line {line} is not granted to this plugin"));
    }
    match job.hal.gpio.read(&line) {
        Ok(v) => i32::from(v),
        Err(e) => fail(&mut c, ERR_HARDWARE, e.to_string()),
    }
}

fn host_gpio_write(mut c: Caller<'_, Host>, ptr: i32, len: i32, value: i32) -> i32 {
    let line = match line_name(&mut c, ptr, len) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let job = c.data().job.clone();
    if !job.grants.allows_gpio(&line) {
        return fail(&mut c, ERR_DENIED, format!("GPIO line {line} is not granted to this plugin"));
    }
    if !(0..=1).contains(&value) {
        return fail(&mut c, ERR_ARGUMENT, format!("GPIO value {value} is not 0 or 1"));
    }
    match job.hal.gpio.write(&line, value as u8) {
        Ok(()) => 0,
        Err(e) => fail(&mut c, ERR_HARDWARE, e.to_string()),
    }
}

/// Checks the grant and the register argument of an I2C host call.
fn i2c_target(c: &mut Caller<'_, Host>, bus: i32, addr: i32, reg: i32) -> Result<(u32, u16, Option<u8>), i32> {
    let (Ok(bus), Ok(addr)) = (u32::try_from(bus), u16::try_from(addr)) else {
        return Err(fail(c, ERR_ARGUMENT, format!("bad I2C bus {bus} or address {addr}")));
    };
    if !c.data().job.grants.allows_i2c(bus, addr) {
        return Err(fail(c, ERR_DENIED, format!("I2C device {addr:#04x} on bus {bus} is not granted to this plugin")));
    }
    let reg = match reg {
        -1 => None,
        0..=255 => Some(reg as u8),
        _ => return Err(fail(c, ERR_ARGUMENT, format!("I2C register {reg} is not -1 or 0..=255"))),
    };
    Ok((bus, addr, reg))
}

fn host_i2c_read(mut c: Caller<'_, Host>, bus: i32, addr: i32, reg: i32, ptr: i32, len: i32) -> i32 {
    let (bus, addr, reg) = match i2c_target(&mut c, bus, addr, reg) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let job = c.data().job.clone();
    let len = len as u32 as usize;
    if len == 0 || len > job.hal.max_transfer {
        return fail(&mut c, ERR_TOO_LARGE, format!("I2C reads are 1..={} bytes", job.hal.max_transfer));
    }
    match job.hal.i2c.read(bus, addr, reg, len) {
        Ok(data) => match write_mem(&mut c, ptr, &data) {
            Ok(()) => data.len() as i32,
            Err(code) => code,
        },
        Err(e) => fail(&mut c, ERR_HARDWARE, e.to_string()),
    }
}

fn host_i2c_write(mut c: Caller<'_, Host>, bus: i32, addr: i32, reg: i32, ptr: i32, len: i32) -> i32 {
    let (bus, addr, reg) = match i2c_target(&mut c, bus, addr, reg) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let job = c.data().job.clone();
    let data = match read_mem(&mut c, ptr, len, job.hal.max_transfer) {
        Ok(d) => d,
        Err(code) => return code,
    };
    match job.hal.i2c.write(bus, addr, reg, &data) {
        Ok(n) => n as i32,
        Err(e) => fail(&mut c, ERR_HARDWARE, e.to_string()),
    }
}

#[cfg(test)]
mod abi_tests {
    use super::*;

    /// What sleeping earns is in proportion to the time slept: nothing for no time.
    #[test]
    fn sleeping_earns_fuel_in_proportion() {
        assert_eq!(fuel_earned(1_000_000, Duration::ZERO), 0);
        assert_eq!(fuel_earned(1_000_000, FUEL_REFILL_PERIOD / 4), 250_000);
        assert_eq!(fuel_earned(u64::MAX / 2, FUEL_REFILL_PERIOD * 4), u64::MAX);
    }

    #[test]
    fn the_abi_text_and_the_shared_list_name_the_same_functions() {
        let documented: Vec<&str> =
            ABI.lines().filter_map(|l| l.split('(').next()).filter(|n| !n.contains(' ') && !n.is_empty()).collect();
        assert_eq!(documented, HOST_FUNCTIONS, "keep ABI and s4t_shared::plugin::HOST_FUNCTIONS in step");
        let sandbox = Sandbox::new();
        for name in HOST_FUNCTIONS {
            let wat = format!(
                r#"(module (import "s4t" "{name}" (func)) (memory (export "memory") 1)
                   (func (export "run") (result i32) (i32.const 0)))"#
            );
            let e = sandbox.compile(&wat::parse_str(&wat).unwrap());
            assert!(e.is_ok(), "{name}: {e:?}");
        }
    }
}

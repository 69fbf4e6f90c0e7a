//! Plugins: user code the cloud injects and then calls, starts and stops (S4T-REFERENCE §6.2),
//! run so that it cannot harm the board or the agent.
//!
//! Kinds ([`PluginKind`]): `wasm` (the default: a WebAssembly module in the `wasmi` sandbox of
//! [`wasm`], with host functions limited to the plugin's [`Grants`]), `process` (an executable
//! run as a separate unprivileged user, opt-in, refused when the agent cannot switch to that
//! user; see [`process`]) and `python` (the original pickled `Worker` class run
//! by `python3`, opt-in). Grants come with the injection and must lie within what the board
//! owner allows in `[plugins]` (`allow_gpio`, `allow_i2c`); an injection asking for more is
//! refused.
//!
//! State: `plugins.json` in the state directory (name, kind, grants, onboot, status, the
//! parameters of the last start) and `plugins/<uuid>.code`. At boot, plugins with `onboot`
//! that were running (`operative`) start again with their saved parameters.
//!
//! **Invariant:** no plugin runs on the agent's event loop. WebAssembly runs on a thread of its
//! own, processes are children; at most `plugins.max_running` runs exist at once (calls and
//! started plugins together), more are refused, never queued.

pub mod config;
pub mod process;
pub mod run;
#[cfg(feature = "wasm-plugins")]
pub mod wasm;
/// Without the `wasm-plugins` feature (small-flash board builds) the sandbox refuses every module.
#[cfg(not(feature = "wasm-plugins"))]
#[path = "nowasm.rs"]
pub mod wasm;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s4t_shared::plugin::{Grants, PluginKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use config::PluginsConfig;
pub use run::{End, Mode, StopSignal, TELEMETRY_CAPACITY, Telemetry};

use crate::error::{Error, Result};
use crate::hal::Hal;
use crate::state::{StateStore, atomic_write};

pub const PLUGINS_FILE: &str = "plugins.json";
pub(crate) const CODE_DIR: &str = "plugins";
/// Stack of a WebAssembly plugin's thread (address space; only touched pages cost memory). The
/// interpreter keeps the plugin's own stack on the heap; this is for the interpreter itself,
/// and the host functions it calls.
const PLUGIN_STACK: usize = 2 << 20;
/// How long `PluginStop` waits for a run to end before answering.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Delayed `PluginStop`s waiting at once; more are refused.
pub const MAX_DELAYED_STOPS: usize = 16;
/// Largest parameters (as JSON) of a `PluginStart` or `PluginReboot`: they are saved in the
/// plugin's entry, and plugins.json is read at every procedure and rewritten at every change
/// of status, so `max_plugins` entries of a whole WAMP message each would cost every one of
/// them tens of megabytes.
pub const MAX_START_PARAMS: usize = 64 * 1024;

/// One injected plugin, as `plugins.json` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEntry {
    pub name: String,
    pub kind: PluginKind,
    pub callable: bool,
    pub onboot: bool,
    #[serde(default)]
    pub grants: Grants,
    /// `injected`, `updated`, `operative` (started), `stopped`, `finished`, `failed`.
    pub status: String,
    /// Parameters of the last start, for `onboot` restarts and `PluginReboot` without any.
    #[serde(default)]
    pub params: Value,
    pub injected_at: String,
    pub updated_at: String,
    /// SHA-256 (hex) of the code saved with this entry. A run whose code file does not match
    /// is refused: the code is written before the entry, and a full disk or a power cut
    /// between the two would otherwise run new code with the old entry's grants. Absent in
    /// entries saved by agents before it (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sha256: Option<String>,
}

/// The [`PluginEntry::code_sha256`] of `code`.
fn code_digest(code: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(code))
}

/// `code` if it is the code `expect`ed (no digest: any), else an error saying so.
fn checked(code: Vec<u8>, expect: Option<&str>) -> Result<Vec<u8>> {
    match expect {
        Some(d) if code_digest(&code) != d => Err(plugin_err(
            "the plugin's code file does not match its entry (an injection did not complete): inject it again",
        )),
        _ => Ok(code),
    }
}

pub type Registry = BTreeMap<String, PluginEntry>;

/// What `PluginInject` delivers, checked.
#[derive(Clone)]
pub struct NewPlugin {
    pub uuid: String,
    pub name: String,
    pub kind: PluginKind,
    pub callable: bool,
    pub grants: Grants,
    /// Module bytes, executable bytes, or Python source (UTF-8).
    pub code: Vec<u8>,
}

/// A started plugin: its stop signal and, once it ended, how.
struct Started {
    /// Which run this is (numbered from 1 per manager): a delayed stop stops only its own.
    run: u64,
    signal: Arc<StopSignal>,
    end: Arc<Mutex<Option<End>>>,
    done: watch::Receiver<bool>,
}

pub struct PluginManager {
    store: StateStore,
    config: PluginsConfig,
    hal: Hal,
    board: String,
    telemetry: mpsc::Sender<Telemetry>,
    sandbox: Arc<wasm::Sandbox>,
    /// Compiled modules by uuid, with the digest of the code each was compiled from.
    modules: Mutex<HashMap<String, (String, wasm::Module)>>,
    started: Mutex<HashMap<String, Started>>,
    slots: Arc<Semaphore>,
    /// Numbers the runs of started plugins ([`Started::run`]).
    runs: portable_atomic::AtomicU64,
    /// Delayed `PluginStop`s pending ([`MAX_DELAYED_STOPS`]).
    delayed_stops: Arc<Semaphore>,
    /// Changes under way in tasks of their own ([`PluginManager::detached`]).
    in_flight: Arc<watch::Sender<usize>>,
    /// Serializes the procedures that change plugins (inject, remove, start, stop, reboot):
    /// held across a whole change, waits for runs to end included.
    edit: tokio::sync::Mutex<()>,
    /// Held by every load-modify-save of plugins.json and by nothing else, never while waiting
    /// for a run: a run that ends by itself saves its status under it while a procedure holding
    /// [`PluginManager::edit`] waits for that run to end.
    registry_lock: Arc<tokio::sync::Mutex<()>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for PluginManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginManager").field("config", &self.config).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn plugin_err(msg: impl Into<String>) -> Error {
    Error::Plugin(msg.into())
}

/// Longest plugin uuid.
pub const MAX_UUID: usize = 64;

/// A plugin uuid names its code file (`plugins/<uuid>.code`) and its thread: 1 to
/// [`MAX_UUID`] letters, digits, `-` and `_`. Every procedure checks its uuid argument here.
pub fn check_uuid(uuid: &str) -> std::result::Result<(), String> {
    if uuid.is_empty()
        || uuid.len() > MAX_UUID
        || !uuid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("must be letters, digits, - and _ (1 to {MAX_UUID}), got {uuid:?}"));
    }
    Ok(())
}

/// Longest plugin name, in bytes.
pub const MAX_NAME: usize = 255;

/// A plugin name goes into logs, a process plugin's environment and every telemetry message:
/// at most [`MAX_NAME`] bytes, no control characters (a NUL cannot be in an environment
/// variable or a thread name).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.len() > MAX_NAME {
        return Err(format!("must be at most {MAX_NAME} bytes, got {}", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("must not contain control characters, got {name:?}"));
    }
    Ok(())
}

/// Refuses start parameters larger than [`MAX_START_PARAMS`], before anything is saved.
fn check_start_params(params: Option<&Value>) -> Result<()> {
    let len = params.map_or(0, s4t_shared::wamp::message::json_len);
    if len > MAX_START_PARAMS {
        return Err(plugin_err(format!(
            "the parameters are {len} bytes of JSON, more than the {MAX_START_PARAMS} bytes a started plugin may be given"
        )));
    }
    Ok(())
}

impl PluginManager {
    pub fn new(
        store: StateStore,
        config: PluginsConfig,
        hal: Hal,
        board: String,
        telemetry: mpsc::Sender<Telemetry>,
        shutdown: CancellationToken,
    ) -> PluginManager {
        let slots = Arc::new(Semaphore::new(config.max_running));
        PluginManager {
            store,
            config,
            hal,
            board,
            telemetry,
            sandbox: Arc::new(wasm::Sandbox::new()),
            modules: Mutex::new(HashMap::new()),
            started: Mutex::new(HashMap::new()),
            slots,
            runs: portable_atomic::AtomicU64::new(0),
            delayed_stops: Arc::new(Semaphore::new(MAX_DELAYED_STOPS)),
            in_flight: Arc::new(watch::channel(0).0),
            edit: tokio::sync::Mutex::new(()),
            registry_lock: Arc::new(tokio::sync::Mutex::new(())),
            shutdown,
        }
    }

    pub fn config(&self) -> &PluginsConfig {
        &self.config
    }

    pub fn registry(&self) -> Result<Registry> {
        Ok(self.store.load::<Registry>(PLUGINS_FILE)?.unwrap_or_default())
    }

    fn entry(&self, uuid: &str) -> Result<PluginEntry> {
        self.registry()?.remove(uuid).ok_or_else(|| plugin_err(format!("plugin {uuid} is not injected on this board")))
    }

    /// Loads plugins.json, lets `change` edit it and saves it when `change` returns true: the
    /// one way to change the registry, under [`PluginManager::registry_lock`].
    async fn update_registry<T>(&self, change: impl FnOnce(&mut Registry) -> (bool, T)) -> Result<T> {
        let guard = self.registry_lock.clone().lock_owned().await;
        let mut reg = self.registry()?;
        let (save, out) = change(&mut reg);
        if save {
            let path = self.store.path(PLUGINS_FILE);
            let werr = |e: String| Error::Write { path: path.clone(), source: std::io::Error::other(e) };
            // Compact, unlike other state files: indented, a plugin's saved parameters (up to
            // [`MAX_START_PARAMS`] of compact JSON) could take a hundred times that, nested
            // deep with many short values.
            let bytes = serde_json::to_vec(&reg).map_err(|e| werr(e.to_string()))?;
            let p = path.clone();
            // The lock goes with the write: a caller that gives up waiting (its future dropped)
            // does not let the next change save before this write is done.
            tokio::task::spawn_blocking(move || {
                let _guard = guard;
                atomic_write(&p, &bytes, 0o600)
            })
            .await
            .map_err(|e| werr(e.to_string()))??;
        }
        Ok(out)
    }

    async fn set_status(&self, uuid: &str, status: &str, params: Option<&Value>) -> Result<()> {
        self.update_registry(|reg| {
            let Some(e) = reg.get_mut(uuid) else { return (false, ()) };
            e.status = status.to_owned();
            e.updated_at = crate::rpc::device::iso8601_now();
            if let Some(p) = params {
                e.params = p.clone();
            }
            (true, ())
        })
        .await
    }

    /// The code file of `uuid`; an error for a uuid that is not one (it could name another path).
    fn code_path(&self, uuid: &str) -> Result<std::path::PathBuf> {
        check_uuid(uuid).map_err(|e| plugin_err(format!("plugin uuid {e}")))?;
        Ok(self.store.path(CODE_DIR).join(format!("{uuid}.code")))
    }

    /// Runs a change of plugins (and of their files and cache) in a task of its own, so that a
    /// caller that gives up (its WAMP session dropped, its future with it) cannot leave it half
    /// done: the registry, the code file and the compiled module always change together.
    async fn detached<T: Send + 'static>(
        &self,
        change: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        struct InFlight(Arc<watch::Sender<usize>>);
        impl Drop for InFlight {
            fn drop(&mut self) {
                self.0.send_modify(|n| *n -= 1);
            }
        }
        self.in_flight.send_modify(|n| *n += 1);
        let in_flight = InFlight(self.in_flight.clone());
        // Boxed: one spawned task type per result type, not one per procedure (code size).
        let change: std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>> = Box::pin(change);
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            change.await
        });
        task.await.map_err(|e| plugin_err(format!("the change did not complete: {e}")))?
    }

    /// Waits until no change runs in a task of its own.
    pub async fn settled(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Checks what the board allows, compiles WebAssembly, stores the code and the entry.
    /// Returns true when the plugin was already injected (then it is stopped and replaced).
    pub async fn inject(self: &Arc<Self>, p: NewPlugin, onboot: bool) -> Result<bool> {
        self.allowed(p.kind, &p.grants)?;
        self.code_path(&p.uuid)?;
        check_name(&p.name).map_err(|e| plugin_err(format!("plugin name {e}")))?;
        let (module, p) = match p.kind {
            // Up to `max_code_bytes` to validate and translate: not on the event loop.
            PluginKind::Wasm => {
                let sandbox = self.sandbox.clone();
                let (m, p) = tokio::task::spawn_blocking(move || (sandbox.compile(&p.code), p))
                    .await
                    .map_err(|e| plugin_err(format!("the module was not compiled: {e}")))?;
                (Some(m.map_err(plugin_err)?), p)
            }
            _ => (None, p),
        };
        let me = self.clone();
        self.detached(async move { me.inject_now(p, onboot, module).await }).await
    }

    async fn inject_now(&self, p: NewPlugin, onboot: bool, module: Option<wasm::Module>) -> Result<bool> {
        let path = self.code_path(&p.uuid)?;
        let _guard = self.edit.lock().await;
        let held = self.registry()?;
        let max = self.config.max_plugins;
        if !held.contains_key(&p.uuid) && held.len() >= max {
            return Err(plugin_err(format!(
                "this board holds {} plugins, its most (plugins.max_plugins = {max}): remove one first",
                held.len()
            )));
        }
        self.stop_run(&p.uuid).await;
        // The old module goes before the code changes: a run compiles whatever code is on disk.
        lock(&self.modules).remove(&p.uuid);
        let dir = self.store.path(CODE_DIR);
        let code = p.code.clone();
        let d = dir.clone();
        let digest = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&d).map_err(|source| Error::Write { path: d.clone(), source })?;
            atomic_write(&path, &code, 0o600)?;
            Ok::<_, Error>(code_digest(&code))
        })
        .await
        .map_err(|e| Error::Write { path: dir.clone(), source: std::io::Error::other(e) })??;
        let saved = digest.clone();
        let uuid = p.uuid.clone();
        let updated = self
            .update_registry(|reg| {
                let now = crate::rpc::device::iso8601_now();
                let previous = reg.remove(&p.uuid);
                let updated = previous.is_some();
                let entry = PluginEntry {
                    name: p.name,
                    kind: p.kind,
                    callable: p.callable,
                    onboot,
                    grants: p.grants,
                    status: if updated { "updated" } else { "injected" }.into(),
                    params: previous.map(|e| e.params).unwrap_or(Value::Null),
                    injected_at: now.clone(),
                    updated_at: now,
                    code_sha256: Some(saved),
                };
                reg.insert(p.uuid, entry);
                (true, updated)
            })
            .await?;
        if let Some(m) = module {
            lock(&self.modules).insert(uuid, (digest, m));
        }
        Ok(updated)
    }

    /// Stops the plugin if it runs, then forgets it; false when it was not injected.
    pub async fn remove(self: &Arc<Self>, uuid: &str) -> Result<bool> {
        let path = self.code_path(uuid)?;
        let (me, uuid) = (self.clone(), uuid.to_owned());
        self.detached(async move {
            let _guard = me.edit.lock().await;
            me.stop_run(&uuid).await;
            lock(&me.started).remove(&uuid);
            lock(&me.modules).remove(&uuid);
            let known = me
                .update_registry(|reg| {
                    let known = reg.remove(&uuid).is_some();
                    (known, known)
                })
                .await?;
            match tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Ok(Err(e)) => tracing::warn!(plugin = uuid, cause = %e, "plugin code not removed"),
                Err(e) => tracing::warn!(plugin = uuid, cause = %e, "plugin code not removed"),
                Ok(Ok(())) => {}
            }
            Ok(known)
        })
        .await
    }

    /// Whether this board lets a plugin of `kind` with `grants` be injected or run, as its
    /// owner configures it now: checked at every run too, so that narrowing `[plugins]` (a
    /// line taken out of `allow_gpio`, `process = false`) binds the plugins injected before.
    /// Process and Python plugins run only as a separate, unprivileged user the agent can
    /// switch to ([`process::run_as`]).
    fn allowed(&self, kind: PluginKind, grants: &Grants) -> Result<()> {
        match kind {
            PluginKind::Process if !self.config.process => {
                return Err(plugin_err("process plugins are not enabled on this board (plugins.process)"));
            }
            PluginKind::Python if !self.config.python => {
                return Err(plugin_err("legacy Python plugins are not enabled on this board (plugins.python)"));
            }
            PluginKind::Wasm => {}
            PluginKind::Process | PluginKind::Python => {
                process::run_as(&self.config).map_err(plugin_err)?;
            }
        }
        let cap = Grants { gpio: self.config.allow_gpio.clone(), i2c: self.config.allow_i2c.clone() };
        grants.within(&cap).map_err(|what| plugin_err(format!("{what} is not allowed to plugins on this board")))
    }

    fn slot(&self) -> Result<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            plugin_err(format!("{} plugin runs are under way already (plugins.max_running)", self.config.max_running))
        })
    }

    fn job(&self, uuid: &str, e: &PluginEntry, params: Value, mode: Mode, signal: Arc<StopSignal>) -> run::Job {
        run::Job {
            uuid: uuid.to_owned(),
            name: e.name.clone(),
            board: self.board.clone(),
            params,
            grants: e.grants.clone(),
            mode,
            signal,
            hal: self.hal.clone(),
            limits: self.config.clone(),
            telemetry: self.telemetry.clone(),
            rate: run::TelemetryRate::new(&self.config),
        }
    }

    /// The compiled module of `uuid` whose code is the `expect`ed one, from the cache or
    /// (read and compiled on a blocking thread) from its code file.
    async fn module(&self, uuid: &str, expect: Option<&str>) -> Result<wasm::Module> {
        if let Some((d, m)) = lock(&self.modules).get(uuid)
            && expect.is_none_or(|e| e == d)
        {
            return Ok(m.clone());
        }
        let path = self.code_path(uuid)?;
        let sandbox = self.sandbox.clone();
        let expect = expect.map(str::to_owned);
        let (d, m) = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|source| Error::Read { path, source })?;
            let bytes = checked(bytes, expect.as_deref())?;
            Ok::<_, Error>((code_digest(&bytes), sandbox.compile(&bytes).map_err(plugin_err)?))
        })
        .await
        .map_err(|e| plugin_err(format!("the module was not compiled: {e}")))??;
        // An injection that replaced the module meanwhile wins: its module is the newer one.
        lock(&self.modules).entry(uuid.to_owned()).or_insert((d, m.clone()));
        Ok(m)
    }

    async fn code(&self, uuid: &str, expect: Option<&str>) -> Result<Vec<u8>> {
        let path = self.code_path(uuid)?;
        let expect = expect.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let code = std::fs::read(&path).map_err(|source| Error::Read { path, source })?;
            checked(code, expect.as_deref())
        })
        .await
        .map_err(|e| plugin_err(format!("the plugin code was not read: {e}")))?
    }

    /// Runs `job` to its end; `permit` is released when the run really is over (a WebAssembly
    /// thread keeps it until it returns).
    /// `expect`: the entry's [`PluginEntry::code_sha256`].
    async fn execute(
        &self,
        uuid: &str,
        kind: PluginKind,
        expect: Option<&str>,
        job: run::Job,
        permit: OwnedSemaphorePermit,
    ) -> End {
        let job = Arc::new(job);
        match kind {
            PluginKind::Wasm => {
                let module = match self.module(uuid, expect).await {
                    Ok(m) => m,
                    Err(e) => return End::Failed(e.to_string()),
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let sandbox = self.sandbox.clone();
                // Named after the uuid, never the name: a name is free text, and a NUL in a
                // thread name panics.
                let thread: String =
                    uuid.chars().filter(|c| c.is_ascii_alphanumeric() || "-_".contains(*c)).take(MAX_UUID).collect();
                let spawned = std::thread::Builder::new()
                    .name(format!("plugin-{thread}"))
                    .stack_size(PLUGIN_STACK)
                    .spawn(move || {
                        let end = sandbox.run(&module, job);
                        // Free the slot before anyone learns the run ended.
                        drop(permit);
                        let _ = tx.send(end);
                    });
                if let Err(e) = spawned {
                    return End::Failed(format!("cannot start a plugin thread: {e}"));
                }
                rx.await.unwrap_or_else(|_| End::Failed("the plugin thread died".into()))
            }
            PluginKind::Process | PluginKind::Python => {
                let _permit = permit;
                let code = match self.code(uuid, expect).await {
                    Ok(c) => c,
                    Err(e) => return End::Failed(e.to_string()),
                };
                let program = match kind {
                    PluginKind::Process => process::Program::Process(&code),
                    _ => match std::str::from_utf8(&code) {
                        Ok(source) => process::Program::Python { source, python: &self.config.python_bin },
                        Err(_) => return End::Failed("the Python source is not UTF-8".into()),
                    },
                };
                process::run(job, program).await
            }
        }
    }

    /// `PluginCall`: one run with the call deadline; returns how it ended.
    pub async fn call(&self, uuid: &str, params: Value) -> Result<End> {
        let e = self.entry(uuid)?;
        self.allowed(e.kind, &e.grants)?;
        let permit = self.slot()?;
        let limit = Duration::from_secs(self.config.call_timeout_s);
        let deadline = std::time::Instant::now() + limit;
        let signal = Arc::new(StopSignal::default());
        let job = self.job(uuid, &e, params, Mode::Call { deadline }, signal.clone());
        let run = self.execute(uuid, e.kind, e.code_sha256.as_deref(), job, permit);
        // The run enforces the deadline itself; this is the backstop for a stuck host call.
        tokio::select! {
            _ = self.shutdown.cancelled() => {
                signal.stop();
                Ok(End::Stopped)
            }
            r = tokio::time::timeout(limit + Duration::from_secs(5), run) => Ok(r.unwrap_or_else(|_| {
                signal.stop();
                End::Failed(format!("exceeded its time limit of {} s", self.config.call_timeout_s))
            })),
        }
    }

    /// `PluginStart`: runs the plugin on its own until it returns or is stopped.
    pub async fn start(self: &Arc<Self>, uuid: &str, params: Option<Value>) -> Result<()> {
        check_start_params(params.as_ref())?;
        let (me, uuid) = (self.clone(), uuid.to_owned());
        self.detached(async move {
            let _guard = me.edit.lock().await;
            me.start_locked(&uuid, params).await
        })
        .await
    }

    async fn start_locked(self: &Arc<Self>, uuid: &str, params: Option<Value>) -> Result<()> {
        if self.alive(uuid) {
            return Err(plugin_err("ALREADY STARTED!"));
        }
        let e = self.entry(uuid)?;
        self.allowed(e.kind, &e.grants)?;
        let params = params.unwrap_or_else(|| e.params.clone());
        let permit = self.slot()?;
        let signal = Arc::new(StopSignal::default());
        let job = self.job(uuid, &e, params.clone(), Mode::Start, signal.clone());
        let end = Arc::new(Mutex::new(None));
        let (done_tx, done) = watch::channel(false);
        // Saved first: a run recorded as started but never spawned would look ALIVE for good.
        self.set_status(uuid, "operative", Some(&params)).await?;
        let run = self.runs.fetch_add(1, portable_atomic::Ordering::Relaxed) + 1;
        lock(&self.started).insert(uuid.to_owned(), Started { run, signal, end: end.clone(), done });
        let (me, id, kind, name, digest) =
            (self.clone(), uuid.to_owned(), e.kind, e.name.clone(), e.code_sha256.clone());
        tokio::spawn(async move {
            let result = me.execute(&id, kind, digest.as_deref(), job, permit).await;
            let event = me.ended(&id, &name, &result).await;
            *lock(&end) = Some(result);
            let _ = done_tx.send(true);
            // Reported once the status is saved and the run counts as ended.
            if let Some(event) = event {
                let _ = me.telemetry.try_send(event);
            }
        });
        tracing::info!(plugin = %e.name, uuid, kind = e.kind.as_str(), "plugin started");
        Ok(())
    }

    /// Records a started plugin's end (unless it was asked to stop) and returns the telemetry
    /// event that reports it.
    async fn ended(&self, uuid: &str, name: &str, end: &End) -> Option<Telemetry> {
        let status = match end {
            End::Stopped => return None,
            End::Done { status: 0, .. } => "finished",
            End::Done { .. } | End::Failed(_) => "failed",
        };
        let reason = run::describe(end);
        tracing::warn!(plugin = name, uuid, %reason, "started plugin ended by itself");
        let event = Telemetry {
            plugin: uuid.to_owned(),
            name: name.to_owned(),
            data: json!({"event": "ended", "status": status, "reason": reason}),
        };
        if !self.shutdown.is_cancelled()
            && let Err(e) = self.set_status(uuid, status, None).await
        {
            tracing::warn!(plugin = name, cause = %e, "plugin status not saved");
        }
        Some(event)
    }

    fn alive(&self, uuid: &str) -> bool {
        lock(&self.started).get(uuid).is_some_and(|s| !*s.done.borrow())
    }

    /// Signals a started run to stop and waits (bounded) until it ended; false if none ran.
    async fn stop_run(&self, uuid: &str) -> bool {
        let Some(mut done) = ({
            let started = lock(&self.started);
            started.get(uuid).filter(|s| !*s.done.borrow()).map(|s| {
                s.signal.stop();
                s.done.clone()
            })
        }) else {
            return false;
        };
        if tokio::time::timeout(STOP_WAIT, done.wait_for(|d| *d)).await.is_err() {
            tracing::warn!(plugin = uuid, "plugin did not stop within {STOP_WAIT:?}");
        }
        true
    }

    /// `PluginStop`: false when the plugin was not running.
    pub async fn stop(self: &Arc<Self>, uuid: &str) -> Result<bool> {
        let (me, uuid) = (self.clone(), uuid.to_owned());
        self.detached(async move {
            let _guard = me.edit.lock().await;
            me.entry(&uuid)?;
            let was = me.stop_run(&uuid).await;
            me.set_status(&uuid, "stopped", None).await?;
            Ok(was)
        })
        .await
    }

    /// The run of `uuid` under way now, if any: what a delayed `PluginStop` is meant for.
    pub fn current_run(&self, uuid: &str) -> Option<u64> {
        lock(&self.started).get(uuid).filter(|s| !*s.done.borrow()).map(|s| s.run)
    }

    /// A place for one delayed `PluginStop` (at most [`MAX_DELAYED_STOPS`] wait at once).
    pub fn delayed_stop_slot(&self) -> Result<OwnedSemaphorePermit> {
        self.delayed_stops.clone().try_acquire_owned().map_err(|_| {
            plugin_err(format!("{MAX_DELAYED_STOPS} delayed plugin stops are pending already; stop at once or later"))
        })
    }

    /// A delayed `PluginStop`: stops the run `run` ([`PluginManager::current_run`] when it was
    /// asked; `None`, none ran) and never one started since, which it leaves alone (false).
    pub async fn stop_run_of(self: &Arc<Self>, uuid: &str, run: Option<u64>) -> Result<bool> {
        let (me, uuid) = (self.clone(), uuid.to_owned());
        self.detached(async move {
            let _guard = me.edit.lock().await;
            me.entry(&uuid)?;
            let now = me.current_run(&uuid);
            if now.is_some() && now != run {
                tracing::info!(plugin = uuid, "delayed stop not applied: the plugin was started again since");
                return Ok(false);
            }
            let was = me.stop_run(&uuid).await;
            me.set_status(&uuid, "stopped", None).await?;
            Ok(was)
        })
        .await
    }

    /// `PluginReboot`: stop, then start with `params` or the saved ones.
    pub async fn reboot(self: &Arc<Self>, uuid: &str, params: Option<Value>) -> Result<()> {
        // Before the stop: refused parameters leave the run alone.
        check_start_params(params.as_ref())?;
        let (me, uuid) = (self.clone(), uuid.to_owned());
        self.detached(async move {
            let _guard = me.edit.lock().await;
            me.entry(&uuid)?;
            me.stop_run(&uuid).await;
            me.start_locked(&uuid, params).await
        })
        .await
    }

    /// `PluginStatus`: `ALIVE`, or `DEAD` (with the reason when it ended by itself).
    pub fn status(&self, uuid: &str) -> Result<String> {
        self.entry(uuid)?;
        let started = lock(&self.started);
        let Some(s) = started.get(uuid) else { return Ok("DEAD".into()) };
        if !*s.done.borrow() {
            return Ok("ALIVE".into());
        }
        Ok(match &*lock(&s.end) {
            Some(end @ (End::Failed(_) | End::Done { .. })) => format!("DEAD: {}", run::describe(end)),
            _ => "DEAD".into(),
        })
    }

    /// At boot: starts again every `onboot` plugin that was running. Returns how many failed.
    pub async fn restore_onboot(self: &Arc<Self>) -> usize {
        let reg = match self.registry() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(cause = %e, "cannot read the injected plugins");
                return 1;
            }
        };
        let mut failed = 0;
        for (uuid, e) in reg {
            if e.onboot && !e.callable && e.status == "operative" && !self.alive(&uuid) {
                match self.start(&uuid, None).await {
                    Ok(()) => tracing::info!(plugin = %e.name, "onboot plugin restarted"),
                    Err(err) => {
                        failed += 1;
                        tracing::warn!(plugin = %e.name, cause = %err, "onboot plugin not restarted");
                    }
                }
            }
        }
        failed
    }

    /// At exit: stops every run, all at once, and waits for them at most [`STOP_WAIT`]
    /// together (within systemd's stop timeout); their saved status stays, so `onboot` ones
    /// come back.
    pub async fn close_all(&self) {
        let mut waiting: Vec<(String, watch::Receiver<bool>)> = lock(&self.started)
            .iter()
            .filter(|(_, s)| !*s.done.borrow())
            .map(|(uuid, s)| {
                s.signal.stop();
                (uuid.clone(), s.done.clone())
            })
            .collect();
        let all = async {
            for (_, done) in &mut waiting {
                let _ = done.wait_for(|d| *d).await;
            }
        };
        if tokio::time::timeout(STOP_WAIT, all).await.is_err() {
            for (uuid, done) in &waiting {
                if !*done.borrow() {
                    tracing::warn!(plugin = uuid, "plugin did not stop within {STOP_WAIT:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

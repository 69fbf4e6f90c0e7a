//! The board's persistent state: identity, exposed services, VPN memberships.
//!
//! **Invariant:** a state file is always either its previous or its new complete version, even
//! after a power cut or `kill -9` in the middle of a write: [`atomic_write`] writes a temporary
//! file in the same directory, fsyncs it, renames it over the target and fsyncs the directory.
//! Files holding secrets are created with mode 0600 before any byte is written.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::secret::Secret;

const TMP_MARKER: &str = ".tmp-";
pub const IDENTITY_FILE: &str = "identity.json";
pub const SERVICES_FILE: &str = "services.json";
pub const VPNS_FILE: &str = "vpns.json";
/// The secret this board proposes at enrollment until its identity is saved: every retry
/// sends the same one, so the cloud can answer a repeated enrollment whose reply was lost.
pub const ENROLL_SECRET_FILE: &str = "enroll-secret.json";
/// The shortest pending enrollment secret kept (the cloud ignores a shorter proposal).
pub const MIN_ENROLL_SECRET: usize = 32;
/// Written and removed at once by [`StateStore::check_writable`].
const PROBE_FILE: &str = "write-probe";

/// What the agent keeps in its state directory (besides temporary files of these).
const OWN_ENTRIES: &[&str] = &[
    IDENTITY_FILE,
    SERVICES_FILE,
    VPNS_FILE,
    ENROLL_SECRET_FILE,
    PROBE_FILE,
    crate::plugins::PLUGINS_FILE,
    crate::plugins::CODE_DIR,
];

/// Whether `name` is a temporary file [`atomic_write`] makes for one of [`OWN_ENTRIES`]
/// (`.<name>.tmp-<pid>-<seq>`).
fn is_own_tmp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|rest| rest.split_once(TMP_MARKER))
        .is_some_and(|(file, _)| OWN_ENTRIES.contains(&file))
}

/// Numbers the temporary files of this process: two writes of one file at once (on two
/// blocking threads) each have their own, never one that the other truncates or renames away.
static TMP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// `.<name>.tmp-<pid>-<seq>` beside `path`, for the write numbered `seq`.
fn tmp_path(dir: &Path, name: &std::ffi::OsStr, seq: usize) -> PathBuf {
    dir.join(format!(".{}{TMP_MARKER}{}-{seq}", name.to_string_lossy(), std::process::id()))
}

/// The temporary files the next `count` writes of `path` in this process may use (one of them
/// if no other write happens meanwhile): for tests that put an obstacle where a save writes.
#[cfg(test)]
pub(crate) fn next_tmp_paths(path: &Path, count: usize) -> Vec<PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let next = TMP_SEQ.load(Ordering::Relaxed);
    (next..next + count).map(|seq| tmp_path(dir, path.file_name().unwrap(), seq)).collect()
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file. Writes of
/// one file may run at once (each has its own temporary file): the file is then one of them.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let werr = |source| Error::Write { path: path.to_owned(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| werr(std::io::Error::other("no file name")))?;
    let tmp = tmp_path(dir, name, TMP_SEQ.fetch_add(1, Ordering::Relaxed));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` is filtered by the umask and ignored for an existing file: set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

/// The state directory. Values are JSON documents, one file each.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Creates the directory (mode 0700) if needed and removes temporary files a crash left.
    /// On a read-only file system (ext4 remounts itself so after errors) it opens anyway, with
    /// a warning: the identity can still be read, and every write fails naming its file.
    ///
    /// The directory must be the agent's own: one that is not private yet and holds anything
    /// but the agent's files (an operator's `state_dir = "/var/lib"`) is refused, not made
    /// 0700 under the other daemons that use it; and only the agent's own temporary files
    /// (`.<state file>.tmp-…`) are ever removed.
    pub fn open(dir: &Path) -> Result<StateStore> {
        let werr = |source| Error::Write { path: dir.to_owned(), source };
        let rerr = |source| Error::Read { path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(werr)?;
        let mode = fs::metadata(dir).map_err(rerr)?.permissions().mode();
        if mode & 0o7777 != 0o700 {
            let foreign = fs::read_dir(dir).map_err(rerr)?.flatten().map(|e| e.file_name()).find(|name| {
                let name = name.to_string_lossy();
                !OWN_ENTRIES.contains(&name.as_ref()) && !is_own_tmp(&name)
            });
            if let Some(name) = foreign {
                return Err(Error::invalid(format!(
                    "board.state_dir {} is not the agent's own directory (it holds {:?}, which is not the agent's): \
                     give the agent a directory of its own, which it keeps private (0700)",
                    dir.display(),
                    name
                )));
            }
            match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                    tracing::warn!(dir = %dir.display(), mode = format_args!("{:o}", mode & 0o7777),
                        "the state directory is on a read-only file system: not made private; changes will not be saved");
                }
                Err(e) => return Err(werr(e)),
            }
        }
        for entry in fs::read_dir(dir).map_err(rerr)?.flatten() {
            if is_own_tmp(&entry.file_name().to_string_lossy()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(StateStore { dir: dir.to_owned() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `Ok(None)` when the file does not exist; an error naming the file when it is corrupt.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let path = self.path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::StateCorrupt { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    /// Saves `value` atomically with mode 0600 (every state file may hold a secret or token).
    pub fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.path(name);
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Write { path: path.clone(), source: std::io::Error::other(e) })?;
        atomic_write(&path, &bytes, 0o600)
    }

    /// [`StateStore::save`] on a blocking thread. The agent runs on one thread: a write and
    /// two fsyncs on a busy SD card can take a second, during which no tunnel, VPN packet or
    /// WAMP message would move. Async code saves with this.
    pub async fn save_async<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.path(name);
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Write { path: path.clone(), source: std::io::Error::other(e) })?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || atomic_write(&p, &bytes, 0o600))
            .await
            .map_err(|e| Error::Write { path, source: std::io::Error::other(e) })?
    }

    pub fn identity(&self) -> Result<Option<Identity>> {
        self.load(IDENTITY_FILE)
    }

    pub fn save_identity(&self, id: &Identity) -> Result<()> {
        self.save(IDENTITY_FILE, id)
    }

    /// The pending enrollment secret ([`ENROLL_SECRET_FILE`]): the saved one, else a fresh one
    /// (32 random bytes, URL-safe base64) saved first like the identity (0600, atomically).
    /// A file that is unreadable as such (corrupt, too short) is replaced, and so is one
    /// holding the secret of the saved identity: left over when power failed between saving
    /// the identity and removing this file, it would make a later re-enrollment (after a
    /// `rotate-secret`, the old secret maybe leaked) propose the same secret again.
    pub fn pending_enroll_secret(&self) -> Result<Secret> {
        let current = || self.identity().ok().flatten().and_then(|id| id.credentials).map(|c| c.secret);
        match self.load::<PendingEnrollment>(ENROLL_SECRET_FILE) {
            Ok(Some(p)) if current().as_ref() == Some(&p.secret) => {
                tracing::info!("the pending enrollment secret is the board's current one: a new one replaces it");
            }
            Ok(Some(p)) if p.secret.expose().len() >= MIN_ENROLL_SECRET => return Ok(p.secret),
            Ok(_) => {}
            Err(e @ Error::StateCorrupt { .. }) => {
                tracing::warn!(cause = %e, "the pending enrollment secret is unusable: a new one replaces it");
            }
            Err(e) => return Err(e),
        }
        use base64::Engine as _;
        let bytes: [u8; 32] = rand::random();
        let secret = Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        self.save(ENROLL_SECRET_FILE, &PendingEnrollment { secret: secret.clone() })?;
        Ok(secret)
    }

    /// Forgets the pending enrollment secret (the identity holds the board's secret now).
    pub fn remove_pending_enroll_secret(&self) -> Result<()> {
        let path = self.path(ENROLL_SECRET_FILE);
        match fs::remove_file(&path) {
            Ok(()) => File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|source| Error::Write { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Write { path, source }),
        }
    }

    /// Fails unless a file the size of an identity can be written and put in place here as
    /// the identity will be: checked before enrollment spends its one-time code, so that a
    /// full or read-only disk is an error to retry, not an identity the cloud issued and the
    /// board lost (its code then refused for good).
    pub fn check_writable(&self) -> Result<()> {
        let path = self.path(PROBE_FILE);
        atomic_write(&path, &[b' '; 4096], 0o600)?;
        fs::remove_file(&path).map_err(|source| Error::Write { path, source })
    }
}

/// Who this board is and where it logs in, as the cloud returned it at enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub uuid: String,
    pub name: String,
    /// The cloud's agent name: the `<agent>` of `<agent>.stack4things.connection`.
    pub agent: String,
    /// Main agent WAMP URL and realm.
    pub url: String,
    pub realm: String,
    /// Tunnel server, `ws[s]://cloud:8080/`; absent for an original cloud (then derived).
    #[serde(default)]
    pub tunnel_url: Option<String>,
    /// Absent for a board migrated from the original lightning-rod: it logs in anonymously.
    #[serde(default)]
    pub credentials: Option<Credentials>,
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
}

/// What [`ENROLL_SECRET_FILE`] holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingEnrollment {
    secret: Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub authid: String,
    pub secret: Secret,
}

/// Exposed services, keyed by service uuid.
pub type Services = BTreeMap<String, ExposedService>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposedService {
    pub name: String,
    pub local_port: u16,
    pub public_port: u16,
    #[serde(default)]
    pub tunnel_url: Option<String>,
    #[serde(default)]
    pub token: Option<Secret>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An async save waits on a blocking thread: the agent's one thread keeps serving while
    /// the disk stalls. The stall here is a FIFO where the save's temporary file goes: opening
    /// it for writing blocks until someone reads it. (Every name the save may take is one:
    /// writes of other tests in this process move the numbering on.)
    #[test]
    fn an_async_save_leaves_the_agents_thread_free() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let fifos = next_tmp_paths(&store.path(SERVICES_FILE), 256);
        for fifo in &fifos {
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        let (free_tx, free_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let save = tokio::spawn(async move { store.save_async(SERVICES_FILE, &Services::new()).await });
                // The save task runs (and, were it synchronous, would block this thread here).
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                free_tx.send(()).unwrap();
                // A reader on every FIFO lets the save's open return (its fsync of a FIFO fails).
                let nonblock = nix::fcntl::OFlag::O_NONBLOCK.bits();
                let readers: Vec<_> = fifos
                    .iter()
                    .map(|f| OpenOptions::new().read(true).custom_flags(nonblock).open(f).unwrap())
                    .collect();
                let _ = save.await;
                drop(readers);
            });
        });
        free_rx.recv_timeout(std::time::Duration::from_secs(20)).expect("the save blocked the agent's thread");
    }

    /// Writes of one file from several threads at once (the agent saves from blocking threads,
    /// and two saves of one file can overlap): every write succeeds, and the file always is
    /// one whole version, never a mix or a truncated one.
    #[test]
    fn concurrent_writes_of_one_file_all_succeed_and_leave_one_whole_version() {
        const WRITERS: usize = 4;
        const ROUNDS: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugins.json");
        // Versions of different lengths: a mix of two, or a truncated one, does not parse.
        let versions: Vec<Vec<u8>> = (0..WRITERS)
            .map(|w| serde_json::to_vec(&serde_json::json!({"writer": w, "pad": "x".repeat(1000 + 3000 * w)})).unwrap())
            .collect();
        for round in 0..ROUNDS {
            let start = std::sync::Barrier::new(WRITERS);
            let errors: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = versions
                    .iter()
                    .map(|v| {
                        let (start, path) = (&start, &path);
                        s.spawn(move || {
                            start.wait();
                            atomic_write(path, v, 0o600).err().map(|e| e.to_string())
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
            });
            assert!(errors.is_empty(), "round {round}: {errors:?}");
            let bytes = fs::read(&path).unwrap();
            assert!(versions.contains(&bytes), "round {round}: {} bytes of no version", bytes.len());
        }
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["plugins.json"], "temporary files left");
    }

    #[test]
    fn save_load_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.identity().unwrap(), None);
        let id = Identity {
            uuid: "b".into(),
            name: "n".into(),
            agent: "agent".into(),
            url: "ws://c:8181/".into(),
            realm: "s4t".into(),
            tunnel_url: None,
            credentials: Some(Credentials { authid: "b".into(), secret: Secret::new("s3cret") }),
            ca_fingerprint: None,
        };
        store.save_identity(&id).unwrap();
        assert_eq!(store.identity().unwrap(), Some(id));
        let mode = fs::metadata(store.path(IDENTITY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777, 0o700);
    }

    /// The state directory on a file system remounted read-only (what ext4 does after errors):
    /// the store opens and reads, whatever the directory's mode; writes fail naming the file.
    /// Runs on its own thread in a private mount namespace, so the mount is never seen outside.
    #[test]
    fn a_read_only_state_directory_still_opens_and_reads() {
        use nix::mount::{MsFlags, mount};
        let results = crate::test_support::in_private_tmpfs(MsFlags::empty(), |path| {
            let id = r#"{"uuid":"b","name":"n","agent":"a","url":"ws://c:8181/","realm":"s4t"}"#;
            for (name, mode) in [("open", 0o755), ("private", 0o700)] {
                let state = path.join(name);
                fs::create_dir(&state).unwrap();
                fs::set_permissions(&state, fs::Permissions::from_mode(mode)).unwrap();
                fs::write(state.join(IDENTITY_FILE), id).unwrap();
            }
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, path, None::<&str>, flags, None::<&str>).unwrap();
            ["open", "private"].map(|name| {
                let store = StateStore::open(&path.join(name)).map_err(|e| e.to_string())?;
                let uuid = store.identity().map_err(|e| e.to_string())?.map(|id| id.uuid);
                let write = store.save(SERVICES_FILE, &Services::new()).unwrap_err().to_string();
                Ok::<_, String>((uuid, write))
            })
        });
        for r in results {
            let (uuid, write) = r.unwrap();
            assert_eq!(uuid.as_deref(), Some("b"));
            assert!(write.contains(SERVICES_FILE) && write.contains("Read-only"), "{write}");
        }
    }

    /// A directory shared with others (an operator's `state_dir = "/var/lib"`) is refused and
    /// left as it was: neither made private nor cleaned of files that merely look temporary.
    /// A private directory opens whatever else it holds, and loses only the agent's own
    /// temporary files.
    #[test]
    fn a_shared_directory_is_refused_untouched_and_only_own_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("lib");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["dpkg", ".dpkg.tmp-1", ".services.json.tmp-1-2"] {
            fs::write(shared.join(name), b"x").unwrap();
        }
        let err = StateStore::open(&shared).unwrap_err().to_string();
        assert!(err.contains("not the agent's own directory") && err.contains("dpkg"), "{err}");
        assert_eq!(fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::read_dir(&shared).unwrap().count(), 3, "a file of a shared directory was removed");

        fs::set_permissions(&shared, fs::Permissions::from_mode(0o700)).unwrap();
        StateStore::open(&shared).unwrap();
        let mut left: Vec<_> = fs::read_dir(&shared).unwrap().flatten().map(|e| e.file_name()).collect();
        left.sort();
        assert_eq!(left, [".dpkg.tmp-1", "dpkg"]);

        // A directory holding only the agent's files (an older install, a package's empty one)
        // is made private.
        let own = dir.path().join("own");
        fs::create_dir(&own).unwrap();
        fs::set_permissions(&own, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(own.join("plugins")).unwrap();
        fs::write(own.join(IDENTITY_FILE), b"{}").unwrap();
        StateStore::open(&own).unwrap();
        assert_eq!(fs::metadata(&own).unwrap().permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn corrupt_file_is_a_clear_error_and_stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), b"{\"uuid\": ").unwrap();
        fs::write(dir.path().join(format!(".identity.json{TMP_MARKER}123")), b"junk").unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let err = store.identity().unwrap_err().to_string();
        assert!(err.contains("identity.json") && err.contains("corrupt"), "{err}");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}

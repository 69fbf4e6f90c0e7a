//! The state file survives `kill -9` in the middle of writes: a child process rewrites it in a
//! loop with large, self-checking versions; the parent kills it at many points and each time
//! finds a complete version, never older than the last one it saw.
//!
//! The child is this same test executable, re-run with `LR_STATE_WRITER` set.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lightning_rod::state::StateStore;
use serde::{Deserialize, Serialize};

const FILE: &str = "identity.json";
const ENV: &str = "LR_STATE_WRITER";

#[derive(Serialize, Deserialize)]
struct Version {
    seq: u64,
    /// 200 KiB of one repeated character derived from `seq`: a torn write would mix versions.
    payload: String,
}

fn fill(seq: u64) -> String {
    let c = (b'a' + (seq % 26) as u8) as char;
    std::iter::repeat_n(c, 200 * 1024).collect()
}

fn check(store: &StateStore) -> u64 {
    let v: Version = store.load(FILE).expect("state file must parse after kill -9").expect("state file exists");
    assert_eq!(v.payload, fill(v.seq), "version {} is torn", v.seq);
    v.seq
}

/// The child: writes versions start.. forever (until killed).
#[test]
fn writer_child() {
    let Some(dir) = std::env::var_os(ENV) else { return };
    let store = StateStore::open(Path::new(&dir)).unwrap();
    let start = store.load::<Version>(FILE).unwrap().map_or(0, |v| v.seq + 1);
    for seq in start.. {
        store.save(FILE, &Version { seq, payload: fill(seq) }).unwrap();
    }
}

#[test]
fn state_survives_kill_9_during_writes() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last = 0;
    for round in 0..15 {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the child has written at least two new versions, then kill it mid-loop.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Read directly: opening a StateStore would remove the writer's temporary file.
            let seen = std::fs::read(dir.path().join(FILE))
                .ok()
                .map(|b| serde_json::from_slice::<Version>(&b).expect("a reader saw a torn file"));
            if seen.is_some_and(|v| v.seq >= last + 2 + round % 3) {
                break;
            }
            assert!(Instant::now() < deadline, "writer made no progress in round {round}");
            assert!(child.try_wait().unwrap().is_none(), "writer exited early");
            std::thread::yield_now();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let seq = check(&store);
        assert!(seq >= last, "went back from {last} to {seq}");
        last = seq;
        // Opening the store removed the temporary file the killed writer may have left.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, [FILE], "round {round}");
    }
}

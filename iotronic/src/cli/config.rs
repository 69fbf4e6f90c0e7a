//! The login the CLI remembers: `~/.config/s4t/config.toml` (or `$XDG_CONFIG_HOME/s4t/…`, or
//! `--config`/`S4T_CONFIG`), written atomically with mode 0600 in a 0700 directory, because it
//! holds a bearer token.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Failure, Result};

/// A bearer token: never in `Debug` output or logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    pub fn new(t: impl Into<String>) -> Self {
        Token(t.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// What `s4t login` stores.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// REST endpoint, e.g. `http://cloud:8812`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// Seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Pin of the cloud's CA (`sha256:HEX`) for https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

/// Where the configuration lives unless `--config` says otherwise.
pub fn default_path() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("s4t").join("config.toml"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".config").join("s4t").join("config.toml")),
        None => Err(Failure::usage("neither HOME nor XDG_CONFIG_HOME is set").with_hint("give --config FILE")),
    }
}

impl Config {
    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Failure::usage(format!("cannot read {}: {e}", path.display()))),
        };
        toml::from_str(&text).map_err(|e| {
            Failure::usage(format!("{} is not a valid s4t configuration: {e}", path.display()))
                .with_hint("fix it, or delete it and run `s4t login` again")
        })
    }

    /// Writes the file atomically (temporary file, fsync, rename) with mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| Failure::internal(format!("cannot {what} {}: {e}", path.display()));
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the folder of", e))?;
        let text =
            toml::to_string(self).map_err(|e| Failure::internal(format!("cannot encode the configuration: {e}")))?;
        let tmp = dir.join(format!(".{}.tmp{}", file_name(path), std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // An existing temporary file keeps its mode through open(): force 0600.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(b"# Written by `s4t login`; holds a bearer token (keep it 0600).\n")?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail("write", e)
        })
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config.toml".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_0600_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s4t").join("config.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default(), "a missing file is an empty config");
        let c = Config {
            url: Some("http://cloud:8812".into()),
            user: Some("alice".into()),
            project: Some("p".into()),
            token: Some(Token::new("secret-token")),
            expires_at: Some(1_900_000_000),
            ca_fingerprint: None,
        };
        c.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        assert_eq!(Config::load(&path).unwrap(), c);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let c = Config { token: Some(Token::new("hunter2-token")), ..Config::default() };
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("***"), "{dbg}");
    }

    #[test]
    fn a_broken_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "url = [nope").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(e.message.contains("not a valid s4t configuration"), "{e}");
        std::fs::write(&path, "colour = \"blue\"\n").unwrap();
        assert!(Config::load(&path).is_err(), "unknown keys are refused");
    }
}

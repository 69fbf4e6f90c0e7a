//! Start-up: the configuration pipeline (file → legacy import → flags/env → validate) and the
//! board's identity (state directory, else the original's settings.json).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_CONFIG_PATH, Overrides};
use crate::error::Result;
use crate::legacy::{LegacySettings, apply_legacy_conf};
use crate::state::{IDENTITY_FILE, Identity, StateStore};

/// The effective configuration. `path` None means the default path, where a missing file is
/// allowed. When the TOML file does not exist, the original `iotronic.conf` timers and
/// `settings.json` URL and code fill in (migration); flags and env override everything.
pub fn load_config(path: Option<&Path>, overrides: Overrides) -> Result<Config> {
    let explicit = path.is_some();
    let path: PathBuf = path.map_or_else(|| DEFAULT_CONFIG_PATH.into(), Path::to_path_buf);
    let file_exists = path.exists();
    let mut config = Config::load(&path, explicit)?;
    if let Some(warning) = readable_code_warning(&path, &config) {
        tracing::warn!("{warning}");
    }
    // Legacy file locations may themselves be overridden.
    let mut probe = config.clone();
    overrides.clone().apply(&mut probe);
    if !file_exists {
        apply_legacy_conf(&probe.cloud.legacy_conf, &mut config)?;
    }
    match LegacySettings::load(&probe.cloud.legacy_settings) {
        Ok(Some(legacy)) => legacy.apply(&mut config),
        Ok(None) => {}
        // A migrated board keeps its identity in the state directory: the original's file
        // (which the Python agent does not write atomically) is no longer needed to start.
        Err(e) if probe.board.state_dir.join(IDENTITY_FILE).is_file() => {
            tracing::warn!(cause = %e, "ignoring the original lightning-rod's settings: the identity is in the state directory");
        }
        Err(e) => return Err(e),
    }
    overrides.apply(&mut config);
    config.validate()?;
    Ok(config)
}

/// The warning for a config file that holds a registration code (`[cloud] code`, as `config`
/// read it from `path`) and that other local users can read: any of them could enroll as this
/// board before it does. Names the file, never the code.
fn readable_code_warning(path: &Path, config: &Config) -> Option<String> {
    config.cloud.code.as_ref()?;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o044 != 0).then(|| {
        format!(
            "{} holds a registration code (cloud.code) and is readable by other users ({:o}): chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

/// The identity in the state directory; else, for a board the original cloud registered,
/// the one in its settings.json (saved to the state directory, so the import happens once).
pub fn identity(config: &Config, store: &StateStore) -> Result<Option<Identity>> {
    if let Some(id) = store.identity()? {
        return Ok(Some(id));
    }
    let Some(legacy) = LegacySettings::load(&config.cloud.legacy_settings)? else { return Ok(None) };
    let Some(id) = legacy.identity else { return Ok(None) };
    tracing::info!(uuid = %id.uuid, settings = %config.cloud.legacy_settings.display(),
        "imported the identity of the original lightning-rod; logging in without credentials (legacy)");
    store.save_identity(&id)?;
    Ok(Some(id))
}

/// The tunnel server for an identity: the one the cloud gave, else the original's rule (the
/// WAMP host with port 8080 and the same scheme, S4T-REFERENCE §6.3).
pub fn tunnel_url(id: &Identity) -> String {
    if let Some(u) = &id.tunnel_url {
        return u.clone();
    }
    let (scheme, rest) = id.url.split_once("://").unwrap_or(("ws", &id.url));
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    format!("{scheme}://{host}:8080/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_settings_fill_in_when_the_toml_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let settings = dir.path().join("settings.json");
        std::fs::write(&settings, r#"{"iotronic":{"board":{"code":"C-1"},"wamp":{"registration-agent":{"url":"ws://r:8181/","realm":"s4t"}}}}"#).unwrap();
        let conf = dir.path().join("iotronic.conf");
        std::fs::write(&conf, "[autobahn]\nalive_timer = 600\n").unwrap();
        let o = Overrides {
            legacy_settings: Some(settings),
            legacy_conf: Some(conf),
            state_dir: Some(dir.path().join("state")),
            ..Default::default()
        };
        let c = load_config(Some(&dir.path().join("missing.toml")), o.clone());
        assert!(c.unwrap_err().to_string().contains("missing.toml"), "an explicit missing file is an error");
        let toml = dir.path().join("c.toml");
        std::fs::write(&toml, "[timers]\nalive_interval_s = 9\n").unwrap();
        let c = load_config(Some(&toml), o).unwrap();
        assert_eq!(c.cloud.url.as_deref(), Some("ws://r:8181/"));
        assert_eq!(c.cloud.code.as_ref().map(|s| s.expose()), Some("C-1"));
        assert_eq!(c.timers.alive_interval_s, 9, "iotronic.conf applies only without a TOML file");
    }

    /// A corrupt settings.json of the original agent stops only a board that still needs it:
    /// one whose identity is already in the state directory starts.
    #[test]
    fn a_corrupt_legacy_settings_file_stops_only_a_board_that_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = dir.path().join("settings.json");
        std::fs::write(&settings, r#"{"iotronic": {"board": {"co"#).unwrap();
        let toml = dir.path().join("c.toml");
        std::fs::write(&toml, "").unwrap();
        let state = dir.path().join("state");
        let o = Overrides { legacy_settings: Some(settings), state_dir: Some(state.clone()), ..Default::default() };
        let err = load_config(Some(&toml), o.clone()).unwrap_err().to_string();
        assert!(err.contains("settings.json"), "{err}");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join(IDENTITY_FILE), "{}").unwrap();
        load_config(Some(&toml), o).unwrap();
    }

    /// A config file holding a registration code warns while group or others can read it,
    /// naming the file and never the code.
    #[test]
    fn a_registration_code_in_a_readable_config_file_warns() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("c.toml");
        std::fs::write(&toml, "[cloud]\nurl = \"wss://r:8181/\"\ncode = \"SECRET-CODE-1\"\n").unwrap();
        let config = Config::load(&toml, true).unwrap();
        std::fs::set_permissions(&toml, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = readable_code_warning(&toml, &config).expect("no warning for a 0644 file holding a code");
        assert!(warning.contains(&toml.display().to_string()) && warning.contains("chmod 600"), "{warning}");
        assert!(!warning.contains("SECRET-CODE-1"), "the code leaked into the warning: {warning}");
        std::fs::set_permissions(&toml, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(readable_code_warning(&toml, &config).is_some(), "a group-readable file must warn");
        std::fs::set_permissions(&toml, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(readable_code_warning(&toml, &config), None);
        std::fs::write(&toml, "[cloud]\nurl = \"wss://r:8181/\"\n").unwrap();
        std::fs::set_permissions(&toml, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(readable_code_warning(&toml, &Config::load(&toml, true).unwrap()), None, "no code, no warning");
    }

    #[test]
    fn tunnel_url_follows_the_original_rule() {
        let mut id = Identity {
            uuid: "u".into(),
            name: "n".into(),
            agent: "a".into(),
            url: "wss://cloud.example:8181/".into(),
            realm: "s4t".into(),
            tunnel_url: None,
            credentials: None,
            ca_fingerprint: None,
        };
        assert_eq!(tunnel_url(&id), "wss://cloud.example:8080/");
        id.url = "ws://[2001:db8::1]:8181/".into();
        assert_eq!(tunnel_url(&id), "ws://[2001:db8::1]:8080/");
        id.tunnel_url = Some("ws://t:9/".into());
        assert_eq!(tunnel_url(&id), "ws://t:9/");
    }
}

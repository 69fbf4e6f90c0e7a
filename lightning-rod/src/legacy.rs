//! Migration from the original Python lightning-rod: reads `/etc/iotronic/settings.json`
//! (identity and WAMP URLs, S4T-REFERENCE §5.3) and `/etc/iotronic/iotronic.conf` (timers,
//! §6.1). A board that the original cloud already registered keeps its uuid and logs in
//! anonymously (legacy); one still holding a registration code enrolls with it.

use std::path::Path;

use serde_json::Value;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::state::Identity;

/// The code the original ships in its template until an operator sets one.
const PLACEHOLDER_CODE: &str = "<REGISTRATION-TOKEN>";

/// What the original settings tell us.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LegacySettings {
    pub code: Option<Secret>,
    pub registration_url: Option<String>,
    pub realm: Option<String>,
    /// Present once the original cloud registered the board.
    pub identity: Option<Identity>,
}

impl LegacySettings {
    /// Reads the settings file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<LegacySettings>> {
        match std::fs::read_to_string(path) {
            Ok(text) => LegacySettings::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path: path.to_owned(), source }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<LegacySettings> {
        let bad = |reason: String| Error::LegacySettings { path: path.to_owned(), reason };
        let doc: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let iot = doc.get("iotronic").ok_or_else(|| bad("no \"iotronic\" object".into()))?;
        let s = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let board = iot.get("board");
        let wamp = iot.get("wamp");
        let reg = wamp.and_then(|w| w.get("registration-agent"));
        let main = wamp.and_then(|w| w.get("main-agent"));
        let code = s(board.and_then(|b| b.get("code"))).filter(|c| c != PLACEHOLDER_CODE).map(Secret::new);
        let realm = s(main.and_then(|m| m.get("realm"))).or_else(|| s(reg.and_then(|r| r.get("realm"))));
        let uuid = s(board.and_then(|b| b.get("uuid")));
        let identity = match (uuid, s(main.and_then(|m| m.get("url")))) {
            (Some(uuid), Some(url)) => Some(Identity {
                // Saved as the board's identity at its first start: checked like one the
                // cloud returns at enrollment.
                url: crate::config::validate_ws_url(&url, "iotronic.wamp.main-agent.url")
                    .map(|()| url)
                    .map_err(|e| bad(e.to_string()))?,
                name: s(board.and_then(|b| b.get("name"))).unwrap_or_else(|| uuid.clone()),
                agent: s(board.and_then(|b| b.get("agent")))
                    .ok_or_else(|| bad("iotronic.board.agent is missing".into()))?,
                uuid,
                realm: realm.clone().unwrap_or_else(|| "s4t".into()),
                tunnel_url: None,
                credentials: None,
                ca_fingerprint: None,
            }),
            _ => None,
        };
        Ok(LegacySettings { code, registration_url: s(reg.and_then(|r| r.get("url"))), realm, identity })
    }

    /// Fills what the TOML config left unset: the registration URL, realm and code.
    pub fn apply(&self, config: &mut Config) {
        if config.cloud.url.is_none() {
            config.cloud.url = self.registration_url.clone();
        }
        if config.cloud.code.is_none() {
            config.cloud.code = self.code.clone();
        }
        if let Some(realm) = &self.realm
            && config.cloud.realm == "s4t"
        {
            config.cloud.realm = realm.clone();
        }
    }
}

/// Imports the `[autobahn]` timers of the original `iotronic.conf` (INI) into `config`.
/// Missing file: nothing to do. Unknown sections and keys are ignored (they belong to the
/// original's other modules); a timer that is not a number is an error naming the file.
pub fn apply_legacy_conf(path: &Path, config: &mut Config) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Read { path: path.to_owned(), source }),
    };
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let (key, value) = (key.trim(), value.trim());
        if section != "autobahn" {
            continue;
        }
        let slot = match key {
            "connection_timer" => &mut config.timers.connect_timeout_s,
            "alive_timer" => &mut config.timers.alive_interval_s,
            "rpc_alive_timer" => &mut config.timers.call_timeout_s,
            _ => continue,
        };
        *slot = value.parse().map_err(|_| Error::LegacySettings {
            path: path.to_owned(),
            reason: format!("[autobahn] {key} = {value:?} is not a number of seconds"),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTERED: &str = r#"{"iotronic": {"extra": {},
      "board": {"uuid": "8a5e0b7c-6c1f-4b6e-9d3e-2f1a0c9b8d7e", "code": "ABC", "name": "pi-1",
                "status": "operative", "agent": "ctrl-1", "type": "raspberry"},
      "wamp": {"registration-agent": {"url": "wss://cloud:8181/", "realm": "s4t"},
               "main-agent": {"url": "wss://agent1:8181/", "realm": "s4t"}}}}"#;

    #[test]
    fn registered_board_keeps_its_identity() {
        let s = LegacySettings::parse(REGISTERED, Path::new("settings.json")).unwrap();
        let id = s.identity.unwrap();
        assert_eq!(id.uuid, "8a5e0b7c-6c1f-4b6e-9d3e-2f1a0c9b8d7e");
        assert_eq!((id.agent.as_str(), id.url.as_str(), id.name.as_str()), ("ctrl-1", "wss://agent1:8181/", "pi-1"));
        assert!(id.credentials.is_none());
        assert_eq!(s.registration_url.as_deref(), Some("wss://cloud:8181/"));
    }

    #[test]
    fn first_boot_template_gives_no_code() {
        let t = r#"{"iotronic":{"board":{"code":"<REGISTRATION-TOKEN>"},
                    "wamp":{"registration-agent":{"url":"wss://host:8181/","realm":"s4t"}}}}"#;
        let s = LegacySettings::parse(t, Path::new("s")).unwrap();
        assert_eq!(s.code, None);
        assert_eq!(s.identity, None);
        let mut c = Config::default();
        s.apply(&mut c);
        assert_eq!(c.cloud.url.as_deref(), Some("wss://host:8181/"));
    }

    #[test]
    fn malformed_settings_name_the_file() {
        for bad in [
            "not json",
            "{}",
            r#"{"iotronic":{"board":{"uuid":"u"},"wamp":{"main-agent":{"url":"ws://a/"}}}}"#,
            r#"{"iotronic":{"board":{"uuid":"u","agent":"a"},"wamp":{"main-agent":{"url":"http://a/"}}}}"#,
        ] {
            let err = LegacySettings::parse(bad, Path::new("/etc/iotronic/settings.json")).unwrap_err();
            assert!(err.to_string().contains("/etc/iotronic/settings.json"), "{err}");
        }
    }

    #[test]
    fn conf_timers_are_imported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("iotronic.conf");
        std::fs::write(&p, "[DEFAULT]\nskip_cert_verify = True\n[autobahn]\nconnection_timer = 30\nalive_timer = 600\nrpc_alive_timer = 10\n").unwrap();
        let mut c = Config::default();
        apply_legacy_conf(&p, &mut c).unwrap();
        assert_eq!((c.timers.connect_timeout_s, c.timers.alive_interval_s, c.timers.call_timeout_s), (30, 600, 10));
        std::fs::write(&p, "[autobahn]\nalive_timer = soon\n").unwrap();
        assert!(apply_legacy_conf(&p, &mut c).unwrap_err().to_string().contains("alive_timer"));
    }
}

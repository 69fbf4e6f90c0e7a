//! Enrollment (docs/protocols.md, "Enrollment and login"): join as `enrollment` with the
//! one-time code as ticket, call `stack4things.register(code, session, secret)`, store the
//! identity the cloud returns. `secret` is the board's proposal, kept in the state directory
//! until the identity is saved: a retry after a lost reply sends it again, and the cloud
//! answers such a repeat (within an hour) with the same identity.

use serde_json::{Map, Value, json};

use super::link::{Auth, ConnectOptions, Connector};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::state::{Credentials, Identity, StateStore};

pub const REGISTER: &str = "stack4things.register";

/// The `{"message","result"}` JSON string the cloud answers with (also accepted as an object).
pub fn parse_wamp_message(v: &Value) -> Result<(String, Value)> {
    let obj = match v {
        Value::String(s) => {
            serde_json::from_str::<Value>(s).map_err(|e| Error::Wamp(format!("reply is not JSON: {e}")))?
        }
        other => other.clone(),
    };
    let result =
        obj.get("result").and_then(Value::as_str).ok_or_else(|| Error::Wamp(format!("reply has no result: {obj}")))?;
    let message = obj.get("message").cloned().unwrap_or(Value::Null);
    // The original sends the config as a dict; tolerate a JSON string holding it.
    let message = match message {
        Value::String(s) if s.starts_with('{') => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        m => m,
    };
    Ok((result.to_owned(), message))
}

/// The identity in a registration reply's config document (S4T-REFERENCE §5.3, plus our
/// `iotronic.credentials` and `iotronic.tunnel`).
pub fn identity_from_config(doc: &Value, ca_fingerprint: Option<String>) -> Result<Identity> {
    let s = |path: &[&str]| -> Option<String> {
        let mut v = doc;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
    };
    let need =
        |path: &[&str]| s(path).ok_or_else(|| Error::Wamp(format!("registration reply lacks {}", path.join("."))));
    let uuid = need(&["iotronic", "board", "uuid"])?;
    let credentials = match (s(&["iotronic", "credentials", "authid"]), s(&["iotronic", "credentials", "secret"])) {
        (Some(authid), Some(secret)) => Some(Credentials { authid, secret: Secret::new(secret) }),
        _ => None,
    };
    let url = need(&["iotronic", "wamp", "main-agent", "url"])?;
    crate::config::validate_ws_url(&url, "main-agent url")?;
    let tunnel_url = s(&["iotronic", "tunnel", "url"]);
    if let Some(t) = &tunnel_url {
        crate::config::validate_ws_url(t, "tunnel url")?;
    }
    Ok(Identity {
        name: s(&["iotronic", "board", "name"]).unwrap_or_else(|| uuid.clone()),
        agent: need(&["iotronic", "board", "agent"])?,
        realm: s(&["iotronic", "wamp", "main-agent", "realm"]).unwrap_or_else(|| "s4t".into()),
        tunnel_url,
        uuid,
        url,
        credentials,
        ca_fingerprint,
    })
}

/// Enrolls with `code` at `url` and saves the identity. A refusal (unknown or used code) is
/// [`Error::EnrollmentRefused`]; network trouble is [`Error::Wamp`].
pub async fn enroll(
    connector: &dyn Connector,
    config: &Config,
    url: &str,
    code: &Secret,
    store: &StateStore,
) -> Result<Identity> {
    crate::config::validate_ws_url(url, "--url")?;
    // The cloud uses the code up when it answers: a disk that cannot take the identity must
    // fail here (and be retried), not after.
    store.check_writable()?;
    // The same proposal on every try until the identity is saved.
    let proposed = store.pending_enroll_secret()?;
    let options = ConnectOptions {
        url: url.to_owned(),
        realm: config.cloud.realm.clone(),
        auth: Auth::Ticket { authid: "enroll".into(), ticket: code.clone() },
        ca_fingerprint: config.cloud.ca_fingerprint.clone(),
        timeout: std::time::Duration::from_secs(config.timers.connect_timeout_s),
    };
    let mut anonymous = false;
    let link = match connector.connect(options.clone()).await {
        // An original IoTronic cloud (Crossbar, anonymous only): enroll as the original
        // lightning-rod does; its reply carries no credentials, so the board logs in as legacy.
        Err(Error::AuthMethod(m)) => {
            tracing::info!(cause = %m, "the router does not take tickets; enrolling anonymously (original cloud)");
            anonymous = true;
            connector.connect(ConnectOptions { auth: Auth::Anonymous, ..options }).await
        }
        other => other,
    }
    .map_err(|e| match e {
        Error::Revoked(m) | Error::AuthMethod(m) => Error::EnrollmentRefused(m),
        e => e,
    })?;
    let mut kwargs = Map::new();
    kwargs.insert("code".into(), json!(code.expose()));
    kwargs.insert("session".into(), json!(link.session_id()));
    // The original cloud's `register(code, session)` takes no other argument.
    if !anonymous {
        kwargs.insert("secret".into(), json!(proposed.expose()));
    }
    let timeout = std::time::Duration::from_secs(config.timers.call_timeout_s);
    let reply = tokio::time::timeout(timeout, link.call(REGISTER.into(), vec![], kwargs))
        .await
        .map_err(|_| Error::Wamp(format!("{REGISTER} did not answer within {timeout:?}")))?;
    link.close().await;
    let (result, message) = parse_wamp_message(&reply?)?;
    if result != "SUCCESS" {
        return Err(Error::EnrollmentRefused(message.as_str().map_or_else(|| message.to_string(), str::to_owned)));
    }
    let id = identity_from_config(&message, config.cloud.ca_fingerprint.clone())?;
    if id.credentials.as_ref().is_some_and(|c| c.secret != proposed) {
        // A cloud that does not take proposals issued its own: that one counts.
        tracing::info!(uuid = %id.uuid, "the cloud issued a secret of its own");
    }
    if let Err(e) = store.save_identity(&id) {
        tracing::error!(uuid = %id.uuid, cause = %e, "enrolled, but the identity could not be saved: \
            retry within an hour (the same code and pending secret enroll again), \
            else the board needs a new code (s4t board rotate-secret)");
        return Err(e);
    }
    if let Err(e) = store.remove_pending_enroll_secret() {
        tracing::warn!(cause = %e, "cannot remove the pending enrollment secret");
    }
    tracing::info!(uuid = %id.uuid, agent = %id.agent, url = %id.url, authenticated = id.credentials.is_some(), "enrolled");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity saved from a registration reply: both URLs in it must be WebSocket URLs
    /// with a host (the board dials them at every start), else the enrollment fails naming
    /// the field, and nothing is saved.
    #[test]
    fn a_reply_with_a_bad_url_is_refused() {
        let reply = |main: &str, tunnel: &str| {
            serde_json::json!({"iotronic": {
                "board": {"uuid": "b", "agent": "a"},
                "wamp": {"main-agent": {"url": main, "realm": "s4t"}},
                "tunnel": {"url": tunnel},
            }})
        };
        let id = identity_from_config(&reply("wss://c:8181/", "wss://c:8080/"), None).unwrap();
        assert_eq!((id.url.as_str(), id.tunnel_url.as_deref()), ("wss://c:8181/", Some("wss://c:8080/")));
        for (main, tunnel, named) in [("http://c/", "wss://c:8080/", "main-agent"), ("wss://c/", "file:///x", "tunnel")]
        {
            let err = identity_from_config(&reply(main, tunnel), None).unwrap_err().to_string();
            assert!(err.contains(named) && err.contains("ws://"), "{err}");
        }
    }
}

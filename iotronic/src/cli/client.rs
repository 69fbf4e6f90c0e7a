//! The REST client: one `reqwest` client (rustls + ring), the bearer token, and the mapping of
//! the API's one error shape `{"error_message","code"}` to a [`Failure`] that says what to do.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::config::Token;
use super::error::{Failure, Kind, Result};
use super::output::fmt_time;

/// How long one HTTP exchange may take. The cloud answers a board call within its own call
/// timeout (30 s by default) with the result or 202.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest body printed back in an error message.
const MAX_ERROR_TEXT: usize = 500;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http[s]://host:port`, no trailing slash, no `/v1`.
    base: String,
    token: Option<Token>,
    /// Whether https trusts a pinned CA (`--ca-fingerprint`) rather than the public roots.
    pinned: bool,
}

/// A successful answer: its status (200, 201, 202, 204) and JSON body (`null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// Normalises what a user types as the cloud's URL.
pub fn normalize_url(url: &str) -> Result<String> {
    let u = url.trim().trim_end_matches('/');
    let u = u.strip_suffix("/v1").unwrap_or(u);
    let parsed = reqwest::Url::parse(u).map_err(|e| {
        Failure::usage(format!("{url:?} is not a URL: {e}")).with_hint("give the REST endpoint, e.g. http://cloud:8812")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(Failure::usage(format!("{url:?}: the cloud's URL is http://HOST:8812 or https://HOST:8812")));
    }
    Ok(u.to_owned())
}

/// Whether two URLs name the same cloud once normalised (a trailing `/` or `/v1`, the case of
/// the host, a default port written out do not make another cloud).
pub fn same_cloud(a: &str, b: &str) -> bool {
    let parse = |u: &str| normalize_url(u).ok().and_then(|u| reqwest::Url::parse(&u).ok());
    matches!((parse(a), parse(b)), (Some(a), Some(b)) if a == b)
}

/// Percent-encodes one path segment (board names may contain spaces).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(url: &str, token: Option<Token>, ca_fingerprint: Option<&str>) -> Result<Client> {
        let base = normalize_url(url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("s4t/", env!("CARGO_PKG_VERSION")));
        if let Some(fp) = ca_fingerprint {
            builder = builder.use_preconfigured_tls(super::tls::pinned(fp)?);
        }
        let http = builder.build().map_err(|e| Failure::internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client { http, base, token, pinned: ca_fingerprint.is_some() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The cloud's host name or address, as the URL gives it (public ports live there).
    pub fn host(&self) -> String {
        reqwest::Url::parse(&self.base).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default()
    }

    /// One request; any non-2xx answer becomes a [`Failure`].
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport_failure(&e))?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let text = resp.text().await.map_err(|e| self.transport_failure(&e))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))
        };
        if (200..300).contains(&status) {
            Ok(Reply { status, body })
        } else {
            Err(failure_of(status, &body, self.token.is_some(), retry_after))
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.call(Method::GET, path, None).await?.body)
    }

    /// A whole list: `GET path`, then every `next` page the cloud links (long lists come in
    /// pages of up to 1,000), joined as `{key: [...]}`.
    pub async fn get_all(&self, path: &str, key: &str) -> Result<Value> {
        let mut v = self.get(path).await?;
        let mut next = v.get("next").and_then(Value::as_str).map(str::to_owned);
        while let Some(page) = next.take() {
            let mut more = self.get(&page).await?;
            next = more.get("next").and_then(Value::as_str).map(str::to_owned);
            if let (Some(all), Some(Value::Array(items))) =
                (v.get_mut(key).and_then(Value::as_array_mut), more.get_mut(key).map(Value::take))
            {
                all.extend(items);
            }
        }
        if let Some(m) = v.as_object_mut() {
            m.remove("next");
        }
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Reply> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Reply> {
        self.call(Method::DELETE, path, None).await
    }

    fn transport_failure(&self, e: &reqwest::Error) -> Failure {
        let mut chain = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        if e.is_timeout() {
            return Failure::new(Kind::Timeout, format!("the cloud at {} did not answer in time: {chain}", self.base))
                .with_hint("the request may still complete: see `s4t request list`");
        }
        if chain.contains("certificate") || chain.contains("pinned CA") {
            return self.untrusted(&chain);
        }
        Failure::new(Kind::Unreachable, format!("cannot reach the cloud at {}: {chain}", self.base))
            .with_hint("is `iotronic serve` running there? check --url / S4T_URL (and --ca-fingerprint for https)")
    }

    /// The TLS handshake failed on the certificate: never retried without verification.
    fn untrusted(&self, chain: &str) -> Failure {
        if self.pinned {
            Failure::new(
                Kind::Unreachable,
                format!("the cloud at {} did not prove it holds the pinned CA: {chain}", self.base),
            )
            .with_hint(
                "compare --ca-fingerprint (or the one stored by `s4t login`) with DATA_DIR/ca.fingerprint on the \
                 cloud; if they match, something between you and the cloud is presenting its own certificate",
            )
        } else {
            Failure::new(
                Kind::Unreachable,
                format!("the cloud at {} presented a certificate no public CA vouches for: {chain}", self.base),
            )
            .with_hint(
                "pin the cloud's own CA: s4t login --url URL --user NAME --ca-fingerprint sha256:HEX \
                 (`iotronic serve` prints it; it is in DATA_DIR/ca.fingerprint on the cloud)",
            )
        }
    }
}

/// The seconds of a `Retry-After: N` header (the cloud never sends the HTTP-date form).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()
}

/// Maps an error answer of the API (and its `Retry-After`, for 429) to a failure with a hint.
pub fn failure_of(status: u16, body: &Value, had_token: bool, retry_after: Option<u64>) -> Failure {
    if status == 429 {
        return throttled(body, retry_after);
    }
    let message = match body.get("error_message").and_then(Value::as_str) {
        Some(m) => m.to_owned(),
        None => {
            let text = match body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let text: String = text.chars().take(MAX_ERROR_TEXT).collect();
            format!("the cloud answered {status}: {text}")
        }
    };
    let kind = match status {
        400 | 405 | 406 | 413 | 415 | 422 => Kind::Usage,
        401 => Kind::Auth,
        403 => Kind::Forbidden,
        404 => Kind::NotFound,
        409 => Kind::Conflict,
        502 => Kind::Board,
        503 => Kind::Offline,
        504 => Kind::Timeout,
        _ => Kind::Internal,
    };
    let f = Failure::new(kind, message);
    match kind {
        Kind::Auth if had_token => f.with_hint("your token is unknown or expired: run `s4t login` again"),
        Kind::Auth => f.with_hint("run `s4t login --url URL --user NAME` first"),
        Kind::Forbidden => f.with_hint("ask a cloud administrator or a manager of your project"),
        Kind::Conflict if body.get("lease").is_some() => {
            // Unix seconds (clouds before 2026-12 sent milliseconds here).
            let secs = |t: i64| if t > 100_000_000_000 { t / 1000 } else { t };
            let until = body.get("expires_at").and_then(Value::as_i64).map(|t| fmt_time(secs(t))).unwrap_or_default();
            f.with_hint(format!("another project has booked it until {until}; pick another board or wait"))
        }
        Kind::Offline => f.with_hint("queue the command with --queue; it runs when the board logs in"),
        Kind::Timeout => f.with_hint("the request may still complete: see `s4t request list`"),
        Kind::Internal => f.with_hint("the cloud's log has the details"),
        _ => f,
    }
}

/// 429: the cloud refuses this for now (e.g. too many wrong passwords for one user name). Says
/// how long to wait when the cloud did; trying again sooner is refused the same way.
fn throttled(body: &Value, retry_after: Option<u64>) -> Failure {
    let message = match retry_after {
        Some(s) => format!("too many attempts: the cloud refuses this for now; wait {s} s, then try again"),
        None => {
            let why = body.get("error_message").and_then(Value::as_str).unwrap_or("too many attempts");
            format!("{why}: the cloud refuses this for now; wait a while, then try again")
        }
    };
    let mut f = Failure::new(Kind::Throttled, message).with_hint(
        "attempts made before then are refused too; for `s4t login`, check the user name and password first",
    );
    f.retry_after = retry_after;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_normalised_or_refused() {
        assert_eq!(normalize_url("http://cloud:8812/").unwrap(), "http://cloud:8812");
        assert_eq!(normalize_url("http://cloud:8812/v1/").unwrap(), "http://cloud:8812");
        assert_eq!(normalize_url("https://10.0.0.1:8812").unwrap(), "https://10.0.0.1:8812");
        for bad in ["cloud:8812", "ftp://cloud", "", "http://"] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn same_cloud_compares_normalised_urls() {
        assert!(same_cloud("http://cloud:8812", "http://Cloud:8812/v1/"));
        assert!(same_cloud("https://cloud:443/", "https://cloud"));
        for other in ["http://cloud:8813", "https://cloud:8812", "http://cloud.evil:8812", "http://", "cloud:8812"] {
            assert!(!same_cloud("http://cloud:8812", other), "{other}");
        }
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(seg("pi 1/a?b"), "pi%201%2Fa%3Fb");
        assert_eq!(seg("GPIO17"), "GPIO17");
    }

    #[test]
    fn error_answers_map_to_kinds_and_hints() {
        let e = failure_of(401, &json!({"error_message": "the token is unknown or expired", "code": 401}), true, None);
        assert_eq!(e.kind, Kind::Auth);
        assert!(e.hint.unwrap().contains("s4t login"));
        let e = failure_of(
            409,
            &json!({"error_message": "leased", "code": 409, "lease": "L", "board": "B", "expires_at": 1_900_000_000_000i64}),
            true,
            None,
        );
        assert_eq!(e.kind, Kind::Conflict);
        assert!(e.hint.unwrap().contains("2030-03-17"), "expiry shown as a date");
        assert_eq!(failure_of(503, &json!({"error_message": "x"}), true, None).kind, Kind::Offline);
        assert_eq!(failure_of(502, &json!({"error_message": "x"}), true, None).kind, Kind::Board);
        let e = failure_of(500, &Value::String("<html>oops</html>".into()), true, None);
        assert_eq!(e.kind, Kind::Internal);
        assert!(e.message.contains("500") && e.message.contains("oops"), "{}", e.message);
    }

    #[test]
    fn a_cloud_error_cannot_drive_the_terminal() {
        let e =
            failure_of(502, &json!({"error_message": "no line GPIO\u{1b}]0;x\u{7}\u{9b}2J", "code": 502}), true, None);
        let shown = e.to_string();
        assert!(!shown.contains(['\u{1b}', '\u{7}', '\u{9b}']) && shown.contains("GPIO\\u{1b}]0;x"), "{shown:?}");
        let json = e.to_json().to_string();
        assert!(!json.contains(['\u{1b}', '\u{9b}']), "{json:?}");
    }

    #[test]
    fn too_many_requests_say_how_long_to_wait() {
        let body = json!({"error_message": "too many attempts: try again in 30 s", "code": 429});
        let e = failure_of(429, &body, false, Some(30));
        assert_eq!((e.kind, e.kind.exit_code(), e.retry_after), (Kind::Throttled, 11, Some(30)));
        assert!(e.message.contains("wait 30 s"), "{}", e.message);
        assert_eq!(e.to_json()["retry_after"], 30);
        let e = failure_of(429, &Value::Null, true, None);
        assert!(e.message.contains("wait a while") && e.to_json().get("retry_after").is_none(), "{}", e.message);
    }
}

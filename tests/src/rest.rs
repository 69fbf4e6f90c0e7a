//! A small blocking client for the cloud's REST API, used from inside a lab namespace: plain
//! HTTP/1.1, one connection per request (`Connection: close`), JSON bodies.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Host, read_to_end_limited, wait_a_little};

/// Largest response the client reads.
const MAX_RESPONSE: usize = 4 << 20;
/// How long one request may take (a call to a board under emulation is slow).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The REST API at `addr`, reached from `host`'s namespace.
pub struct Rest {
    host: Host,
    addr: SocketAddr,
    token: Option<String>,
}

impl Rest {
    pub fn new(host: &Host, addr: SocketAddr) -> Rest {
        Rest { host: host.clone(), addr, token: None }
    }

    /// Waits until `GET /v1` answers 200 (the cloud is ready).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.call("GET", "/v1", None) {
                Ok((200, _)) => return Ok(()),
                other if Instant::now() >= deadline => bail!("{} not ready within {timeout:?}: {other:?}", self.addr),
                _ => wait_a_little(),
            }
        }
    }

    /// `POST /v1/auth/tokens`; later requests carry the token.
    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        let (status, v) =
            self.call("POST", "/v1/auth/tokens", Some(&json!({"username": user, "password": password})))?;
        if status != 201 {
            bail!("login as {user} answered {status}: {v}");
        }
        self.token = Some(v["token"].as_str().context("no token in the login answer")?.to_owned());
        Ok(())
    }

    /// Later requests carry `token` (None: no token).
    pub fn set_token(&mut self, token: Option<&str>) {
        self.token = token.map(str::to_owned);
    }

    /// Creates a board with a registration code; returns its JSON.
    pub fn create_board(&self, name: &str, code: &str) -> Result<Value> {
        let body = json!({"name": name, "code": code, "type": "generic",
                          "location": [{"latitude": "38.2", "longitude": "15.5", "altitude": "3"}]});
        let (status, v) = self.call("POST", "/v1/boards", Some(&body))?;
        if status != 201 {
            bail!("creating board {name} answered {status}: {v}");
        }
        Ok(v)
    }

    /// Waits until the board's `status` is `want`.
    pub fn wait_status(&self, board: &str, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, v) = self.call("GET", &format!("/v1/boards/{board}"), None)?;
            if v["status"] == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("board {board} did not become {want} within {timeout:?}: {v}");
            }
            wait_a_little();
        }
    }

    /// Like [`Rest::call`], but anything but `want` is an error that shows the answer.
    pub fn expect(&self, want: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, v) = self.call(method, path, body)?;
        if status != want {
            bail!("{method} {path} answered {status}, not {want}: {v}");
        }
        Ok(v)
    }

    /// One request; returns the status and the body (JSON, or a JSON string when it is not).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut conn =
            self.host.connect(self.addr, Duration::from_secs(5)).with_context(|| format!("connect {}", self.addr))?;
        conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        conn.write_all(head.as_bytes())?;
        conn.write_all(body.as_bytes())?;
        let raw = read_to_end_limited(&mut conn, MAX_RESPONSE).with_context(|| format!("{method} {path}"))?;
        parse_response(&raw).with_context(|| format!("{method} {path}"))
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, Value)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("headers are not UTF-8")?;
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status code")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    let text = String::from_utf8_lossy(&body).into_owned();
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n").context("chunk size without CRLF")?;
        let size = std::str::from_utf8(&body[..eol])?.split(';').next().unwrap_or("").trim().to_owned();
        let size = usize::from_str_radix(&size, 16).with_context(|| format!("bad chunk size {size:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 201 Created\r\ncontent-length: 11\r\n\r\n{\"a\":[1,2]}";
        assert_eq!(parse_response(plain).unwrap(), (201, json!({"a": [1, 2]})));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n:7}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, json!({"b": 7})));
        let text = b"HTTP/1.1 502 Bad Gateway\r\n\r\noops";
        assert_eq!(parse_response(text).unwrap(), (502, json!("oops")));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}

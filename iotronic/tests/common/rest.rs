//! The REST client the end-to-end tests share: a bearer token and one call that returns the
//! status and the body (JSON, or the text as a JSON string when it is not JSON).

use reqwest::StatusCode;
use serde_json::Value;

pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
    pub token: String,
}

impl Api {
    pub async fn req(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        call(&self.http, &self.url, method, path, Some(&self.token), body).await
    }
}

/// `method` `path` on the API at `url` (with a bearer `token`, a JSON `body`): the status and
/// the body (JSON, or the text as a JSON string when it is not JSON).
pub async fn call(
    http: &reqwest::Client,
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = http.request(method.parse().unwrap(), format!("{url}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

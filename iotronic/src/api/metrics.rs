//! `/metrics` in the Prometheus text format: HTTP answers and latency from counters kept
//! here, boards, sessions, requests, tunnels and queue depth read from the database.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiResult;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    responses: Mutex<BTreeMap<u16, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn observe_http(&self, status: u16, elapsed: Duration) {
        *self.responses.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Board calls by action; the set of actions is closed (validated), so labels stay bounded.
    pub fn count_call(&self, action: &str) {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner()).entry(action.to_owned()).or_default() += 1;
    }

    fn render_http(&self, out: &mut String) {
        out.push_str("# HELP iotronic_http_responses_total HTTP responses by status.\n# TYPE iotronic_http_responses_total counter\n");
        for (status, n) in self.responses.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "iotronic_http_responses_total{{status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP iotronic_http_request_duration_seconds REST request latency.\n# TYPE iotronic_http_request_duration_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let n = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "iotronic_http_request_duration_seconds_bucket{{le=\"{b}\"}} {n}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "iotronic_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "iotronic_http_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "iotronic_http_request_duration_seconds_count {count}");
        out.push_str("# HELP iotronic_board_calls_total Board calls accepted, by action.\n# TYPE iotronic_board_calls_total counter\n");
        for (a, n) in self.calls.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "iotronic_board_calls_total{{action=\"{a}\"}} {n}");
        }
    }
}

pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let mut out = String::new();
    state.metrics.render_http(&mut out);
    let boards = state.db.count_boards_by_status().await?;
    out.push_str("# HELP iotronic_boards Boards by status.\n# TYPE iotronic_boards gauge\n");
    for s in ["registered", "offline", "online"] {
        let n = boards.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "iotronic_boards{{status=\"{s}\"}} {n}");
    }
    let online = boards.iter().find(|(k, _)| k == "online").map_or(0, |(_, n)| *n);
    let _ = writeln!(
        out,
        "# HELP iotronic_sessions Board WAMP sessions.\n# TYPE iotronic_sessions gauge\niotronic_sessions {online}"
    );
    let requests = state.db.count_requests_by_status().await?;
    out.push_str("# HELP iotronic_requests Requests by status.\n# TYPE iotronic_requests gauge\n");
    for (s, n) in &requests {
        let _ = writeln!(out, "iotronic_requests{{status=\"{s}\"}} {n}");
    }
    let depth: i64 = requests.iter().filter(|(s, _)| s == "QUEUED" || s == "PENDING").map(|(_, n)| n).sum();
    let _ = writeln!(
        out,
        "# HELP iotronic_queue_depth Requests waiting (pending or queued for offline boards).\n# TYPE iotronic_queue_depth gauge\niotronic_queue_depth {depth}"
    );
    let tunnels = state.db.count_exposures().await?;
    let _ = writeln!(
        out,
        "# HELP iotronic_tunnels Services exposed on public ports.\n# TYPE iotronic_tunnels gauge\niotronic_tunnels {tunnels}"
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

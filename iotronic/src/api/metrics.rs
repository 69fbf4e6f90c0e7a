//! `/metrics` in the Prometheus text format: HTTP answers and latency from counters kept
//! here, boards, sessions, requests, tunnels and queue depth read from the database, and the
//! data plane's counters each wstun-agent stores there. Cloud-wide (every project's VPNs by
//! uuid, with their traffic), so for cloud administrators only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiResult;
use super::{AppState, Caller};
use crate::wstun_agent::AgentStats;

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

pub async fn metrics(State(state): State<AppState>, Extension(c): Extension<Caller>) -> ApiResult<Response> {
    c.require_admin("reading /metrics (cloud-wide counters)")?;
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
    render_tunnel_agents(&state.db, &mut out).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The data plane, from what each wstun-agent last stored ([`AgentStats`], every
/// [`STATS_EVERY`](crate::wstun_agent::STATS_EVERY)): channels, listeners, streams, payload
/// bytes and refusals of its tunnel server, packets of each VPN.
async fn render_tunnel_agents(db: &crate::db::Db, out: &mut String) -> ApiResult<()> {
    let mut agents = Vec::new();
    for (name, json, at) in db.agent_stats("wstun").await? {
        match serde_json::from_str::<AgentStats>(&json) {
            Ok(s) => agents.push((label(&name), s, at)),
            Err(e) => tracing::warn!(agent = name, cause = %e, "unreadable agent stats: skipped"),
        }
    }
    let now = crate::db::now_ms();
    type Get = fn(&wstunnel::TrafficStats) -> u64;
    let series: [(&str, &str, &str, Get); 8] = [
        ("iotronic_tunnel_channels", "gauge", "Board tunnel channels connected.", |t| t.channels_open),
        ("iotronic_tunnel_lanes", "gauge", "Extra connections (lanes) of board channels.", |t| t.lanes_open),
        ("iotronic_tunnel_channels_total", "counter", "Board tunnel channels accepted.", |t| t.channels_total),
        ("iotronic_tunnel_listeners", "gauge", "Public listeners open.", |t| t.listeners_open),
        ("iotronic_tunnel_streams", "gauge", "Tunneled TCP connections open.", |t| t.streams_open),
        ("iotronic_tunnel_streams_total", "counter", "Tunneled TCP connections carried.", |t| t.streams_total),
        ("iotronic_tunnel_refusals_total", "counter", "Listener and VPN requests refused.", |t| t.refusals_total),
        (
            "iotronic_tunnel_public_refusals_total",
            "counter",
            "Connections to public ports closed at accept, beyond a bound.",
            |t| t.public_refusals_total,
        ),
    ];
    for (metric, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {metric} {help} By wstun-agent.\n# TYPE {metric} {kind}");
        for (agent, s, _) in &agents {
            let _ = writeln!(out, "{metric}{{agent=\"{agent}\"}} {}", get(&s.tunnel));
        }
    }
    out.push_str(
        "# HELP iotronic_tunnel_stats_age_seconds Age of the wstun-agent's last report (a stopped agent's grows).\n\
         # TYPE iotronic_tunnel_stats_age_seconds gauge\n",
    );
    for (agent, _, at) in &agents {
        let age = (now - at).max(0) as f64 / 1000.0;
        let _ = writeln!(out, "iotronic_tunnel_stats_age_seconds{{agent=\"{agent}\"}} {age}");
    }
    out.push_str(
        "# HELP iotronic_tunnel_bytes_total Tunneled payload bytes, by wstun-agent and direction.\n\
         # TYPE iotronic_tunnel_bytes_total counter\n",
    );
    for (agent, s, _) in &agents {
        let t = &s.tunnel;
        let _ =
            writeln!(out, "iotronic_tunnel_bytes_total{{agent=\"{agent}\",direction=\"to_boards\"}} {}", t.bytes_sent);
        let _ = writeln!(
            out,
            "iotronic_tunnel_bytes_total{{agent=\"{agent}\",direction=\"from_boards\"}} {}",
            t.bytes_received
        );
    }
    out.push_str(
        "# HELP iotronic_vpn_packets_total VPN packets through the cloud, by wstun-agent, VPN and outcome.\n\
         # TYPE iotronic_vpn_packets_total counter\n",
    );
    for (agent, s, _) in &agents {
        for (vpn, p) in &s.vpns {
            let vpn = label(vpn);
            let kinds = [
                ("sent", p.sent),
                ("received", p.received),
                ("forwarded", p.forwarded),
                ("dropped", p.dropped),
                ("malformed", p.malformed),
            ];
            for (kind, n) in kinds {
                let _ =
                    writeln!(out, "iotronic_vpn_packets_total{{agent=\"{agent}\",vpn=\"{vpn}\",kind=\"{kind}\"}} {n}");
            }
        }
    }
    Ok(())
}

//! The client side: opening N board sessions, and calls at a fixed offered load.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use s4t_shared::wamp::auth::{DEFAULT_ITERATIONS, DEFAULT_KEYLEN};
use s4t_wamp::{ClientAuth, ClientConfig, Payload, Secret, Serializer, Session, connect};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::router;

pub struct Prepared {
    configs: Vec<(String, ClientConfig)>,
    key_derivation: Duration,
}

/// Client configurations for boards `0..n`, with their WAMP-CRA keys derived up front (a
/// board derives its key once; 10,000 of them on this machine's cores would otherwise be
/// measured as router time).
pub fn prepare(url: &str, n: usize, serializer: Serializer, tls: Option<Arc<rustls::ClientConfig>>) -> Prepared {
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let chunk = n.div_ceil(threads).max(1);
    let configs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let tls = tls.clone();
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| {
                            let (authid, secret, salt) = router::board(i);
                            let mut c =
                                ClientConfig::new(url, "s4t", ClientAuth::WampCra { authid: authid.clone(), secret });
                            c.serializer = serializer;
                            c.tls = tls.clone();
                            c.connect_timeout = Duration::from_secs(60);
                            c.precompute_cra_key(&salt, DEFAULT_ITERATIONS, DEFAULT_KEYLEN);
                            (authid, c)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("derivation thread")).collect()
    });
    Prepared { configs, key_derivation: started.elapsed() }
}

pub struct Opened {
    pub sessions: Vec<(String, Session)>,
    pub elapsed: Duration,
    pub key_derivation: Duration,
}

/// Connects and authenticates every board, `concurrency` at a time; the wall time is from the
/// first connect to the last WELCOME.
pub async fn open_all(prepared: Prepared, concurrency: usize) -> Result<Opened> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (authid, config) in prepared.configs {
        let permit = permits.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let session = connect(&config).await;
            drop(permit);
            session.map(|s| (authid, s))
        });
    }
    let mut sessions = Vec::new();
    let mut failures = 0usize;
    let mut first_failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(s) => sessions.push(s),
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert_with(|| s4t_wamp::error_chain(&e));
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(e) = first_failure {
        anyhow::bail!("{failures} sessions failed to open; first: {e}");
    }
    Ok(Opened { sessions, elapsed, key_derivation: prepared.key_derivation })
}

/// The caller: an agent session (ticket).
pub async fn agent(url: &str, serializer: Serializer, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Session> {
    let auth = ClientAuth::Ticket { authid: "agent".into(), ticket: Secret::new(router::AGENT_TICKET) };
    let mut config = ClientConfig::new(url, "s4t", auth);
    config.serializer = serializer;
    config.tls = tls;
    connect(&config).await.context("agent session")
}

/// The first `k` boards register `iotronic.<session>.<uuid>.DeviceEcho`; returns the URIs.
pub async fn register_callees(sessions: &[(String, Session)], k: usize) -> Result<Vec<String>> {
    let mut procedures = Vec::new();
    for (authid, s) in sessions.iter().take(k.max(1)) {
        let p = format!("iotronic.{}.{authid}.DeviceEcho", s.id());
        s.register(&p, |inv| async move { Ok(Payload::new(inv.args, inv.kwargs)) }).await?;
        procedures.push(p);
    }
    Ok(procedures)
}

pub struct Run {
    rate: u32,
    sent: usize,
    pub ok: usize,
    pub errors: usize,
    pub error_kinds: std::collections::BTreeMap<String, usize>,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub max_lag_ms: f64,
    /// Router process CPU time (user + system) per completed call during the run.
    pub router_cpu_us_per_call: f64,
}

impl Run {
    pub fn json(&self) -> Value {
        json!({
            "offered_per_s": self.rate, "sent": self.sent, "ok": self.ok, "errors": self.errors,
            "error_kinds": self.error_kinds,
            "achieved_per_s": self.achieved.round(), "p50_ms": round3(self.p50_ms), "p99_ms": round3(self.p99_ms),
            "max_ms": round3(self.max_ms), "max_issue_lag_ms": round3(self.max_lag_ms),
            "router_cpu_us_per_call": (self.router_cpu_us_per_call * 10.0).round() / 10.0,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Issues `rate` calls per second for `duration`, each on schedule whatever the previous
/// ones did (open loop), round-robin over `targets`; measures each round trip from the
/// moment the call is issued. `max_lag` says how late the scheduler issued calls.
pub async fn offered_load(agent: &Session, targets: &[String], rate: u32, duration: Duration) -> Run {
    let total = (u64::from(rate) * duration.as_secs()) as usize;
    let interval = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = JoinSet::new();
    let mut max_lag = Duration::ZERO;
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
        let agent = agent.clone();
        let procedure = targets[i % targets.len()].clone();
        tasks.spawn(async move {
            let issued = Instant::now();
            let r = agent
                .call(&procedure, vec![json!({"uuid": format!("req-{i}")})], Default::default(), Duration::from_secs(5))
                .await;
            r.map(|_| issued.elapsed()).map_err(|e| match e.wamp_uri() {
                Some(uri) => uri.to_owned(),
                None => e.to_string(),
            })
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    let mut error_kinds = std::collections::BTreeMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(latency)) => latencies.push(latency),
            Ok(Err(kind)) => {
                errors += 1;
                *error_kinds.entry(kind).or_default() += 1;
            }
            Err(e) => {
                errors += 1;
                *error_kinds.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1e3
    };
    Run {
        rate,
        sent: total,
        ok: latencies.len(),
        errors,
        error_kinds,
        achieved: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        max_lag_ms: max_lag.as_secs_f64() * 1e3,
        router_cpu_us_per_call: 0.0,
    }
}

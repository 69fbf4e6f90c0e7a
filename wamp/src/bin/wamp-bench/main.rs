//! `wamp-bench`: N simulated boards against one router running as a separate process.
//!
//! ```text
//! cargo run --release -p s4t-wamp --bin wamp-bench -- --sessions 10000 --rates 1000,2000
//! ```
//!
//! 1. Starts `wamp-bench router` (this binary) as a child process, which derives the WAMP-CRA
//!    credentials of N boards, listens on 127.0.0.1:0 and reports its address.
//! 2. Connects and authenticates N board sessions (WAMP-CRA, salted PBKDF2 keys derived
//!    beforehand, as a board does once) with bounded concurrency; reports the wall time.
//! 3. With all of them idle, reads the router's RSS from /proc: (RSS − RSS before) / N.
//! 4. K boards register a procedure; an agent session (ticket) calls them at fixed offered
//!    loads (open loop: calls are issued on schedule, not when the previous one returned) and
//!    reports the round-trip p50/p99/max through the router.
//!
//! Prints human-readable lines, then one JSON line with every figure. Figures, not asserts:
//! the targets are checked by reading them (docs/benchmarks.md).

mod load;
mod router;
mod sys;
mod tls;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "WAMP router benchmark: sessions, memory per idle session, call round trips")]
struct Cli {
    /// Board sessions to open.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Offered call loads (calls per second), run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    rates: Vec<u32>,
    /// Seconds of calls at each load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Boards that register a procedure and answer the calls.
    #[arg(long, default_value_t = 100)]
    callees: usize,
    /// Serializer of every session: json, msgpack or cbor.
    #[arg(long, default_value = "json")]
    serializer: String,
    /// Concurrent connection attempts while opening the sessions.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds to let the router settle before reading its memory.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Serve wss with this certificate (PEM; must name IP 127.0.0.1), e.g. from
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=bench
    /// -addext subjectAltName=IP:127.0.0.1 -keyout key.pem -out cert.pem`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(clap::Subcommand, Debug)]
enum Mode {
    /// Internal: the router process.
    Router {
        #[arg(long)]
        boards: usize,
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing_subscriber::filter::LevelFilter::WARN)
        });
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    sys::raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    match cli.mode {
        Some(Mode::Router { boards, tls_cert, tls_key }) => {
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(tls::server(&c, &k)?),
                _ => None,
            };
            runtime.block_on(router::run(boards, tls))
        }
        None => runtime.block_on(bench(cli)),
    }
}

async fn bench(cli: Cli) -> Result<()> {
    let serializer = s4t_wamp::Serializer::from_subprotocol(&format!("wamp.2.{}", cli.serializer))
        .with_context(|| format!("unknown serializer {}", cli.serializer))?;
    let load_before = sys::loadavg();
    println!(
        "load average before: {load_before}; {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let tls = cli.tls_cert.as_deref().zip(cli.tls_key.as_deref());
    let client_tls = tls.map(|(cert, _)| tls::client(cert)).transpose()?;
    let router = router::Child::spawn(cli.sessions, tls).await?;
    let base_kib = sys::rss_kib(router.pid())?;
    println!("router pid {} on {}; RSS before sessions {} KiB", router.pid(), router.addr, base_kib);

    let boards = load::prepare(&router.url(), cli.sessions, serializer, client_tls.clone());
    let opened = load::open_all(boards, cli.concurrency).await?;
    println!(
        "{} sessions connected and authenticated in {:.2} s ({:.0}/s)",
        opened.sessions.len(),
        opened.elapsed.as_secs_f64(),
        opened.sessions.len() as f64 / opened.elapsed.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(cli.settle)).await;
    let idle_kib = sys::rss_kib(router.pid())?;
    let per_session = (idle_kib.saturating_sub(base_kib)) as f64 / opened.sessions.len().max(1) as f64;
    println!(
        "router RSS with {} idle sessions: {idle_kib} KiB = {per_session:.2} KiB per session",
        opened.sessions.len()
    );

    let agent = load::agent(&router.url(), serializer, client_tls).await?;
    let targets = load::register_callees(&opened.sessions, cli.callees).await?;
    let mut runs = Vec::new();
    for rate in &cli.rates {
        let cpu_before = sys::cpu_time(router.pid())?;
        let mut run = load::offered_load(&agent, &targets, *rate, Duration::from_secs(cli.duration)).await;
        let cpu = sys::cpu_time(router.pid())?.saturating_sub(cpu_before);
        run.router_cpu_us_per_call = cpu.as_secs_f64() * 1e6 / run.ok.max(1) as f64;
        println!(
            "{rate} calls/s offered: {} ok, {} errors, achieved {:.0}/s; round trip p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; issue lag max {:.3} ms; router CPU {:.1} us/call",
            run.ok,
            run.errors,
            run.achieved,
            run.p50_ms,
            run.p99_ms,
            run.max_ms,
            run.max_lag_ms,
            run.router_cpu_us_per_call
        );
        runs.push(run);
    }
    let load_after = sys::loadavg();
    let report = serde_json::json!({
        "bench": "wamp",
        "sessions": opened.sessions.len(),
        "serializer": cli.serializer,
        "tls": cli.tls_cert.is_some(),
        "connect_auth_s": opened.elapsed.as_secs_f64(),
        "client_key_derivation_s": opened.key_derivation.as_secs_f64(),
        "router_rss_base_kib": base_kib,
        "router_rss_idle_kib": idle_kib,
        "router_kib_per_idle_session": (per_session * 100.0).round() / 100.0,
        "callees": targets.len(),
        "calls": runs.iter().map(load::Run::json).collect::<Vec<_>>(),
        "load_before": load_before,
        "load_after": load_after,
    });
    println!("{report}");
    agent.leave().await;
    router.stop().await;
    Ok(())
}

//! `wstunnel`: reverse WebSocket tunnels. Also answers as `wstun` (MDSLab wstun 1.0.11) when
//! called by that name, so the original Python lightning-rod can use it as its `wstun_bin`.

use std::process::ExitCode;

use clap::Parser;
use wstunnel::cli::{self, Cli};

fn main() -> ExitCode {
    wstunnel::process::init_tracing();
    wstunnel::process::raise_fd_limit();
    let args: Vec<String> = std::env::args().collect();
    let called_as_wstun = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("wstun") && !n.to_string_lossy().starts_with("wstunnel"));
    let cli = if called_as_wstun { None } else { Some(Cli::parse_from(&args)) };
    // WSTUNNEL_THREADS=N: worker threads. By default the server runs one per core and the
    // board side (`client`, wstun's client mode) on one thread, as lightning-rod does:
    // its work is mostly splicing in the kernel, and on one thread a new connection's `Open`
    // is handled without waking a second worker (docs/benchmarks.md, 2026-12-04 17:15).
    let server = cli::runs_server(cli.as_ref(), &args[1..]);
    let threads: usize =
        std::env::var("WSTUNNEL_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(if server { 0 } else { 1 });
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wstunnel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        let shutdown = wstunnel::process::shutdown_on_signal();
        match cli {
            Some(cli) => cli::run(cli, shutdown).await,
            None => cli::run_wstun(&args[1..], shutdown).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("wstunnel: {e}");
            ExitCode::FAILURE
        }
    }
}

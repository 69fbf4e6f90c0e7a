//! Process plumbing shared by the `wstunnel`, `lightning-rod`, `iotronic` and `s4t` binaries.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;

/// tracing to stderr (journald reads it), filtered by `RUST_LOG` (default `info`), with colours
/// only on a terminal.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A token cancelled on SIGINT or SIGTERM: the root of a process's shutdown tree. Must be
/// called inside a tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(cause = %e, "cannot install the SIGTERM handler; only SIGINT stops this process");
                let _ = tokio::signal::ctrl_c().await;
                child.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        child.cancel();
    });
    token
}

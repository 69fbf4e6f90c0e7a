//! Process plumbing shared by the `wstunnel`, `lightning-rod`, `iotronic` and `s4t` binaries.

use std::io::IsTerminal;

use tokio_util::sync::CancellationToken;

/// tracing to stderr (journald reads it), filtered by `RUST_LOG` (default `info`), with colours
/// only on a terminal. `RUST_LOG` takes `LEVEL` and `target=LEVEL` directives, comma-separated
/// (tracing-subscriber's `Targets`: the directives of `EnvFilter` without span and field
/// filters, which need its regex engine, 130 KB of a board's binary); one it cannot parse
/// leaves the default.
pub fn init_tracing() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = tracing_subscriber::registry().with(fmt).with(filter).try_init();
}

/// Raises the soft limit on open descriptors to the hard limit, as the Go and Java runtimes
/// do: every board channel, tunneled connection and splice pipe (up to 64 queued per busy
/// channel) is a descriptor, and systemd's default soft limit (1,024) is reached by a few
/// hundred boards. Nothing here uses select(2), so a high limit costs nothing. Returns the
/// limit now in force (`None`: unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum)
        && cur < max
    {
        lim.current = Some(max);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(cause = %e, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
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

#[cfg(test)]
mod tests {
    use rustix::process::{Resource, getrlimit, setrlimit};

    /// A soft limit below the hard one is raised to it. (Each test runs in its own process
    /// under nextest, so lowering this one's limit touches nothing else.)
    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_limit() {
        let mut lim = getrlimit(Resource::Nofile);
        let max = lim.maximum.expect("Linux bounds the descriptor limit");
        lim.current = Some(max.min(256));
        setrlimit(Resource::Nofile, lim).unwrap();
        assert_eq!(super::raise_fd_limit(), Some(max));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(max));
    }
}

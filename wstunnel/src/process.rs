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

//! `lightning-rod`: the board agent. Parses the command line, sets up tracing and calls the
//! library; maps permanent errors to their exit codes (see `lightning_rod::EXIT_*`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lightning_rod::agent::{self, Clients, Exit, tunnels::WstunnelClients, wamp::WampConnector};
use lightning_rod::config::Overrides;
use lightning_rod::{Error, Secret};

/// Exit code when the cloud could not be reached for `enroll` (sysexits `EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: i32 = 69;

#[derive(Parser)]
#[command(name = "lightning-rod", version, about = "Stack4Things board agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this board with a one-time registration code and store its identity.
    Enroll {
        /// Registration agent, ws[s]://HOST:8181/
        #[arg(long)]
        url: String,
        /// One-time registration code
        #[arg(long, env = "LR_ENROLL_CODE", hide_env_values = true)]
        code: String,
        /// Enroll again even though this board already has an identity
        #[arg(long)]
        force: bool,
        #[arg(long, env = "LR_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Log in to the cloud and serve board procedures until stopped.
    Run {
        #[arg(long, env = "LR_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the effective configuration (secrets redacted) and exit; non-zero when invalid.
    CheckConfig {
        #[arg(long, env = "LR_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
}

fn main() {
    wstunnel::process::init_tracing();
    wstunnel::process::raise_fd_limit();
    let code = match Cli::parse().command {
        Command::CheckConfig { config, overrides } => {
            match lightning_rod::load::load_config(config.as_deref(), overrides) {
                Ok(c) => {
                    println!("{c:#?}");
                    0
                }
                Err(e) => fail(&e),
            }
        }
        Command::Enroll { url, code, force, config, overrides } => {
            runtime().block_on(enroll(url, code, force, config, overrides))
        }
        Command::Run { config, overrides } => runtime().block_on(run(config, overrides)),
    };
    std::process::exit(code);
}

/// One thread: a board agent's work is light, and every thread costs RAM on a small board.
/// Hardware calls use the blocking pool.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cannot start the tokio runtime")
}

async fn enroll(url: String, code: String, force: bool, config: Option<PathBuf>, overrides: Overrides) -> i32 {
    let result = async {
        let config = lightning_rod::load::load_config(config.as_deref(), overrides)?;
        let store = lightning_rod::state::StateStore::open(&config.board.state_dir)?;
        if !force && let Some(id) = store.identity()? {
            return Err(Error::ConfigInvalid(format!(
                "this board is already enrolled as {} ({}); pass --force to enroll again",
                id.name, id.uuid
            )));
        }
        agent::enroll::enroll(&WampConnector, &config, &url, &Secret::new(code), &store).await
    }
    .await;
    match result {
        Ok(id) => {
            println!("enrolled as {} ({}); agent {} at {}", id.name, id.uuid, id.agent, id.url);
            0
        }
        Err(e @ Error::Wamp(_)) if e.to_string().contains(lightning_rod::tls::UNTRUSTED) => {
            tracing::error!("{e}");
            lightning_rod::EXIT_UNTRUSTED
        }
        Err(e @ Error::Wamp(_)) => {
            tracing::error!("{e}");
            EXIT_UNAVAILABLE
        }
        Err(e) => fail(&e),
    }
}

async fn run(config: Option<PathBuf>, overrides: Overrides) -> i32 {
    let config = match lightning_rod::load::load_config(config.as_deref(), overrides) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let shutdown = wstunnel::process::shutdown_on_signal();
    // The CA pinned at enrollment (or configured) also secures wss:// tunnel servers.
    let stored = lightning_rod::state::StateStore::open(&config.board.state_dir).and_then(|s| s.identity());
    let ca = stored.ok().flatten().and_then(|id| id.ca_fingerprint).or_else(|| config.cloud.ca_fingerprint.clone());
    let tunnels = WstunnelClients::new(
        shutdown.child_token(),
        Duration::from_millis(config.timers.backoff_initial_ms),
        Duration::from_secs(config.timers.backoff_max_s),
        ca,
    );
    let clients =
        Clients { wamp: Arc::new(WampConnector), tunnels: Box::new(tunnels.clone()), packets: Box::new(tunnels) };
    match agent::run(config, shutdown, clients).await {
        Ok(Exit::Shutdown) => 0,
        Ok(Exit::Restart) => {
            tracing::info!("exiting for a restart");
            lightning_rod::EXIT_RESTART
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &Error) -> i32 {
    tracing::error!("{e}");
    e.exit_code().unwrap_or(1)
}

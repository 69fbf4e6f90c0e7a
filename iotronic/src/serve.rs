//! The cloud's processes: `api`, `conductor`, `wamp-agent` and `serve` (all in one, on the
//! embedded default). Same code each way; the database and the bus differ. Every listener
//! speaks TLS with the set-up of [`crate::tls`] unless the configuration says `plaintext`.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AppState};
use crate::bus::Bus;
use crate::conductor::Conductor;
use crate::db::Db;
use crate::listen::{self, MAX_CONNECTIONS_PER_SOURCE, PerSource};
use crate::tls::{CloudTls, TlsListener};
use crate::wamp_agent::{AgentSetup, WampAgent};
use crate::wstun_agent::TunnelMint;
use crate::{Error, ServeConfig};

/// Addresses the running cloud listens on (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub rest: std::net::SocketAddr,
    /// The WAMP router (`None` for a process without one).
    pub wamp: Option<std::net::SocketAddr>,
    /// The tunnel server (`None` for a process without one).
    pub tunnel: Option<std::net::SocketAddr>,
}

/// Creates the data directory (and missing parents) readable by its owner alone: it holds the
/// CA's key and, in the SQLite database, the tunnel HMAC key, the boards' derived keys and
/// the password hashes. An existing directory keeps its mode ([`open_database`] warns).
pub fn create_data_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::DataDir { path: dir.to_owned(), source })
}

/// Warns when `path` exists and other users may read it (or enter it, for a directory): a
/// key, the data directory, the database.
pub(crate) fn warn_if_readable(path: &Path, chmod: &str) {
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), "holds secrets and is open to other users: chmod {chmod} it");
    }
}

/// Opens the database (creating the data directory and applying migrations) and creates the
/// bootstrap admin on first start. A generated admin password is printed once, on stdout.
pub async fn open_database(config: &ServeConfig) -> Result<Db, Error> {
    if config.database_url.is_none() {
        create_data_dir(&config.data_dir)?;
        // Created here, owner-only, rather than by SQLite (0644 less the umask): SQLite gives
        // the -wal and -shm files the database file's mode, so all three stay private
        // whatever the umask of whoever started the cloud.
        let file = config.data_dir.join(crate::db::SQLITE_FILE);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&file)
            .map_err(|source| Error::DataDir { path: file, source })?;
    }
    warn_if_readable(&config.data_dir, "700");
    let db = Db::open(&config.database_url()).await?;
    if config.database_url.is_none() {
        for suffix in ["", "-wal", "-shm"] {
            warn_if_readable(&config.data_dir.join(format!("{}{suffix}", crate::db::SQLITE_FILE)), "600");
        }
    }
    if let Some(generated) = crate::auth::bootstrap_admin(&db, config.admin_password.as_deref()).await? {
        // Deliberately not through tracing: logs are kept, this must be seen once and noted.
        println!("iotronic: created user admin in project admin with password {generated}");
        println!("iotronic: set IOTRONIC_ADMIN_PASSWORD before the first start to choose it");
    }
    Ok(db)
}

pub async fn open_bus(config: &ServeConfig) -> Result<Bus, Error> {
    match &config.amqp_url {
        Some(url) => Bus::amqp(url, &config.bus_prefix).await,
        None => Ok(Bus::in_process()),
    }
}

/// The REST API alone (HTTPS unless `--plaintext`).
pub async fn run_api(
    config: &ServeConfig,
    db: Db,
    bus: Bus,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> Result<(), Error> {
    let tls = set_up_tls(config)?;
    serve_api(config, tls, db, bus, shutdown, ready).await
}

/// The TLS set-up of this process (`None` with `--plaintext`); says what to pin.
pub fn set_up_tls(config: &ServeConfig) -> Result<Option<CloudTls>, Error> {
    let tls = crate::tls::set_up(config)?;
    match &tls {
        Some(t) => {
            info!(fingerprint = %t.fingerprint, "TLS on");
            println!(
                "iotronic: CA fingerprint {} (in {}): boards and s4t pin it with --ca-fingerprint",
                t.fingerprint,
                config.data_dir.join(crate::tls::FINGERPRINT).display()
            );
        }
        None => warn!("plaintext: HTTP and WS without TLS (--plaintext)"),
    }
    Ok(tls)
}

async fn serve_api(
    config: &ServeConfig,
    tls: Option<CloudTls>,
    db: Db,
    bus: Bus,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> Result<(), Error> {
    let rest_addr = config.rest_addr();
    let rest = TcpListener::bind(rest_addr).await.map_err(|source| Error::Bind { addr: rest_addr, source })?;
    let listening = Listening { rest: rest.local_addr().map_err(Error::Serve)?, wamp: None, tunnel: None };
    info!(rest = %listening.rest, tls = tls.is_some(), "REST API listening");
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("iotronic: REST API on {scheme}://{}/v1", listening.rest);
    let mut state = AppState::new(db.clone(), bus);
    state.call_timeout = config.call_timeout;
    state.vpn_ranges = std::sync::Arc::new(config.vpn_ranges.clone());
    state.ports_per_project = config.ports_per_project;
    state.tunnels = Some(
        TunnelMint::load(&db, tunnel_url(config, config.tunnel_port)).await?.dialing_back(config.boards_dial_back()),
    );
    // The peer address (ConnectInfo) feeds the login throttle and the audit log.
    let app = api::router(state);
    match tls {
        None => {
            if let Some(ready) = ready {
                let _ = ready.send(listening);
            }
            let listener = PerSource::new(rest, MAX_CONNECTIONS_PER_SOURCE);
            listen::serve(listener, app, config.http_timeouts, shutdown).await;
        }
        Some(tls) => {
            let listener = TlsListener::new(rest, tls.server).map_err(Error::Serve)?;
            let listener = PerSource::new(listener, MAX_CONNECTIONS_PER_SOURCE);
            if let Some(ready) = ready {
                let _ = ready.send(listening);
            }
            listen::serve(listener, app, config.http_timeouts, shutdown).await;
        }
    }
    Ok(())
}

/// The conductor alone.
pub async fn run_conductor(db: Db, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    info!("conductor running");
    Conductor::new(db, bus).run(shutdown).await
}

/// `ws[s]://host:port/` of the tunnel server boards are told to use.
pub fn tunnel_url(config: &ServeConfig, port: u16) -> String {
    format!("{}://{}:{port}/", config.ws_scheme(), config.public_host())
}

/// Binds the tunnel server's port.
pub async fn bind_tunnels(config: &ServeConfig) -> Result<TcpListener, Error> {
    let addr = std::net::SocketAddr::new(config.bind, config.tunnel_port);
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// The wstun-agent alone: the tunnel server on `listener` (wss unless `--plaintext`).
pub async fn run_wstun_agent(
    config: &ServeConfig,
    db: Db,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let tls = set_up_tls(config)?;
    serve_wstun(config, tls, db, listener, shutdown).await
}

async fn serve_wstun(
    config: &ServeConfig,
    tls: Option<CloudTls>,
    db: Db,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let port = listener.local_addr().map_err(Error::Serve)?.port();
    let mint = TunnelMint::load(&db, tunnel_url(config, port)).await?;
    println!("iotronic: tunnel server on {} (public ports 50001-59999)", mint.url);
    db.upsert_agent(&config.agent_name, "wstun", &mint.url, true, false).await?;
    let tls = tls.map(|t| t.server);
    crate::wstun_agent::run(db, config, &mint, listener, tls, shutdown).await
}

/// Binds the WAMP router's port.
pub async fn bind_wamp(config: &ServeConfig) -> Result<TcpListener, Error> {
    let addr = std::net::SocketAddr::new(config.bind, config.wamp_port);
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// The wamp-agent alone: the router on `listener` (wss unless `--plaintext`), the cloud
/// procedures, session tracking, and this agent's queue of board calls.
pub async fn run_wamp_agent(
    config: &ServeConfig,
    db: Db,
    bus: Bus,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let tls = set_up_tls(config)?;
    serve_wamp(config, tls, db, bus, listener, shutdown).await
}

async fn serve_wamp(
    config: &ServeConfig,
    tls: Option<CloudTls>,
    db: Db,
    bus: Bus,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let port = listener.local_addr().map_err(Error::Serve)?.port();
    let url = format!("{}://{}:{port}/", config.ws_scheme(), config.public_host());
    db.upsert_agent(&config.agent_name, "wamp", &url, true, true).await?;
    let setup = AgentSetup {
        name: config.agent_name.clone(),
        url: url.clone(),
        tunnel_url: Some(tunnel_url(config, config.tunnel_port)),
        legacy: config.legacy_boards,
        dial_back: config.boards_dial_back(),
    };
    let tls = tls.map(|t| t.server);
    let mut agent = WampAgent::start(db.clone(), bus.clone(), listener, tls, setup, shutdown.clone()).await?;
    // Said once the cloud procedures are registered: a board that enrolls on reading it
    // (scripts, tests) found no `stack4things.register` before.
    let dial = if config.boards_dial_back() { "; boards dial the host they enroll at" } else { "" };
    println!("iotronic: WAMP router on {url} (realm s4t, agent {}{dial})", config.agent_name);
    let result = tokio::select! {
        r = crate::agent::run_worker(config.agent_name.clone(), bus, agent.caller(), shutdown) => r,
        reason = agent.failed() => Err(Error::Unavailable(reason)),
    };
    db.upsert_agent(&config.agent_name, "wamp", &url, false, true).await?;
    result
}

/// Runs the cloud until `shutdown` is cancelled. `ready` receives the bound addresses once
/// every listener is open, so callers (tests, systemd notify) never guess.
pub async fn serve(
    config: ServeConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Listening>>,
) -> Result<(), Error> {
    let db = open_database(&config).await?;
    let bus = open_bus(&config).await?;
    let tls = set_up_tls(&config)?;
    info!(data_dir = %config.data_dir.display(), database = %config.database_url(), bus = ?bus, "iotronic starting");
    let stop = shutdown.child_token();
    let wamp = bind_wamp(&config).await?;
    let wamp_addr = wamp.local_addr().map_err(Error::Serve)?;
    let tunnels = bind_tunnels(&config).await?;
    let tunnel_addr = tunnels.local_addr().map_err(Error::Serve)?;
    // Port 0 (tests) resolves here; every process of this cloud uses the bound port.
    let mut config = config;
    config.tunnel_port = tunnel_addr.port();
    let mut parts = JoinSet::new();
    parts.spawn({
        let (config, tls, db, stop) = (config.clone(), tls.clone(), db.clone(), stop.clone());
        async move { ("wstun-agent", serve_wstun(&config, tls, db, tunnels, stop).await) }
    });
    parts.spawn({
        let (db, bus, stop) = (db.clone(), bus.clone(), stop.clone());
        async move { ("conductor", run_conductor(db, bus, stop).await) }
    });
    parts.spawn({
        let (config, tls, db, bus, stop) = (config.clone(), tls.clone(), db.clone(), bus.clone(), stop.clone());
        async move { ("wamp-agent", serve_wamp(&config, tls, db, bus, wamp, stop).await) }
    });
    // Report both listeners once the REST one is bound.
    let (api_ready, bound) = tokio::sync::oneshot::channel::<Listening>();
    tokio::spawn(async move {
        if let (Ok(mut l), Some(ready)) = (bound.await, ready) {
            l.wamp = Some(wamp_addr);
            l.tunnel = Some(tunnel_addr);
            let _ = ready.send(l);
        }
    });
    parts.spawn({
        let (db, stop) = (db.clone(), stop.clone());
        async move { ("REST API", serve_api(&config, tls, db, bus, stop, Some(api_ready)).await) }
    });
    let result = supervise(parts, &shutdown, &stop).await;
    db.close().await;
    result
}

/// Waits for the parts of `iotronic serve`. The first to end before `shutdown` stops the
/// others (`stop`) and the process with [`Error::Stopped`], even if it ended without an
/// error: a cloud missing a part (a conductor whose queue closed, an agent whose router
/// stopped) must exit so that its supervisor restarts it, not run on half alive. After a
/// shutdown the result is the first error of any part.
async fn supervise(
    mut parts: JoinSet<(&'static str, Result<(), Error>)>,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let mut result = Ok(());
    while let Some(ended) = parts.join_next().await {
        let early = !stop.is_cancelled() && !shutdown.is_cancelled();
        let (process, outcome) = match ended {
            Ok(ended) => ended,
            Err(e) => ("process", Err(Error::Unavailable(format!("panicked: {e}")))),
        };
        if early {
            error!(process, cause = outcome.as_ref().err().map(tracing::field::display), "stopped: stopping the cloud");
            result = Err(Error::Stopped { process, cause: outcome.err().map(Box::new) });
            stop.cancel();
        } else if let Err(e) = outcome {
            warn!(process, cause = %e, "stopped with an error");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part that runs until `stop`, as every part of the cloud does.
    fn until_stopped(
        parts: &mut JoinSet<(&'static str, Result<(), Error>)>,
        name: &'static str,
        stop: &CancellationToken,
    ) {
        let stop = stop.clone();
        parts.spawn(async move {
            stop.cancelled().await;
            (name, Ok(()))
        });
    }

    #[tokio::test]
    async fn a_part_that_ends_early_stops_the_others_and_the_process() {
        let (shutdown, mut parts) = (CancellationToken::new(), JoinSet::new());
        let stop = shutdown.child_token();
        until_stopped(&mut parts, "REST API", &stop);
        until_stopped(&mut parts, "wamp-agent", &stop);
        // Ended without an error: still a cloud missing a part.
        parts.spawn(async { ("conductor", Ok(())) });
        match supervise(parts, &shutdown, &stop).await {
            Err(Error::Stopped { process: "conductor", cause: None }) => {}
            other => panic!("{other:?}"),
        }
        assert!(stop.is_cancelled() && !shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_part_that_fails_is_named_with_its_cause() {
        let (shutdown, mut parts) = (CancellationToken::new(), JoinSet::new());
        let stop = shutdown.child_token();
        until_stopped(&mut parts, "REST API", &stop);
        parts.spawn(async { ("wamp-agent", Err(Error::Unavailable("the WAMP router stopped".into()))) });
        let e = supervise(parts, &shutdown, &stop).await.unwrap_err();
        assert_eq!(e.to_string(), "the wamp-agent stopped while the cloud was running");
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("the WAMP router stopped"));
    }

    #[tokio::test]
    async fn a_shutdown_is_not_a_failure_but_errors_on_the_way_out_are_reported() {
        let (shutdown, mut parts) = (CancellationToken::new(), JoinSet::new());
        let stop = shutdown.child_token();
        until_stopped(&mut parts, "REST API", &stop);
        until_stopped(&mut parts, "conductor", &stop);
        shutdown.cancel();
        supervise(parts, &shutdown, &stop).await.unwrap();

        let (shutdown, mut parts) = (CancellationToken::new(), JoinSet::new());
        let stop = shutdown.child_token();
        until_stopped(&mut parts, "REST API", &stop);
        let s = stop.clone();
        parts.spawn(async move {
            s.cancelled().await;
            ("wstun-agent", Err(Error::Unavailable("tunnel server: closing failed".into())))
        });
        shutdown.cancel();
        match supervise(parts, &shutdown, &stop).await {
            Err(Error::Unavailable(m)) => assert_eq!(m, "tunnel server: closing failed"),
            other => panic!("{other:?}"),
        }
    }
}

//! The router side: a child process running `s4t_wamp::Router` with N board credentials.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use s4t_shared::wamp::auth::{CraCredential, DEFAULT_ITERATIONS, DEFAULT_KEYLEN, derive_key};
use s4t_wamp::{Role, Router, RouterConfig, Secret, StaticAuthenticator};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub const AGENT_TICKET: &str = "bench-agent-ticket";

/// The identity of bench board `i`: a uuid-shaped authid, its secret and its salt.
pub fn board(i: usize) -> (String, Secret, String) {
    (format!("00000000-0000-4000-8000-{i:012}"), Secret::new(format!("bench-secret-{i}")), format!("bench-salt-{i}"))
}

/// Derives the stored credentials of boards `0..n` on every core.
fn credentials(n: usize) -> Vec<(String, CraCredential)> {
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| {
                            let (authid, secret, salt) = board(i);
                            let derived_key = derive_key(&secret, &salt, DEFAULT_ITERATIONS, DEFAULT_KEYLEN);
                            let cred = CraCredential {
                                salt,
                                iterations: DEFAULT_ITERATIONS,
                                keylen: DEFAULT_KEYLEN,
                                derived_key,
                            };
                            (authid, cred)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("derivation thread")).collect()
    })
}

/// `wamp-bench router --boards N`: serves until stdin closes.
pub async fn run(boards: usize, tls: Option<Arc<rustls::ServerConfig>>) -> Result<()> {
    let mut auth = StaticAuthenticator::new().with_ticket("agent", Secret::new(AGENT_TICKET), Role::Agent);
    for (authid, cred) in credentials(boards) {
        auth = auth.with_cra_credential(&authid, cred, Role::Board);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // The whole simulated fleet logs in from this one address.
    let config = RouterConfig { max_opening_per_source: usize::MAX, ..RouterConfig::default() };
    let router = Router::new(config, Arc::new(auth));
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { router.serve(listener, tls, shutdown).await }
    });
    println!("LISTENING {addr}");
    // The parent closes our stdin to stop us.
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    shutdown.cancel();
    serving.await??;
    Ok(())
}

/// The router child process, seen from the bench.
pub struct Child {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    tls: bool,
}

impl Child {
    pub async fn spawn(boards: usize, tls: Option<(&Path, &Path)>) -> Result<Child> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["router", "--boards", &boards.to_string()]);
        if let Some((cert, key)) = tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the router process")?;
        let mut lines = BufReader::new(child.stdout.take().context("router stdout")?).lines();
        // Deriving 10,000 credentials takes a few seconds.
        let line = tokio::time::timeout(std::time::Duration::from_secs(300), lines.next_line())
            .await
            .context("the router did not start")??
            .context("the router exited")?;
        let Some(addr) = line.strip_prefix("LISTENING ") else { bail!("unexpected router output {line:?}") };
        Ok(Child { child, addr: addr.parse()?, tls: tls.is_some() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("{}://{}/", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.child.wait()).await;
    }
}

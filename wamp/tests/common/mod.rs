//! Shared fixtures: a router on 127.0.0.1:0 with known credentials, and helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s4t_wamp::{ClientAuth, ClientConfig, Role, Router, RouterConfig, Secret, Serializer, StaticAuthenticator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const BOARD: &str = "0b8a6f0e-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
pub const BOARD_SECRET: &str = "board-secret-0b8a";
pub const OTHER_BOARD: &str = "11111111-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
pub const OTHER_SECRET: &str = "board-secret-1111";
pub const ENROLL_CODE: &str = "CODE-123";
pub const AGENT_TICKET: &str = "agent-ticket";
/// Every test waits at most this long for anything.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn authenticator(legacy: bool) -> StaticAuthenticator {
    StaticAuthenticator::new()
        .with_cra(BOARD, &Secret::new(BOARD_SECRET), Role::Board)
        .with_cra(OTHER_BOARD, &Secret::new(OTHER_SECRET), Role::Board)
        .with_ticket("enroll", Secret::new(ENROLL_CODE), Role::Enrollment)
        .with_ticket("agent", Secret::new(AGENT_TICKET), Role::Agent)
        .allow_anonymous(legacy)
}

pub struct TestRouter {
    pub router: Router,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestRouter {
    pub async fn start(config: RouterConfig, legacy: bool) -> TestRouter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, config, legacy)
    }

    pub fn start_on(listener: TcpListener, config: RouterConfig, legacy: bool) -> TestRouter {
        let addr = listener.local_addr().unwrap();
        let router = Router::new(config, Arc::new(authenticator(legacy)));
        let shutdown = CancellationToken::new();
        let (r, s) = (router.clone(), shutdown.clone());
        let task = tokio::spawn(async move { r.serve(listener, None, s).await.unwrap() });
        TestRouter { router, addr, shutdown, task }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn config(&self, auth: ClientAuth) -> ClientConfig {
        ClientConfig::new(&self.url(), "s4t", auth)
    }

    pub fn board(&self, serializer: Serializer) -> ClientConfig {
        let mut c = self.config(board_auth());
        c.serializer = serializer;
        c
    }
}

pub fn board_auth() -> ClientAuth {
    ClientAuth::WampCra { authid: BOARD.into(), secret: Secret::new(BOARD_SECRET) }
}

pub fn other_board_auth() -> ClientAuth {
    ClientAuth::WampCra { authid: OTHER_BOARD.into(), secret: Secret::new(OTHER_SECRET) }
}

pub fn enroll_auth() -> ClientAuth {
    ClientAuth::Ticket { authid: "enroll".into(), ticket: Secret::new(ENROLL_CODE) }
}

pub fn agent_auth() -> ClientAuth {
    ClientAuth::Ticket { authid: "agent".into(), ticket: Secret::new(AGENT_TICKET) }
}

/// Awaits `f` or fails the test after [`DEADLINE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.unwrap_or_else(|_| panic!("{what}: not done within {DEADLINE:?}"))
}

/// Polls `cond` until it holds or [`DEADLINE`] passes.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not true within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn kw(v: serde_json::Value) -> s4t_wamp::Dict {
    match v {
        serde_json::Value::Object(d) => d,
        _ => panic!("not a dict"),
    }
}

//! The agent's tunnel binding against a real in-process `wstunnel` server: `ServiceEnable`
//! exposes a local TCP service on a public port (assigned by the server, port 0), it survives
//! a status check, `ServiceDisable` closes it; a VPN packet channel carries packets both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lightning_rod::Secret;
use lightning_rod::agent::tunnels::WstunnelClients;
use lightning_rod::rpc::{PacketOpener, ServiceManager};
use lightning_rod::state::{ExposedService, StateStore};
use s4t_shared::token::{Claims, TokenKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wstunnel::packet::PacketChannel;
use wstunnel::server::{Auth, Server, ServerConfig, ServerHooks};

const DEADLINE: Duration = Duration::from_secs(20);

fn key() -> TokenKey {
    TokenKey::new(b"lr-test-secret".to_vec()).unwrap()
}

fn token(port: u16, vpn: Option<&str>) -> Secret {
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    Secret::new(key().mint(&Claims { board: "b1".into(), port, vpn: vpn.map(Into::into), expiry }).unwrap())
}

/// Echoes every packet of every packet channel back to the board.
struct Loopback;

impl ServerHooks for Loopback {
    fn packet_channel(
        &self,
        _board: &str,
        _vpn: &str,
        channel: PacketChannel,
    ) -> impl std::future::Future<Output = Result<(), wstunnel::server::Refusal>> + Send {
        let PacketChannel { sender, mut receiver } = channel;
        tokio::spawn(async move {
            while let Some(p) = receiver.recv().await {
                let _ = sender.send(&p).await;
            }
        });
        async { Ok(()) }
    }
}

async fn server() -> (String, CancellationToken) {
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap(), Auth::Token(key()));
    cfg.public_bind = "127.0.0.1".parse().unwrap();
    let server = Server::bind(cfg).await.unwrap();
    let url = format!("ws://{}/", server.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(Loopback), stop.clone()));
    (url, stop)
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn services_and_packet_channels_over_a_real_tunnel_server() {
    let (url, _stop) = server().await;
    let local = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let clients =
        WstunnelClients::new(CancellationToken::new(), Duration::from_millis(100), Duration::from_secs(2), None);
    let services = ServiceManager::new(StateStore::open(dir.path()).unwrap(), Box::new(clients.clone()), url.clone());
    let svc = ExposedService {
        name: "echo".into(),
        local_port: local.port(),
        public_port: 0,
        tunnel_url: None,
        token: Some(token(0, None)),
    };
    let port = tokio::time::timeout(DEADLINE, services.enable("s-echo", svc)).await.unwrap().unwrap();
    assert_ne!(port, 0);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"through the tunnel").await.unwrap();
    let mut got = [0u8; 18];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"through the tunnel");
    let status = services.status().unwrap();
    assert_eq!(
        (status["services"][0]["active"].as_bool(), status["services"][0]["public_port"].as_u64()),
        (Some(true), Some(port as u64))
    );
    // The assigned port is saved, so a restore asks for the same one.
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("services.json")).unwrap()).unwrap();
    assert_eq!(saved["s-echo"]["public_port"], port);
    assert!(services.disable("s-echo").await.unwrap());
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "public port {port} still open after ServiceDisable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A forged token is refused with an error, not a hang.
    let forged = ExposedService {
        token: Some(Secret::new("forged")),
        ..ExposedService { name: "x".into(), local_port: 1, public_port: 0, tunnel_url: None, token: None }
    };
    assert!(tokio::time::timeout(DEADLINE, services.enable("s-x", forged)).await.unwrap().is_err());
    // VPN packet channel through the same client.
    let mut pipe =
        tokio::time::timeout(DEADLINE, clients.open(url.clone(), "vpn-1".into(), Some(token(0, Some("vpn-1")))))
            .await
            .unwrap()
            .unwrap();
    pipe.sender.send(b"\x00\x00\x65\x58packet").await.unwrap();
    let back = tokio::time::timeout(DEADLINE, pipe.receiver.recv()).await.unwrap().unwrap();
    assert_eq!(&back[..], b"\x00\x00\x65\x58packet");
}

/// A board joins and leaves VPNs on one tunnel channel as often as it likes: each pipe it drops
/// closes its packet channel on the server too, which allows 8 at a time on a channel.
#[tokio::test]
async fn a_board_joins_and_leaves_vpns_on_one_channel_for_ever() {
    let (url, _stop) = server().await;
    let clients =
        WstunnelClients::new(CancellationToken::new(), Duration::from_millis(100), Duration::from_secs(2), None);
    for i in 0..12u8 {
        let open = clients.open(url.clone(), "vpn-1".into(), Some(token(0, Some("vpn-1"))));
        let mut pipe = tokio::time::timeout(DEADLINE, open).await.unwrap().unwrap_or_else(|e| panic!("join {i}: {e}"));
        pipe.sender.send(&[i; 20]).await.unwrap();
        let back = tokio::time::timeout(DEADLINE, pipe.receiver.recv()).await.unwrap().unwrap();
        assert_eq!(&back[..], &[i; 20]);
    }
}

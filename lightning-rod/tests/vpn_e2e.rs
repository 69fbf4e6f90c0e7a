//! `VpnJoin`/`VpnLeave` through a real `lightning-rod` process: the router, a minimal cloud
//! agent, a `wstunnel` server and the agent all run in a private network namespace (root).
//! The cloud calls VpnJoin; the board creates its TAP, opens a packet channel with its token
//! and pumps frames: a datagram sent towards the VPN subnet makes the kernel ARP on the TAP,
//! and the tunnel server receives that ARP request as a GRE-TAP packet. VpnLeave removes the
//! interface.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use s4t_shared::token::{Claims, TokenKey};
use s4t_wamp::{Dict, Payload, Role, Router, RouterConfig, Secret, StaticAuthenticator};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wstunnel::packet::PacketChannel;
use wstunnel::server::{Auth, Server, ServerConfig, ServerHooks};

const BOARD: &str = "7a0c3e4f-1b2d-4e6f-8a9b-1c2d3e4f5a6b";
const SECRET: &str = "vpn-board-secret";
const DEADLINE: Duration = Duration::from_secs(20);

/// Hands every packet of every packet channel to the test.
struct Capture(mpsc::Sender<Vec<u8>>);

impl ServerHooks for Capture {
    fn packet_channel(
        &self,
        board: &str,
        _vpn: &str,
        channel: PacketChannel,
    ) -> impl std::future::Future<Output = Result<(), wstunnel::server::Refusal>> + Send {
        assert_eq!(board, BOARD);
        let tx = self.0.clone();
        let PacketChannel { sender, mut receiver } = channel;
        tokio::spawn(async move {
            let _keep = sender;
            while let Some(p) = receiver.recv().await {
                let _ = tx.try_send(p.to_vec());
            }
        });
        async { Ok(()) }
    }
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

async fn scenario() {
    // The cloud: router with the board's credentials, an agent answering connection/alive.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let auth = StaticAuthenticator::new().with_cra(BOARD, &Secret::new(SECRET), Role::Board);
    let router = Router::new(RouterConfig::default(), Arc::new(auth));
    let stop = CancellationToken::new();
    let (r, s) = (router.clone(), stop.clone());
    tokio::spawn(async move { r.serve(listener, None, s).await });
    let agent = router.local_session("agent").await.unwrap();
    let (ltx, mut logins) = mpsc::channel(4);
    agent
        .register("agent.stack4things.connection", move |inv| {
            let ltx = ltx.clone();
            async move {
                let _ = ltx.send(inv.kwargs["session"].as_u64().unwrap()).await;
                Ok(Payload::new(vec![json!(json!({"result": "SUCCESS", "message": ""}).to_string())], Dict::new()))
            }
        })
        .await
        .unwrap();
    agent.register("agent.stack4things.wamp_alive", |_| async { Ok(Payload::new(vec![], Dict::new())) }).await.unwrap();
    let key = TokenKey::new(b"vpn-e2e-key".to_vec()).unwrap();
    let (ptx, mut packets) = mpsc::channel(64);
    let tserver =
        Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap(), Auth::Token(key.clone()))).await.unwrap();
    let tunnel_url = format!("ws://{}/", tserver.local_addr());
    tokio::spawn(tserver.run(Arc::new(Capture(ptx)), stop.clone()));

    // The board, already enrolled.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let id = json!({"uuid": BOARD, "name": "b", "agent": "agent", "url": url, "realm": "s4t",
                    "credentials": {"authid": BOARD, "secret": SECRET}});
    std::fs::write(dir.path().join("state/identity.json"), id.to_string()).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[cloud]\nlegacy_settings = \"{0}/none.json\"\n[board]\nstate_dir = \"{0}/state\"\n[hal]\nbackend = \"sim\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lightning-rod"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let session = tokio::time::timeout(DEADLINE, logins.recv()).await.unwrap().unwrap();
    let call = |method: &str, params: Value| {
        let uri = format!("iotronic.{session}.{BOARD}.{method}");
        let agent = agent.clone();
        async move {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                match agent.call(&uri, vec![json!({"uuid": "r"}), params.clone()], Dict::new(), DEADLINE).await {
                    Ok(p) => return serde_json::from_str::<Value>(p.args[0].as_str().unwrap()).unwrap(),
                    // Registration may still be under way right after login.
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("{uri}: {e}"),
                }
            }
        }
    };
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = key.mint(&Claims { board: BOARD.into(), port: 0, vpn: Some("vpn-1".into()), expiry }).unwrap();
    let join = json!({"vpn": "vpn-1", "type": "l2", "address": "192.0.2.10", "prefix_len": 24, "interface": "s4tvpn0",
                      "tunnel_url": tunnel_url, "token": token});
    let r = call("VpnJoin", join).await;
    assert_eq!(r["result"], "SUCCESS", "{r}");
    assert_eq!(r["message"], json!({"interface": "s4tvpn0", "address": "192.0.2.10/24"}));
    assert!(ifindex("s4tvpn0").is_some());

    // Traffic towards the VPN: the kernel ARPs on the TAP; the frame reaches the server in GRE.
    let sock = std::net::UdpSocket::bind("192.0.2.10:0").unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let arp = loop {
        let _ = sock.send_to(b"x", "192.0.2.20:9");
        match tokio::time::timeout(Duration::from_millis(200), packets.recv()).await {
            Ok(Some(p)) if p.len() >= 4 + 14 && p[4 + 12..4 + 14] == [0x08, 0x06] => break p,
            _ => assert!(tokio::time::Instant::now() < deadline, "no ARP request reached the tunnel server"),
        }
    };
    assert_eq!(arp[..4], [0, 0, 0x65, 0x58], "not GRE-TAP framing");
    assert_eq!(arp[4..10], [0xff; 6], "ARP request is not a broadcast");

    let r = call("VpnLeave", json!({"vpn": "vpn-1"})).await;
    assert_eq!(r["result"], "SUCCESS", "{r}");
    assert!(ifindex("s4tvpn0").is_none(), "the TAP outlived VpnLeave");
    child.start_kill().unwrap();
    let _ = child.wait().await;
    stop.cancel();
}

#[test]
fn vpn_join_and_leave_through_a_real_agent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "this test needs root and CI is set");
        eprintln!("SKIPPED: this test needs root (network namespaces, TAP)");
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare only changes this thread's namespaces; the agent inherits it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        assert!(std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap().success());
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(scenario());
    })
    .join()
    .unwrap();
}

//! Overlays for real: two "boards", each a thread in its own network namespace, each with a
//! TUN (L3) or TAP (L2, GRE-TAP) device, their packet channels joined by a relay that checks
//! the framing. Needs root; skips with a message otherwise, and fails under `CI`.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lightning_rod::overlay::{Layer, Overlay, OverlaySpec, PacketPipe};
use tokio::sync::mpsc;

/// Packets queued per direction between an overlay and the test's relay.
const PACKET_QUEUE: usize = 256;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            assert!(std::env::var_os("CI").is_none(), "this test needs root and CI is set");
            eprintln!("SKIPPED: this test needs root (network namespaces, TUN/TAP)");
            return;
        }
    };
}

/// Runs `f` on a new thread in a new network namespace with a current-thread runtime.
fn in_netns<T: Send + 'static>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
        let lo = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
        assert!(lo.success());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        f(&rt)
    })
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Forwards packets from `rx` to `tx`, checking each one against `check`.
fn relay(
    mut rx: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Bytes>,
    check: fn(&[u8]) -> bool,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut bad = 0;
        while let Some(p) = rx.blocking_recv() {
            if !check(&p) {
                bad += 1;
            }
            if tx.blocking_send(p).is_err() {
                break;
            }
        }
        bad
    })
}

struct Board {
    done: std_mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// A board: creates its overlay, then runs `work` (in its namespace) and waits to be told
/// to remove the overlay; checks the interface is gone afterwards.
fn board(
    spec: OverlaySpec,
    pipe: PacketPipe,
    ready: std_mpsc::Sender<()>,
    work: impl FnOnce() + Send + 'static,
) -> Board {
    let (done, done_rx) = std_mpsc::channel();
    let thread = in_netns(move |rt| {
        let overlay = rt.block_on(Overlay::create(&spec, pipe)).expect("overlay");
        assert!(ifindex(&spec.interface).is_some());
        ready.send(()).unwrap();
        let driver = std::thread::scope(|s| {
            let h = s.spawn(work);
            // Keep the runtime turning (the pump runs on it) until told to stop.
            rt.block_on(async {
                while done_rx.try_recv().is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            h.join()
        });
        driver.expect("work panicked");
        rt.block_on(overlay.remove());
        assert!(ifindex(&spec.interface).is_none(), "{} still exists after removal", spec.interface);
    });
    Board { done, thread }
}

fn pipes() -> (PacketPipe, mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>) {
    PacketPipe::in_memory(PACKET_QUEUE)
}

fn run_pair(layer: Layer, check: fn(&[u8]) -> bool, broadcast: bool) {
    let (pa, a_out, a_in) = pipes();
    let (pb, b_out, b_in) = pipes();
    let r1 = relay(a_out, b_in, check);
    let r2 = relay(b_out, a_in, check);
    let spec = |name: &str, last: u8| OverlaySpec {
        interface: name.into(),
        layer,
        address: Ipv4Addr::new(192, 0, 2, last),
        prefix_len: 24,
        mtu: 1400,
    };
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let (sock_tx, sock_rx) = std_mpsc::channel::<(Vec<u8>, SocketAddrV4)>();
    // Board B: receives one datagram.
    let (a_ready, b_ready) = (ready_tx.clone(), ready_tx.clone());
    let (port_tx, port_rx) = std_mpsc::channel::<u16>();
    let b = board(spec("s4tb0", 2), pb, ready_tx, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        port_tx.send(sock.local_addr().unwrap().port()).unwrap();
        b_ready.send(()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("nothing arrived over the overlay");
        let std::net::SocketAddr::V4(from) = from else { panic!() };
        sock_tx.send((buf[..n].to_vec(), from)).unwrap();
    });
    // Board A: sends until B answers (the first packets may precede B's socket or ARP).
    let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
    let a = board(spec("s4ta0", 1), pa, a_ready, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_broadcast(true).unwrap();
        let to: Ipv4Addr = if broadcast { Ipv4Addr::new(192, 0, 2, 255) } else { Ipv4Addr::new(192, 0, 2, 2) };
        let port = port_rx.recv_timeout(Duration::from_secs(20)).expect("board B has no socket");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let _ = sock.send_to(b"hello over the overlay", (to, port));
            if !matches!(stop_rx.recv_timeout(Duration::from_millis(100)), Err(std_mpsc::RecvTimeoutError::Timeout)) {
                break;
            }
        }
    });
    for _ in 0..3 {
        ready_rx.recv_timeout(Duration::from_secs(20)).expect("a board did not come up");
    }
    let (data, from) = sock_rx.recv_timeout(Duration::from_secs(25)).expect("no datagram");
    assert_eq!(data, b"hello over the overlay");
    assert_eq!(*from.ip(), Ipv4Addr::new(192, 0, 2, 1));
    let _ = stop_tx.send(());
    for board in [a, b] {
        board.done.send(()).unwrap();
        board.thread.join().expect("board thread");
    }
    assert_eq!(r1.join().unwrap() + r2.join().unwrap(), 0, "badly framed packets on the channel");
}

fn is_gre_tap(p: &[u8]) -> bool {
    p.len() > 4 + 14 && p[..4] == [0, 0, 0x65, 0x58]
}

fn is_ipv4(p: &[u8]) -> bool {
    !p.is_empty() && (p[0] >> 4 == 4 || p[0] >> 4 == 6)
}

#[test]
fn l3_tun_overlay_carries_ip_between_namespaces() {
    require_root!();
    run_pair(Layer::L3, is_ipv4, false);
}

#[test]
fn l2_tap_overlay_carries_arp_unicast_and_broadcast_in_gre() {
    require_root!();
    run_pair(Layer::L2, is_gre_tap, false);
    run_pair(Layer::L2, is_gre_tap, true);
}

#[test]
fn bad_specs_and_malformed_packets_are_errors_not_crashes() {
    require_root!();
    let t = in_netns(|rt| {
        let (pipe, _out, input) = pipes();
        let bad = OverlaySpec {
            interface: "way-too-long-name0".into(),
            layer: Layer::L2,
            address: Ipv4Addr::new(192, 0, 2, 1),
            prefix_len: 24,
            mtu: 1400,
        };
        let e = rt.block_on(Overlay::create(&bad, pipe)).unwrap_err().to_string();
        assert!(e.contains("way-too-long-name0"), "{e}");
        let (pipe, _out, input2) = pipes();
        drop(input);
        let spec = OverlaySpec { interface: "s4tm0".into(), ..bad };
        let o = rt.block_on(Overlay::create(&spec, pipe)).unwrap();
        rt.block_on(async {
            input2.send(Bytes::from_static(&[1, 2, 3])).await.unwrap();
            input2.send(Bytes::from_static(&[0, 0, 0x08, 0x00, 1, 2])).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while o.stats.malformed.load(std::sync::atomic::Ordering::Relaxed) < 2 {
                assert!(Instant::now() < deadline, "malformed packets not counted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert!(o.is_alive(), "a malformed packet stopped the overlay");
        rt.block_on(o.remove());
    });
    t.join().unwrap();
}

/// An overlay takes nothing from the VPN it should not: no IPv6 (a member's router
/// advertisement would give the board an address and a default route through that member),
/// no forwarding even on a board that forwards (a member would route through it into its LAN
/// or another VPN), strict reverse-path filtering.
#[test]
fn an_overlay_takes_no_ipv6_and_forwards_nothing() {
    require_root!();
    let t = in_netns(|rt| {
        // A board that routes (a gateway, a container host): new interfaces forward by default.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        let read = |path: String| std::fs::read_to_string(&path).map(|v| v.trim().to_owned()).unwrap_or(path);
        for (name, layer) in [("s4th2", Layer::L2), ("s4th3", Layer::L3)] {
            let (pipe, _out, _input) = pipes();
            let spec = OverlaySpec {
                interface: name.into(),
                layer,
                address: Ipv4Addr::new(192, 0, 2, 1),
                prefix_len: 24,
                mtu: 1400,
            };
            let o = rt.block_on(Overlay::create(&spec, pipe)).unwrap();
            let v4 = |setting: &str| read(format!("/proc/sys/net/ipv4/conf/{name}/{setting}"));
            assert_eq!(v4("forwarding"), "0", "{name} forwards");
            assert_eq!(v4("rp_filter"), "1", "{name}: reverse-path filtering");
            assert_eq!(read(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6")), "1", "{name} has IPv6");
            rt.block_on(o.remove());
        }
    });
    t.join().unwrap();
}

/// Hands out pipes and keeps the tunnel ends, so the test can close a channel (a lost tunnel).
type TunnelEnd = (mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>);

#[derive(Default)]
struct PipeEnds {
    ends: std::sync::Mutex<Vec<TunnelEnd>>,
}

#[derive(Default, Clone)]
struct Pipes(std::sync::Arc<PipeEnds>);

impl std::ops::Deref for Pipes {
    type Target = PipeEnds;
    fn deref(&self) -> &PipeEnds {
        &self.0
    }
}

impl lightning_rod::rpc::PacketOpener for Pipes {
    fn open(
        &self,
        _url: String,
        _vpn: String,
        _token: Option<lightning_rod::Secret>,
    ) -> lightning_rod::rpc::services::BoxFuture<'_, lightning_rod::Result<PacketPipe>> {
        Box::pin(async move {
            let (pipe, out, input) = pipes();
            self.ends.lock().unwrap().push((out, input));
            Ok(pipe)
        })
    }
}

#[test]
fn vpn_membership_is_persisted_restored_and_cleaned_up() {
    require_root!();
    use lightning_rod::rpc::VpnManager;
    use lightning_rod::rpc::vpn::Membership;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let t = in_netns(move |rt| {
        let store = lightning_rod::state::StateStore::open(&path).unwrap();
        let pipes = Pipes::default();
        // An address, not a name: a join resolves the tunnel server to check that the VPN's
        // subnet spares it, and this namespace has no DNS.
        let m = VpnManager::new(store.clone(), Box::new(pipes.clone()), "ws://198.51.100.1:8080/".into());
        let member = Membership {
            layer: Layer::L2,
            address: Ipv4Addr::new(192, 0, 2, 7),
            prefix_len: 24,
            interface: "s4tv0".into(),
            tunnel_url: None,
            token: None,
        };
        rt.block_on(m.join("vpn-a", member.clone())).unwrap();
        assert!(ifindex("s4tv0").is_some());
        // The tunnel channel is lost: the overlay stops, restore brings it back.
        pipes.ends.lock().unwrap().clear();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while m.is_up("vpn-a") {
                assert!(Instant::now() < deadline, "overlay outlived its channel");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(m.restore_all().await, 0);
        });
        assert!(m.is_up("vpn-a") && ifindex("s4tv0").is_some());
        // A second interface name clash is refused.
        let clash = rt.block_on(m.join("vpn-b", member)).unwrap_err().to_string();
        assert!(clash.contains("s4tv0"), "{clash}");
        // A reboot: a new manager restores from vpns.json after the old one closed.
        rt.block_on(m.close_all());
        assert!(ifindex("s4tv0").is_none());
        let again = VpnManager::new(store, Box::new(pipes.clone()), "ws://198.51.100.1:8080/".into());
        assert_eq!(rt.block_on(again.restore_all()), 0);
        assert!(ifindex("s4tv0").is_some());
        assert!(rt.block_on(again.leave("vpn-a")).unwrap());
        assert!(ifindex("s4tv0").is_none());
        assert!(!rt.block_on(again.leave("vpn-a")).unwrap());
    });
    t.join().unwrap();
    let saved = std::fs::read_to_string(dir.path().join("vpns.json")).unwrap();
    assert_eq!(saved.trim(), "{}");
}

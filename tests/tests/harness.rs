//! The lab itself: boards behind NAT reach the cloud; the cloud cannot reach them.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use s4t_tests::{Lab, require_root, workspace_bin};

#[test]
fn board_behind_nat_reaches_cloud_but_not_the_reverse() {
    require_root!();
    let mut lab = Lab::new("nat").unwrap();
    let board = lab.add_board("a").unwrap();
    let cloud = lab.cloud().clone();

    // An echo server in the cloud namespace that reports each peer address it sees.
    let listener = cloud.run(|| TcpListener::bind((cloud.addr, 0))).unwrap().unwrap();
    let echo_addr = listener.local_addr().unwrap();
    let (peers_tx, peers_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = peers_tx.send(conn.peer_addr().unwrap());
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });

    // Board → cloud works, and the cloud sees the router's public address (NAT happened).
    let mut conn = board.connect(echo_addr, Duration::from_secs(5)).expect("board cannot reach the cloud");
    conn.write_all(b"hello from behind NAT").unwrap();
    let mut echoed = [0u8; 21];
    conn.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello from behind NAT");
    let seen = peers_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.ip(), board.public_addr, "the cloud saw {seen}, not the NAT router's address");
    assert_ne!(seen.ip(), board.addr);

    // A listener on the board answers locally...
    let board_listener = board.run(|| TcpListener::bind((board.addr, 0))).unwrap().unwrap();
    let board_port = board_listener.local_addr().unwrap().port();
    let board_addr = SocketAddr::from((board.addr, board_port));
    board.connect(board_addr, Duration::from_secs(5)).expect("the board's own listener must answer locally");

    // ...but the cloud, which has a route to the board LAN, cannot open a connection to it.
    match cloud.connect(board_addr, Duration::from_secs(3)) {
        Ok(_) => panic!("the cloud opened a connection to a board behind NAT: isolation is broken"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            ),
            "unexpected error kind: {e}"
        ),
    }
    // Nor can it reach the router's own address on the board LAN side.
    assert!(cloud.connect(SocketAddr::from((board.public_addr, board_port)), Duration::from_secs(3)).is_err());
}

#[test]
fn a_process_in_the_cloud_namespace_serves_boards() {
    require_root!();
    let mut lab = Lab::new("proc").unwrap();
    let board = lab.add_board("a").unwrap();
    let cloud = lab.cloud().clone();
    let data = lab.dir().join("cloud-data");
    let mut cmd = cloud.command(workspace_bin("iotronic").unwrap());
    cmd.args(["serve", "--plaintext", "--bind"]).arg(cloud.addr.to_string()).arg("--data-dir").arg(&data);
    lab.spawn("iotronic", cmd).unwrap();
    let rest = SocketAddr::from((cloud.addr, 8812));
    board.wait_tcp(rest, Duration::from_secs(30)).unwrap();

    let mut conn = board.connect(rest, Duration::from_secs(5)).unwrap();
    conn.write_all(b"GET /v1 HTTP/1.1\r\nHost: cloud\r\nConnection: close\r\n\r\n").unwrap();
    let response = String::from_utf8(s4t_tests::read_to_end_limited(&mut conn, 1 << 20).unwrap()).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "unexpected response: {response}");
    assert!(response.contains("\"id\":\"v1\""), "not the v1 document: {response}");
}

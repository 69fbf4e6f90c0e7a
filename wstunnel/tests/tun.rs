//! The packet pump against a real TUN device, in a private network namespace. Needs root:
//! skipped with a message otherwise, and failing under `CI` rather than skipping.

mod common;

use std::future::Future;
use std::net::{Ipv4Addr, UdpSocket};

use common::*;
use wstunnel::packet::{self, DeviceSpec, Layer, PacketChannel};
use wstunnel::server::{ListenOn, ServerHooks};

/// Pumps every packet channel into a fresh TUN device `s4tt0` with 198.18.0.1/30.
struct TunHooks;

// The trait spells out `+ Send` on the future, which `async fn` cannot.
#[allow(clippy::manual_async_fn)]
impl ServerHooks for TunHooks {
    fn packet_channel(
        &self,
        _board: &str,
        _vpn: &str,
        ch: PacketChannel,
    ) -> impl Future<Output = Result<(), wstunnel::server::Refusal>> + Send {
        async move {
            let spec = DeviceSpec {
                name: "s4tt0".into(),
                layer: Layer::L3,
                mtu: 1400,
                ipv4: Some((Ipv4Addr::new(198, 18, 0, 1), 30)),
            };
            let dev = packet::create_device(&spec).map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = packet::pump(&dev, ch, Layer::L3, tokio_util::sync::CancellationToken::new()).await;
            });
            Ok(())
        }
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IPv4/UDP packet (UDP checksum 0: optional over IPv4).
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

#[test]
fn packets_flow_between_a_board_and_a_tun_device_in_the_cloud() {
    // The TUN device, its address and the UDP sockets exist only in the test's namespace.
    in_private_netns(scenario);
}

async fn scenario() {
    let srv = start_server_with(config(ListenOn::Addr("127.0.0.1:0".parse().unwrap())), TunHooks).await;
    let (client, _stop) = start_client(&srv.url());
    let PacketChannel { sender, mut receiver } =
        within("open", client.open_packet_channel(vpn_token("b", "v"), "v".into())).await.unwrap();
    let cloud = Ipv4Addr::new(198, 18, 0, 1);
    let board = Ipv4Addr::new(198, 18, 0, 2);

    // Cloud → board: a datagram sent to the board's address leaves through the TUN device and
    // reaches the board as a whole IP packet.
    let sock = UdpSocket::bind((cloud, 0)).unwrap();
    sock.send_to(b"to the board", (board, 9999)).unwrap();
    let pkt = within("packet at the board", async {
        loop {
            let p = receiver.recv().await.unwrap();
            // Skip anything else the kernel sends (IPv6 router solicitations and the like).
            if p.len() > 28 && p[0] >> 4 == 4 && p[9] == 17 {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&pkt[16..20], &board.octets());
    assert_eq!(&pkt[28..], b"to the board");

    // Board → cloud: a packet the board sends arrives at a socket in the cloud.
    let rx = UdpSocket::bind((cloud, 0)).unwrap();
    rx.set_nonblocking(true).unwrap();
    let port = rx.local_addr().unwrap().port();
    sender.send(&udp_packet(board, cloud, 4242, port, b"to the cloud")).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = within("datagram in the cloud", async {
        loop {
            match rx.recv_from(&mut buf) {
                Ok(x) => return x,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    assert_eq!(&buf[..n], b"to the cloud");
    assert_eq!(from, (board, 4242).into());
}

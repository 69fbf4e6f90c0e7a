//! The packet pump routing between the members of a VPN, as the cloud runs it
//! ([`packet::pump_routed`]), each pump with a real TUN device in a private network namespace.
//! Needs root: skipped with a message otherwise, and failing under `CI` rather than skipping.

mod common;

use bytes::Bytes;
use common::*;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wstunnel::packet::{self, DeviceSpec, Hop, Layer, PacketChannel, PacketSender, PumpStats};

/// Packets each in-memory queue of a member holds.
const QUEUE: usize = 4;

#[test]
fn a_member_that_does_not_read_stalls_no_one_else() {
    in_private_netns(scenario);
}

/// Runs the cloud's pump for `m` with its own TUN device, routing by the packet's first byte
/// (the member's name); returns what it counts.
fn run_pump(name: &str, m: PacketChannel, members: [(u8, PacketSender); 3]) -> std::sync::Arc<PumpStats> {
    let spec = DeviceSpec { name: name.into(), layer: Layer::L3, mtu: 1400, ipv4: None };
    let dev = packet::create_device(&spec).unwrap();
    let stats = std::sync::Arc::new(PumpStats::default());
    let counted = stats.clone();
    tokio::spawn(async move {
        let route = |p: &[u8]| {
            members.iter().find(|(n, _)| p.first() == Some(n)).map_or(Hop::Device, |(_, s)| Hop::Forward(s.clone()))
        };
        let _ = packet::pump_routed(&dev, m, Layer::L3, CancellationToken::new(), &counted, route).await;
    });
    stats
}

/// Waits for `want` among what reaches a member (skipping what the kernel sends on its own
/// through the devices: IPv6 router solicitations and the like).
async fn expect(to_it: &mut mpsc::Receiver<Bytes>, want: &[u8]) {
    within("a packet between the members that read", async { while to_it.recv().await.unwrap() != want {} }).await
}

async fn scenario() {
    // Each member: its packet channel (in memory), what reaches it, and what it sends.
    let (a, mut a_to, a_from) = PacketChannel::in_memory(QUEUE);
    let (b, b_to, _b_from) = PacketChannel::in_memory(QUEUE);
    let (c, mut c_to, c_from) = PacketChannel::in_memory(QUEUE);
    let members = [(b'a', a.sender.clone()), (b'b', b.sender.clone()), (b'c', c.sender.clone())];
    let a_stats = run_pump("s4tfa0", a, members.clone());
    let _c_stats = run_pump("s4tfc0", c, members);
    // b never reads what reaches it (`b_to`).

    // a sends far more to b than b's queue holds; then a and c talk.
    within("a's packets for b taken", async {
        for i in 0..100u8 {
            a_from.send(Bytes::from(vec![b'b', i])).await.unwrap();
        }
    })
    .await;
    a_from.send(Bytes::from_static(b"c: from a")).await.unwrap();
    expect(&mut c_to, b"c: from a").await;
    c_from.send(Bytes::from_static(b"a: from c")).await.unwrap();
    expect(&mut a_to, b"a: from c").await;

    assert_eq!(b_to.len(), QUEUE, "b's queue is full");
    assert_eq!(a_stats.dropped.load(Ordering::Relaxed), 100 - QUEUE as u64, "a's packets b had no room for");
}

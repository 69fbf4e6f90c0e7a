//! Packet channels: whole IP packets (L3, for TUN) or GRE-TAP packets (L2, for TAP) carried one
//! per frame over a board's tunnel channel, and the pump between a channel and a TUN/TAP
//! device that both the board and the cloud use.
//!
//! Packets are datagrams: a full receive queue drops the packet (as a NIC would) instead of
//! stalling the channel; senders wait for room on the channel's data queue.

use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes};
use s4t_shared::tunnel::frame::{MAX_PACKET, T_PACKET};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::io::{Outbound, payload_buf};

/// Packets queued per channel before new ones are dropped.
pub(crate) const PACKET_QUEUE: usize = 512;

/// Both ends of one packet channel, as handed to the cloud's hook or returned to the board.
pub struct PacketChannel {
    pub sender: PacketSender,
    pub receiver: PacketReceiver,
}

impl std::fmt::Debug for PacketChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketChannel").field("id", &self.sender.id).finish()
    }
}

/// Sends packets to the peer. Cloneable.
#[derive(Clone)]
pub struct PacketSender {
    id: u32,
    link: Arc<Link>,
}

/// The channel a packet sender currently writes to: swapped on every reconnect, `None` while
/// disconnected or once closed.
#[derive(Default)]
pub(crate) struct Link {
    out: Mutex<Option<Outbound>>,
}

impl Link {
    pub(crate) fn set(&self, out: Option<Outbound>) {
        *self.out.lock().expect("packet link") = out;
    }
}

/// Receives the peer's packets. `recv` returns `None` once the channel is closed for good.
pub struct PacketReceiver {
    rx: mpsc::Receiver<Bytes>,
}

pub(crate) fn new_channel(id: u32, link: Arc<Link>) -> (PacketChannel, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(PACKET_QUEUE);
    (PacketChannel { sender: PacketSender { id, link }, receiver: PacketReceiver { rx } }, tx)
}

impl PacketSender {
    /// Sends one packet, waiting for room on the channel. Fails while disconnected (the packet
    /// is lost, as on a link that is down) and for packets over 65,535 bytes.
    pub async fn send(&self, packet: &[u8]) -> Result<(), Error> {
        if packet.len() > MAX_PACKET {
            return Err(Error::Protocol(format!("packet of {} bytes exceeds {MAX_PACKET}", packet.len())));
        }
        let out = self.link.out.lock().expect("packet link").clone().ok_or(Error::Closed)?;
        let mut buf = payload_buf(packet.len());
        buf.put_slice(packet);
        out.data(out.seal(buf, T_PACKET, self.id)).await
    }

    /// True while the channel is up.
    pub fn is_connected(&self) -> bool {
        self.link.out.lock().expect("packet link").as_ref().is_some_and(|o| !o.is_closed())
    }
}

impl PacketReceiver {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }
}

/// Delivers a received packet without waiting; drops it when the receiver lags.
pub(crate) fn deliver(tx: &mpsc::Sender<Bytes>, packet: Bytes) {
    if tx.try_send(packet).is_err() {
        tracing::trace!("packet receiver lags or is gone: packet dropped");
    }
}

/// What a packet channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Raw IP packets, for a TUN device.
    L3,
    /// Ethernet frames in GRE-TAP framing (RFC 2784, 0x6558) on the wire, for a TAP device.
    L2,
}

/// A TUN or TAP device to create. The cloud creates TAPs this way and then attaches them to a
/// bridge itself (rtnetlink); the board usually gives an address.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub name: String,
    pub layer: Layer,
    pub mtu: u16,
    /// Address and prefix length to assign, if any.
    pub ipv4: Option<(std::net::Ipv4Addr, u8)>,
}

/// Creates the device (up). Needs CAP_NET_ADMIN.
pub fn create_device(spec: &DeviceSpec) -> Result<tun_rs::AsyncDevice, Error> {
    let mut b = tun_rs::DeviceBuilder::new().name(spec.name.clone()).mtu(spec.mtu).layer(match spec.layer {
        Layer::L3 => tun_rs::Layer::L3,
        Layer::L2 => tun_rs::Layer::L2,
    });
    if let Some((addr, prefix)) = spec.ipv4 {
        b = b.ipv4(addr, prefix, None);
    }
    b.build_async().map_err(|e| Error::io(format!("create {:?} device {}", spec.layer, spec.name), e))
}

/// Moves packets between `device` and `channel` until the channel closes for good or
/// `shutdown`. For [`Layer::L2`] each frame is GRE-TAP encapsulated on the way out and checked
/// and decapsulated on the way in (malformed packets are dropped and counted in the log).
/// Packets read while the channel is disconnected are dropped, as on a link that is down.
pub async fn pump(
    device: &tun_rs::AsyncDevice,
    channel: PacketChannel,
    layer: Layer,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    let PacketChannel { sender, mut receiver } = channel;
    let to_channel = async {
        let mut buf = vec![0u8; MAX_PACKET];
        let hl = s4t_shared::gre::HEADER_LEN;
        loop {
            // L2: read the frame behind room for the GRE header, so it is sent without a copy.
            let off = if layer == Layer::L2 { hl } else { 0 };
            let n = device.recv(&mut buf[off..]).await.map_err(|e| Error::io("read from the device", e))?;
            if layer == Layer::L2 {
                buf[..hl].copy_from_slice(&s4t_shared::gre::header());
            }
            let _ = sender.send(&buf[..off + n]).await;
        }
    };
    let to_device = async {
        let mut dropped = 0u64;
        while let Some(p) = receiver.recv().await {
            let frame = match layer {
                Layer::L3 => &p[..],
                Layer::L2 => match s4t_shared::gre::decapsulate(&p) {
                    Ok(f) => f,
                    Err(e) => {
                        dropped += 1;
                        tracing::debug!(cause = %e, dropped, "malformed GRE packet dropped");
                        continue;
                    }
                },
            };
            if let Err(e) = device.send(frame).await {
                tracing::debug!(cause = %e, "device refused a packet");
            }
        }
        Ok::<(), Error>(())
    };
    tokio::select! {
        r = to_channel => r,
        r = to_device => r,
        _ = shutdown.cancelled() => Ok(()),
    }
}

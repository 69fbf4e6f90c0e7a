//! Packet channels: whole IP packets (L3, for TUN) or GRE-TAP packets (L2, for TAP) carried one
//! per frame over a board's tunnel channel, and the pump between a channel and a TUN/TAP
//! device that both the board and the cloud use.
//!
//! Packets are datagrams: a full receive queue drops the packet (as a NIC would) instead of
//! stalling the channel; senders wait for room on the channel's data queue, except a pump
//! forwarding to another channel, which drops the packet when that channel's forward queue is
//! full (as a switch does for a congested port).

use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::{BufMut, Bytes};
use portable_atomic::{AtomicU64, AtomicUsize, Ordering};
use s4t_shared::gre;
use s4t_shared::tunnel::frame::{MAX_PACKET, T_PACKET};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::io::{Outbound, payload_buf};

/// Packets queued per channel before new ones are dropped.
pub(crate) const PACKET_QUEUE: usize = 512;
/// Bytes of packets queued per channel before new ones are dropped: with packets of up to
/// 64 KB, the count alone would let a slow receiver hold 32 MB per channel.
pub(crate) const PACKET_QUEUE_BYTES: usize = 4 << 20;
/// What a queued packet costs against [`PACKET_QUEUE_BYTES`] besides its bytes: its slot and
/// bookkeeping.
const PACKET_OVERHEAD: usize = 64;
/// Received packets shorter than this are copied out of the channel's read buffer before they
/// are queued: a slice keeps the whole buffer (up to 256 KiB) while the packet waits, so 512
/// small packets could hold 512 buffers against the 4 MiB bound. Every usual MTU (up to
/// 9,000-byte jumbo frames) is copied; the bulk of a VPN with the cloud's 65,000-byte MTU,
/// whose packets mostly share their buffers with each other, is not.
const COPY_PACKET_BELOW: usize = 16 * 1024;
/// Packets from other channels' pumps waiting to be written to one channel
/// ([`PacketSender::try_forward`]); beyond, they are dropped. 64 of the largest packets are
/// 4 MiB, a receive queue's bound.
const FORWARD_QUEUE: usize = 64;

/// Both ends of one packet channel, as handed to the cloud's hook or returned to the board.
///
/// A board's channel (from [`crate::client::ClientHandle::open_packet_channel`]) is closed
/// when its last handle is dropped: the receiver and every clone of the sender. The client then
/// forgets it (no re-open after a reconnect) and tells the server (`PacketClose`), which drops
/// its end, so the hook's receiver ends. The halves may be dropped in any order; a sender clone
/// kept alone keeps the channel open. The server's ends have no such guard: the board decides
/// when a channel closes.
pub struct PacketChannel {
    pub sender: PacketSender,
    pub receiver: PacketReceiver,
}

impl std::fmt::Debug for PacketChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketChannel").field("id", &self.sender.id).finish()
    }
}

impl PacketChannel {
    /// A packet channel over two in-memory queues instead of a tunnel, for tests and fakes:
    /// what is sent comes out of the returned receiver, what is pushed into the returned
    /// sender is received. Sending waits for room, as on a channel's socket.
    pub fn in_memory(capacity: usize) -> (PacketChannel, mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>) {
        let (out_tx, out_rx) = mpsc::channel(capacity);
        let (in_tx, in_rx) = mpsc::channel(capacity);
        let chan = PacketChannel {
            sender: PacketSender { id: 0, to: Target::Queue(out_tx), _close: None },
            receiver: PacketReceiver { rx: in_rx, queued: None, _close: None },
        };
        (chan, out_rx, in_tx)
    }
}

/// Sends packets to the peer. Cloneable.
#[derive(Clone)]
pub struct PacketSender {
    id: u32,
    to: Target,
    /// Shared with the receiver and every clone: see [`OnClose`].
    _close: Option<Arc<OnClose>>,
}

/// What closing a channel takes: run once, when the last handle holding it (a board's
/// receiver and senders, [`PacketChannel`]) is dropped.
pub(crate) type CloseAction = Box<dyn FnOnce() + Send + Sync>;

/// Runs its [`CloseAction`] when dropped; the handles of one channel share it in an `Arc`, so
/// it runs when the last of them goes. Never runs twice, and holds nothing but the action.
pub(crate) struct OnClose(Option<CloseAction>);

impl Drop for OnClose {
    fn drop(&mut self) {
        if let Some(close) = self.0.take() {
            close();
        }
    }
}

#[derive(Clone)]
enum Target {
    Link(Arc<Link>),
    Queue(mpsc::Sender<Bytes>),
}

/// The channel a packet sender currently writes to: swapped on every reconnect, `None` while
/// disconnected or once closed.
#[derive(Default)]
pub(crate) struct Link {
    out: Mutex<Option<Outbound>>,
    /// Packets other channels' pumps forward to this one (with the channel id to send them
    /// as), written by a task of their own ([`forward_queued`]) started with the first: a
    /// pump must not wait for one destination's socket, or a member that stops reading would
    /// stall the packets of its sender to every other member.
    forwarded: OnceLock<mpsc::Sender<(u32, Bytes)>>,
}

impl Link {
    pub(crate) fn set(&self, out: Option<Outbound>) {
        *self.out.lock().expect("packet link") = out;
    }

    /// Whether it leads to a connection now.
    pub(crate) fn is_set(&self) -> bool {
        self.out.lock().expect("packet link").is_some()
    }

    fn get(&self) -> Result<Outbound, Error> {
        self.out.lock().expect("packet link").clone().ok_or(Error::Closed)
    }
}

/// Receives the peer's packets. `recv` returns `None` once the channel is closed for good.
pub struct PacketReceiver {
    rx: mpsc::Receiver<Bytes>,
    /// Bytes queued, shared with the [`Inbox`] (none for an in-memory channel).
    queued: Option<Arc<AtomicUsize>>,
    /// Shared with the senders: see [`OnClose`].
    _close: Option<Arc<OnClose>>,
}

/// Where a channel's reader task delivers received packets: a queue bounded in packets
/// ([`PACKET_QUEUE`]) and in bytes ([`PACKET_QUEUE_BYTES`]).
pub(crate) struct Inbox {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Inbox {
    /// Queues a received packet without waiting (a small one copied out of the read buffer,
    /// [`COPY_PACKET_BELOW`]); drops it when the receiver lags (as a NIC would) or is gone.
    pub(crate) fn deliver(&self, packet: Bytes) {
        let cost = packet.len() + PACKET_OVERHEAD;
        let before = self.queued.fetch_add(cost, Ordering::AcqRel);
        let packet = if before + cost > PACKET_QUEUE_BYTES {
            None
        } else if packet.len() < COPY_PACKET_BELOW {
            Some(Bytes::copy_from_slice(&packet))
        } else {
            Some(packet)
        };
        if packet.is_none_or(|p| self.tx.try_send(p).is_err()) {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            tracing::trace!("packet receiver lags or is gone: packet dropped");
        }
    }
}

/// A channel `id` sending on `link` and the inbox its received packets go to. `on_close`, if
/// given, runs once the returned channel's last handle is dropped (the board's channels; the
/// server's have none).
pub(crate) fn new_channel(id: u32, link: Arc<Link>, on_close: Option<CloseAction>) -> (PacketChannel, Inbox) {
    let (tx, rx) = mpsc::channel(PACKET_QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let close = on_close.map(|f| Arc::new(OnClose(Some(f))));
    let receiver = PacketReceiver { rx, queued: Some(queued.clone()), _close: close.clone() };
    let sender = PacketSender { id, to: Target::Link(link), _close: close };
    (PacketChannel { sender, receiver }, Inbox { tx, queued })
}

fn check_len(len: usize) -> Result<(), Error> {
    if len > MAX_PACKET {
        return Err(Error::Protocol(format!("packet of {len} bytes exceeds {MAX_PACKET}")));
    }
    Ok(())
}

impl PacketSender {
    /// Sends one packet, waiting for room on the channel. Fails while disconnected (the packet
    /// is lost, as on a link that is down) and for packets over 65,535 bytes.
    pub async fn send(&self, packet: &[u8]) -> Result<(), Error> {
        check_len(packet.len())?;
        match &self.to {
            Target::Link(link) => {
                let out = link.get()?;
                let mut buf = payload_buf(packet.len());
                buf.put_slice(packet);
                out.data(out.seal(buf, T_PACKET, self.id)).await
            }
            Target::Queue(q) => q.send(Bytes::copy_from_slice(packet)).await.map_err(|_| Error::Closed),
        }
    }

    /// Sends a packet received from another channel without copying it when this channel's
    /// frames are not masked (the header goes out beside it in one vectored write).
    pub async fn forward(&self, packet: Bytes) -> Result<(), Error> {
        check_len(packet.len())?;
        match &self.to {
            Target::Link(link) => {
                let out = link.get()?;
                match out.header_for(T_PACKET, self.id, packet.len()) {
                    Some(header) => {
                        let mut sink = out.lock().await?;
                        sink.push(header);
                        sink.push(packet);
                        sink.flush().await
                    }
                    None => self.send(&packet).await,
                }
            }
            Target::Queue(q) => q.send(packet).await.map_err(|_| Error::Closed),
        }
    }

    /// Queues a packet received from another channel to be [forwarded](Self::forward) on
    /// this one, without waiting; `false` when it is dropped instead: the channel is down,
    /// [`FORWARD_QUEUE`] packets wait already, or the packet is too large.
    fn try_forward(&self, packet: Bytes) -> bool {
        if packet.len() > MAX_PACKET {
            return false;
        }
        match &self.to {
            Target::Link(link) => {
                if !link.is_set() {
                    return false;
                }
                let q = link.forwarded.get_or_init(|| {
                    let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
                    tokio::spawn(forward_queued(Arc::downgrade(link), rx));
                    tx
                });
                q.try_send((self.id, packet)).is_ok()
            }
            Target::Queue(q) => q.try_send(packet).is_ok(),
        }
    }

    /// True while the channel is up.
    pub fn is_connected(&self) -> bool {
        match &self.to {
            Target::Link(link) => link.out.lock().expect("packet link").as_ref().is_some_and(|o| !o.is_closed()),
            Target::Queue(q) => !q.is_closed(),
        }
    }
}

/// Writes the packets other channels' pumps queued for `link`, in order, until the link is
/// gone. It holds the link only while writing one, so the link's end drops the queue's sender
/// and ends this task.
async fn forward_queued(link: Weak<Link>, mut rx: mpsc::Receiver<(u32, Bytes)>) {
    while let Some((id, packet)) = rx.recv().await {
        let Some(link) = link.upgrade() else { return };
        if let Err(e) = (PacketSender { id, to: Target::Link(link), _close: None }).forward(packet).await {
            tracing::trace!(cause = %e, "forwarded packet lost");
        }
    }
}

impl PacketReceiver {
    pub async fn recv(&mut self) -> Option<Bytes> {
        let p = self.rx.recv().await?;
        if let Some(q) = &self.queued {
            q.fetch_sub(p.len() + PACKET_OVERHEAD, Ordering::AcqRel);
        }
        Some(p)
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

/// Makes VPN interface `name` refuse what a member could forge through it, before its link is
/// up (both ends call it: the cloud's devices and bridges, a board's overlay): strict
/// reverse-path filtering (a packet whose source would not be routed back through it is
/// dropped), no forwarding of what comes in on it, and no IPv6 (no router advertisement or
/// link-local traffic from a member; a kernel without IPv6 has nothing to disable). On error,
/// the file that could not be written.
pub fn harden_interface(name: &str) -> Result<(), (String, std::io::Error)> {
    let v4 = |setting: &str| format!("/proc/sys/net/ipv4/conf/{name}/{setting}");
    let v6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    // `true`: the file may be missing.
    for (path, value, optional) in [(v4("rp_filter"), "1", false), (v4("forwarding"), "0", false), (v6, "1", true)] {
        match std::fs::write(&path, value) {
            Err(e) if !(optional && e.kind() == std::io::ErrorKind::NotFound) => return Err((path, e)),
            _ => {}
        }
    }
    Ok(())
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

/// Counters of one pump.
#[derive(Debug, Default)]
pub struct PumpStats {
    /// Packets read from the device and sent on the channel.
    pub sent: AtomicU64,
    /// Packets received on the channel and written to the device.
    pub received: AtomicU64,
    /// Packets received on the channel and queued for another channel by the route.
    pub forwarded: AtomicU64,
    /// Packets lost: the channel was down, the device refused them, the route dropped them
    /// ([`Hop::Drop`]), or the other channel was down or had its forward queue full.
    pub dropped: AtomicU64,
    /// Malformed GRE packets from the channel (dropped).
    pub malformed: AtomicU64,
}

fn count(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed)
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
    pump_routed(device, channel, layer, shutdown, &PumpStats::default(), |_| Hop::Device).await
}

/// Where the route of [`pump_routed`] sends a packet received on the channel.
pub enum Hop {
    /// Written to the device.
    Device,
    /// Forwarded, as it came, to another channel (a switch or router in user space).
    Forward(PacketSender),
    /// Nowhere: dropped and counted in [`PumpStats::dropped`] (a source the sender may not
    /// use, say).
    Drop,
}

/// [`pump`], counting in `stats`, and asking `route` where each packet received on the
/// channel goes: `route` sees the Ethernet frame (L2) or IP packet (L3) and names a [`Hop`].
/// A forwarded packet is dropped when the other channel's forward queue is full.
pub async fn pump_routed(
    device: &tun_rs::AsyncDevice,
    channel: PacketChannel,
    layer: Layer,
    shutdown: tokio_util::sync::CancellationToken,
    stats: &PumpStats,
    mut route: impl FnMut(&[u8]) -> Hop,
) -> Result<(), Error> {
    let PacketChannel { sender, mut receiver } = channel;
    let to_channel = async {
        let mut buf = vec![0u8; MAX_PACKET];
        // L2: the frame is read behind room for the GRE header.
        let off = if layer == Layer::L2 { gre::HEADER_LEN } else { 0 };
        buf[..off].copy_from_slice(&gre::header()[..off]);
        loop {
            let n = device.recv(&mut buf[off..]).await.map_err(|e| Error::io("read from the device", e))?;
            match sender.send(&buf[..off + n]).await {
                Ok(()) => count(&stats.sent),
                Err(_) => count(&stats.dropped),
            };
        }
    };
    let to_device = async {
        while let Some(p) = receiver.recv().await {
            let inner = match layer {
                Layer::L3 => &p[..],
                Layer::L2 => match gre::decapsulate(&p) {
                    Ok(f) => f,
                    Err(e) => {
                        if count(&stats.malformed) == 0 {
                            tracing::warn!(cause = %e, "dropping malformed GRE packets");
                        }
                        continue;
                    }
                },
            };
            match route(inner) {
                Hop::Device => {}
                Hop::Forward(peer) => {
                    // Never waits: a member that does not read must not stall this one's
                    // packets to the others (or to the device).
                    count(if peer.try_forward(p) { &stats.forwarded } else { &stats.dropped });
                    continue;
                }
                Hop::Drop => {
                    count(&stats.dropped);
                    continue;
                }
            }
            match device.send(inner).await {
                Ok(_) => count(&stats.received),
                Err(e) => {
                    // EINVAL and friends for one bad packet: drop it, keep the link.
                    tracing::debug!(cause = %e, "device refused a packet");
                    count(&stats.dropped)
                }
            };
        }
        Ok::<(), Error>(())
    };
    tokio::select! {
        r = to_channel => r,
        r = to_device => r,
        _ = shutdown.cancelled() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{ChanRead, WsReader, outbound, tcp_pair};
    use bytes::BytesMut;
    use s4t_shared::tunnel::Frame;
    use s4t_shared::tunnel::ws::{Message, Role};
    use std::time::Duration;

    /// Small packets waiting in the receive queue hold copies, not the buffers they were read
    /// into, and each costs its overhead against the byte bound.
    #[tokio::test]
    async fn queued_small_packets_do_not_pin_their_read_buffer() {
        let (mut chan, inbox) = new_channel(1, Arc::new(Link::default()), None);
        let read_buffer = Bytes::from(vec![7u8; 256 * 1024]);
        for i in 0..PACKET_QUEUE + 10 {
            inbox.deliver(read_buffer.slice(i..i + 100));
        }
        assert!(read_buffer.is_unique(), "queued packets pin the read buffer");
        assert_eq!(inbox.queued.load(Ordering::Acquire), PACKET_QUEUE * (100 + PACKET_OVERHEAD));
        assert_eq!(chan.receiver.recv().await.unwrap(), read_buffer.slice(0..100));
    }

    /// Packets forwarded to a channel go out on it in order; forwarding to a channel whose
    /// peer does not read never waits: once [`FORWARD_QUEUE`] packets wait, the next are
    /// dropped.
    #[tokio::test]
    async fn forwarding_to_a_channel_never_waits() {
        let (ours, theirs) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(ours.into_split().1), false);
        let link = Arc::new(Link::default());
        link.set(Some(out));
        let (chan, _inbox) = new_channel(7, link, None);
        let mut reader = WsReader::new(ChanRead::Tcp(theirs.into_split().0), Role::Client, BytesMut::new(), false);
        for i in 0..3u8 {
            assert!(chan.sender.try_forward(Bytes::from(vec![i; 100])));
        }
        for i in 0..3u8 {
            let m = tokio::time::timeout(Duration::from_secs(10), reader.next()).await.expect("no packet came");
            let Some(Message::Binary(b)) = m.unwrap() else { panic!("expected a frame") };
            match Frame::decode(&b).unwrap() {
                Frame::Packet { channel: 7, payload } => assert_eq!(payload, vec![i; 100]),
                f => panic!("expected packet {i}, got {f:?}"),
            }
        }

        let (ours, _never_read) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(ours.into_split().1), false);
        let link = Arc::new(Link::default());
        link.set(Some(out));
        let (chan, _inbox) = new_channel(8, link, None);
        let big = Bytes::from(vec![1u8; 60_000]);
        let mut accepted = 0;
        for _ in 0..1000 {
            accepted += usize::from(chan.sender.try_forward(big.clone()));
            // The forwarder runs meanwhile, until the socket is full.
            tokio::task::yield_now().await;
        }
        assert!(accepted < 1000, "every packet was taken: the socket holds {} MB", 60 * accepted / 1000);
    }

    /// A slow receiver makes the inbox drop packets once it holds [`PACKET_QUEUE_BYTES`],
    /// well before [`PACKET_QUEUE`] packets; receiving frees the room again.
    #[tokio::test]
    async fn the_receive_queue_is_bounded_in_bytes() {
        let (mut chan, inbox) = new_channel(1, Arc::new(Link::default()), None);
        let big = Bytes::from(vec![7u8; 60_000]);
        for _ in 0..100 {
            inbox.deliver(big.clone());
        }
        let fit = PACKET_QUEUE_BYTES / (big.len() + PACKET_OVERHEAD);
        assert!(fit < 100, "the test must hit the byte bound first");
        assert_eq!(inbox.queued.load(Ordering::Acquire), fit * (big.len() + PACKET_OVERHEAD));
        for _ in 0..fit {
            assert_eq!(chan.receiver.recv().await.unwrap().len(), big.len());
        }
        assert!(futures_util::FutureExt::now_or_never(chan.receiver.recv()).is_none(), "more was queued");
        assert_eq!(inbox.queued.load(Ordering::Acquire), 0);
        inbox.deliver(Bytes::from_static(b"small"));
        assert_eq!(&chan.receiver.recv().await.unwrap()[..], b"small");
    }
}

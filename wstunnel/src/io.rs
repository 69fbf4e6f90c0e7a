//! The channel's WebSocket I/O: a reader that holds no buffer while idle, and a shared sink
//! that whoever has something to send writes to directly.
//!
//! Stream pumps take the sink's lock, read their TCP socket straight into the sink's frame
//! buffer and write the frame: no queue, no task hop, no allocation per frame. The reader task
//! never waits on the sink: when it must answer (a pong, a window update, a reset) it queues on
//! the bounded `ctrl` queue, which the next lock holder (or the writer task, woken for it)
//! writes first. A full `ctrl` queue means the peer floods us, which closes the channel. That
//! rule is what keeps two peers that both saturate their links from deadlocking on each other.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use s4t_shared::tunnel::Frame;
use s4t_shared::tunnel::frame::{HEADER_LEN, T_DATA, header};
use s4t_shared::tunnel::ws::{self, Decoded, Decoder, MAX_HEADER, Message, Opcode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::splice::{self, Pipe};

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

/// The receiving half of a channel's connection. Plain TCP stays visible as such, so that a
/// large data frame's payload can be spliced out of it ([`WsReader::next_data`]).
pub(crate) enum ChanRead {
    Tcp(OwnedReadHalf),
    Boxed(BoxRead),
}

impl AsyncRead for ChanRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ChanRead::Tcp(r) => Pin::new(r).poll_read(cx, b),
            ChanRead::Boxed(r) => Pin::new(r).poll_read(cx, b),
        }
    }
}

/// The sending half of a channel's connection (an owned TCP half, or a TLS stream's).
pub(crate) type ChanWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Capacity of the control queue (frames). Overflowing it closes the channel.
pub(crate) const CTRL_QUEUE: usize = 1024;
/// The most a stream reads from its TCP socket for one frame: large frames for bulk transfers
/// mean fewer system calls and wake-ups per byte (the frame buffer is reused, see [`Sink`]).
/// Four loopback segments (MSS 65,483 with timestamps) rather than the 256 KiB the protocol
/// allows: the receiving end writes each payload to its socket at once, usually a loopback
/// one (the board's local service), and 262,144 bytes left a 212-byte segment behind every
/// frame there (`TCP_NODELAY`). ours-ws alone, 3 alternating runs: +6 % throughput, 5-8 % less
/// CPU per GB (docs/benchmarks.md). Over a 1,500-byte MTU path either size ends short.
pub(crate) const MAX_READ: usize = 4 * 65_483;
const _: () = assert!(MAX_READ <= s4t_shared::tunnel::frame::MAX_DATA);
/// Room in front of a payload for the WebSocket and tunnel headers.
pub(crate) const PREFIX: usize = MAX_HEADER + HEADER_LEN;
/// The largest message accepted on a channel: a full data frame plus headers.
pub(crate) const MAX_MESSAGE: usize = s4t_shared::tunnel::frame::MAX_DATA + 64;
/// Frames one stream pump reads and writes at once at most (each of up to [`MAX_READ`]).
pub(crate) const BATCH: usize = 4;

/// Read size while a channel is quiet; reads grow to whole frames as soon as data flows.
const SMALL_READ: usize = 4 * 1024;
/// Frames written per vectored write at most.
const MAX_BATCH: usize = 64;

/// Reads whole messages. Between bursts it keeps at most a small buffer.
pub(crate) struct WsReader {
    rd: ChanRead,
    buf: BytesMut,
    dec: Decoder,
    big_reads: bool,
    /// Large data frames may be handed out unread ([`WsReader::next_data`]): plain TCP.
    splice: bool,
    /// Where a large frame's payload passes on its way to a stream's socket; kept while data
    /// flows.
    pipe: Option<Pipe>,
    /// The last frame was handed out unread: read the next header with a small read, not
    /// into the payload behind it.
    after_large: bool,
    /// The most one read takes once data flows: a whole message of the largest size the
    /// decoder accepts, plus its header.
    big_read: usize,
    /// `Some` while the peer has not proved itself: the decoder, built with a small limit,
    /// then refuses larger messages at their header. The flag is set (by whoever checked the
    /// peer's token or key) once it has.
    unproved: Option<Arc<AtomicBool>>,
    /// How the decoder was built (to build it again with the usual limit).
    role: Role,
    unmasked: bool,
}

fn decoder(role: Role, unmasked: bool, max: usize) -> Decoder {
    let dec = Decoder::new(role, max);
    if unmasked { dec.accept_unmasked() } else { dec }
}

/// A data frame for `stream` of which only the first bytes (`head`) were read: its other
/// `rest` payload bytes are still in the socket, and the caller must take exactly those with
/// [`WsReader::splice_in`] or [`WsReader::read_some`] before anything else.
pub(crate) struct LargeData {
    pub(crate) stream: u32,
    pub(crate) head: Bytes,
    pub(crate) rest: usize,
}

/// What [`WsReader::next_data`] found.
pub(crate) enum Next {
    Message(Message),
    Data(LargeData),
}

/// A data frame with at least this much payload left in the socket is spliced, not read.
const SPLICE_MIN: usize = 16 * 1024;
/// A stream whose reads bring at least this much is read several frames at a time.
const BULK_MIN: usize = 16 * 1024;
/// The headers of a full-size data frame (WebSocket, unmasked, 64-bit length; tunnel).
const LARGE_HEAD: usize = 10 + HEADER_LEN;

impl WsReader {
    /// `unmasked`: (server) the client agreed to send unmasked frames.
    pub(crate) fn new(rd: ChanRead, role: Role, leftover: BytesMut, unmasked: bool) -> WsReader {
        let splice = matches!(rd, ChanRead::Tcp(_)) && splice::enabled();
        WsReader {
            rd,
            buf: leftover,
            dec: decoder(role, unmasked, MAX_MESSAGE),
            big_reads: false,
            splice,
            pipe: None,
            after_large: false,
            big_read: MAX_MESSAGE + MAX_HEADER,
            unproved: None,
            role,
            unmasked,
        }
    }

    /// A reader for a peer that has not proved itself yet: until `proved` is set, a frame or
    /// message over `max` bytes is refused at its header (before anything is allocated or
    /// read for it) and reads stay as small; then the usual limits apply, from the next
    /// message on.
    pub(crate) fn unproved(mut self, max: usize, proved: Arc<AtomicBool>) -> WsReader {
        let max = max.min(MAX_MESSAGE);
        self.dec = decoder(self.role, self.unmasked, max);
        self.big_read = max + MAX_HEADER;
        self.unproved = Some(proved);
        self
    }

    /// Once the peer has proved itself, and between messages (a fragmented message is
    /// assembled by the decoder it began in), the usual limits apply.
    fn lift_if_proved(&mut self) {
        let proved = self.unproved.as_ref().is_some_and(|p| p.load(Ordering::Acquire));
        if proved && !self.dec.in_message() {
            self.dec = decoder(self.role, self.unmasked, MAX_MESSAGE);
            self.big_read = MAX_MESSAGE + MAX_HEADER;
            self.unproved = None;
        }
    }

    /// The next message; `Ok(None)` on a clean end of stream between messages.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, Error> {
        Ok(self.next_inner(false).await?.map(|n| match n {
            Next::Message(m) => m,
            Next::Data(_) => unreachable!("large data frames are handed out only when asked for"),
        }))
    }

    /// Like [`next`](Self::next), but a stream data frame whose payload is mostly still in
    /// the socket comes out as [`Next::Data`] with its payload unread, so that the caller can
    /// splice it to the stream's socket.
    pub(crate) async fn next_data(&mut self) -> Result<Option<Next>, Error> {
        self.next_inner(self.splice).await
    }

    async fn next_inner(&mut self, large: bool) -> Result<Option<Next>, Error> {
        loop {
            if self.unproved.is_some() {
                self.lift_if_proved();
            }
            let need = match self.dec.decode(&mut self.buf) {
                Ok(Decoded::Message(m)) => {
                    self.after_large = false;
                    return Ok(Some(Next::Message(m)));
                }
                Ok(Decoded::Need(n)) => n,
                Err(ws::WsError::TooLong { len, max }) if self.unproved.is_some() => {
                    return Err(Error::Protocol(format!(
                        "a message of {len} bytes before the connection proved itself (at most {max} until then)"
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            if large && let Some(d) = self.large_data(need) {
                // The next frame is likely another large one: read its header on its own.
                (self.big_reads, self.after_large) = (false, true);
                return Ok(Some(Next::Data(d)));
            }
            if self.buf.is_empty() && self.buf.capacity() > 4 * SMALL_READ {
                // Quiet again: let the last burst's buffer go.
                self.buf = BytesMut::new();
            }
            if self.buf.is_empty() && !self.big_reads {
                // Between messages on a quiet channel: wait for data without holding a buffer.
                // After a large frame, read only the headers of the next (likely another):
                // its payload then goes to the stream's socket in one splice, not as a few
                // KiB written on their own first.
                let max = if self.after_large { LARGE_HEAD } else { SMALL_READ };
                if self.read_when_quiet(max).await? == 0 {
                    return Ok(None);
                }
                continue;
            }
            let chunk = if self.big_reads && !self.after_large { self.big_read } else { SMALL_READ };
            let missing = need.saturating_sub(self.buf.len());
            self.buf.reserve(chunk.max(missing));
            // Inside a large frame, read exactly to its end: the frame then leaves the buffer
            // whole, and the next reserve never copies a partial frame out of a buffer that
            // payload slices still share.
            let limit = if missing > SMALL_READ { missing } else { self.buf.capacity() - self.buf.len() };
            let room = limit;
            let n = self
                .rd
                .read_buf(&mut (&mut self.buf).limit(limit))
                .await
                .map_err(|e| Error::io("read from the tunnel channel", e))?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Protocol("connection closed in the middle of a frame".into()))
                };
            }
            self.big_reads = n == room;
        }
    }

    /// The frame at the start of the buffer, if it is a whole, unmasked stream data frame
    /// (the decoder has checked it against the limits already: it asked for all of it) whose
    /// headers are read and at least [`SPLICE_MIN`] payload bytes are not: consumes the
    /// headers and what was read of the payload.
    fn large_data(&mut self, need: usize) -> Option<LargeData> {
        if self.dec.in_message() {
            return None;
        }
        let h = ws::parse_header(&self.buf).ok()??;
        let body = h.header_len;
        let total = body + usize::try_from(h.len).ok()?;
        let ok = h.fin && h.opcode == Opcode::Binary && h.mask.is_none() && total == need;
        if !ok || self.buf.len() < body + HEADER_LEN || self.buf[body] != T_DATA {
            return None;
        }
        let rest = total.checked_sub(self.buf.len())?;
        if rest < SPLICE_MIN {
            return None;
        }
        let id = &self.buf[body + 1..body + HEADER_LEN];
        let stream = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        self.buf.advance(body + HEADER_LEN);
        let head = self.buf.split().freeze();
        Some(LargeData { stream, head, rest })
    }

    /// Moves up to `max` bytes of a [`LargeData`]'s rest from the socket into the reader's
    /// (empty) pipe, waiting for them; `None` when this channel cannot splice after all (take
    /// the bytes with [`read_some`](Self::read_some)).
    pub(crate) async fn splice_in(&mut self, max: usize) -> Result<Option<usize>, Error> {
        let ChanRead::Tcp(r) = &self.rd else { return Ok(None) };
        let Some(pipe) = splice::pipe_or_off(&mut self.pipe, &mut self.splice, MAX_READ) else { return Ok(None) };
        let sock = r.as_ref();
        loop {
            sock.readable().await.map_err(|e| Error::io("read from the tunnel channel", e))?;
            match pipe.fill_from(sock, max) {
                Ok(0) => return Err(Error::Protocol("connection closed in the middle of a frame".into())),
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if splice::unsupported(&e) => {
                    tracing::debug!(cause = %e, "splice refused: reading instead");
                    (self.splice, self.pipe) = (false, None);
                    return Ok(None);
                }
                Err(e) => return Err(Error::io("read from the tunnel channel", e)),
            }
        }
    }

    /// Moves up to `len` of the bytes [`splice_in`](Self::splice_in) put in the pipe into
    /// `tcp` without waiting; `WouldBlock` when it has no room.
    pub(crate) fn pipe_to(&self, tcp: &TcpStream, len: usize) -> std::io::Result<usize> {
        self.pipe.as_ref().ok_or(std::io::ErrorKind::NotFound)?.try_drain_into(tcp, len)
    }

    /// The splice pipe's inode (a new pipe has a new one), if the reader holds a pipe.
    #[cfg(test)]
    pub(crate) fn pipe_inode(&self) -> Option<u64> {
        self.pipe.as_ref().map(Pipe::inode)
    }

    /// Hands over the pipe (holding what [`splice_in`](Self::splice_in) put there); the
    /// next splice makes another.
    pub(crate) fn take_pipe(&mut self) -> Result<Pipe, Error> {
        self.pipe.take().ok_or_else(no_pipe)
    }

    /// Reads up to `max` bytes of a [`LargeData`]'s rest into memory.
    pub(crate) async fn read_some(&mut self, max: usize) -> Result<Bytes, Error> {
        let mut b = BytesMut::with_capacity(max.min(MAX_READ));
        let n = self.rd.read_buf(&mut b).await.map_err(|e| Error::io("read from the tunnel channel", e))?;
        if n == 0 {
            return Err(Error::Protocol("connection closed in the middle of a frame".into()));
        }
        Ok(b.freeze())
    }

    /// Reads up to `max` bytes into the empty buffer, which is allocated only for the read
    /// attempt: while the socket has nothing to read, the channel holds no buffer (an idle
    /// board channel costs the cloud its tasks and tables, not a read buffer). The splice
    /// pipe goes too when the read has to wait, unless a large frame came last: then the
    /// wait is most likely the sender's, between two frames of a bulk transfer.
    async fn read_when_quiet(&mut self, max: usize) -> Result<usize, Error> {
        let (rd, buf, pipe, keep_pipe) = (&mut self.rd, &mut self.buf, &mut self.pipe, self.after_large);
        let n = std::future::poll_fn(|cx| {
            buf.reserve(max);
            let r = tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *rd), cx, &mut (&mut *buf).limit(max));
            if r.is_pending() {
                *buf = BytesMut::new();
                if !keep_pipe {
                    *pipe = None;
                }
            }
            r
        })
        .await
        .map_err(|e| Error::io("read from the tunnel channel", e))?;
        self.big_reads = n >= SMALL_READ;
        Ok(n)
    }
}

/// The sending side of a channel: builds WebSocket frames (masked when this is a client that
/// did not agree unmasked frames with the server) and writes them. Cloneable; every clone
/// writes to the same socket.
///
/// Whoever holds the sink lock writes: a stream pump writes its own frames (no task hop, no
/// queue), and the writer task ([`write_loop`]) writes what the reader task queued on `ctrl`.
/// Every lock holder first writes what is queued, so a frame queued earlier (an `Open`) always
/// precedes frames written later (that stream's data). Writes are cancel-safe: a holder dropped
/// in the middle of a frame leaves the rest of it in the sink for the next holder.
#[derive(Clone)]
pub(crate) struct Outbound {
    sh: Arc<Shared>,
    mask: bool,
}

struct Shared {
    ctrl: mpsc::Sender<Bytes>,
    /// `Reset` frames the control queue had no room for ([`Outbound::reset`]): written right
    /// after what it holds.
    owed: std::sync::Mutex<Vec<Bytes>>,
    sink: tokio::sync::Mutex<Sink>,
    /// Something was queued on `ctrl`, or the channel is closing: the writer task looks.
    wake: Notify,
    /// The writer task should write what is queued and end.
    closing: AtomicBool,
    /// A write failed or the writer task ended: every later send fails.
    dead: AtomicBool,
    /// The sink holds a frame buffer: the writer task frees it once the channel goes quiet.
    holds_buf: AtomicBool,
    /// Cancelled when the writer task ends: a holder stuck writing to a peer that stopped
    /// reading gives up, so the socket closes.
    kill: CancellationToken,
}

struct Sink {
    wr: Option<ChanWrite>,
    /// The channel's TCP socket, to bound what it holds unsent on a slow link; dropped with
    /// `wr` (a second descriptor would otherwise keep the connection open).
    sock: Option<socket2::Socket>,
    /// The `TCP_NOTSENT_LOWAT` set on `sock` (the link was found slow), 0 for none; while the
    /// socket is full, frames are no larger either.
    lowat: u32,
    /// The current run of like samples of the link's rate.
    run: Run,
    ctrl: mpsc::Receiver<Bytes>,
    /// Frames (or the rest of a frame) to write before anything else.
    pending: VecDeque<Bytes>,
    /// The frame buffer stream pumps read into (`[PREFIX room][payload]`), kept while data
    /// flows so that bulk transfers neither allocate nor fault in pages per frame.
    buf: BytesMut,
    /// `buf[from..to]` is a frame being written.
    from: usize,
    to: usize,
    /// A frame was built in `buf` since the writer task last looked.
    used: bool,
    /// A frame written from `buf` did not fit in the socket at once (a slow link, or a slow
    /// peer), and no full-sized frame has fitted since: stream pumps send one frame at a time,
    /// so that another stream's frame waits behind one frame, not a batch. A small frame that
    /// fits (an interactive stream's) says nothing about the socket and leaves it set.
    full_socket: bool,
}

/// A frame's rest of [`SLOW_SAMPLE`] bytes or more that waited this long for room in a full
/// socket, at under [`SLOW_LINK`], shows a slow link ([`Sink::drained`]): the next frame of
/// any stream would wait as long. One that drained faster than [`SLOW_LINK`] shows a fast
/// link, or a peer that is slow to read on a busy host (loopback drains at 0.1-1 GB/s
/// measured so, the wake-ups included).
const SLOW_WAIT: Duration = Duration::from_millis(2);
const SLOW_SAMPLE: usize = 32 * 1024;
const SLOW_LINK: f64 = 64e6;
/// What a slow link's socket may hold unsent: this long of the link's rate...
const UNSENT_TIME: f64 = 0.005;
/// ... within these bounds (bytes).
const MIN_LOWAT: u32 = 16 * 1024;
const MAX_LOWAT: u32 = 128 * 1024;
/// A frame's rest smaller than this is no sample.
const RATE_SAMPLE: usize = 4 * 1024;

impl Sink {
    /// The socket is gone for this sink: no more writes, and its second descriptor closed.
    fn close(&mut self) {
        self.wr = None;
        self.sock = None;
    }

    /// The last `left` bytes of a frame waited `took` for room in the socket. On a slow link
    /// the socket's send buffer grows to hold the link's window and much more, and every other
    /// stream's next frame queues behind what it holds unsent: a megabyte, 80 ms at 100
    /// Mbit/s. So the socket of a slow link (see [`SLOW_WAIT`]) holds about
    /// [`UNSENT_TIME`] of the link's rate unsent (`TCP_NOTSENT_LOWAT`; `S4T_TUNNEL_LOWAT` sets
    /// a fixed number of bytes instead, 0 never bounds), and frames written to it while full
    /// are no larger. Bytes in flight are not bounded, so throughput on a long link is not
    /// either. A fast link is unbounded: there, bounding costs a tenth of the throughput in
    /// wake-ups (docs/benchmarks.md) and saves nothing. One sample proves little (on a busy
    /// host the peer may not run for milliseconds), so the link changes class only after
    /// [`RUN`] samples of one class in a row (in-between samples do not count).
    fn drained(&mut self, left: usize, took: Duration) {
        if self.sock.is_none() || left < RATE_SAMPLE {
            return;
        }
        let rate = left as f64 / took.as_secs_f64().max(1e-9);
        let slow = match rate {
            r if r >= SLOW_LINK => false,
            _ if took >= SLOW_WAIT && left >= SLOW_SAMPLE => true,
            _ => return,
        };
        let r = &mut self.run;
        if r.slow != Some(slow) {
            *r = Run { slow: Some(slow), samples: 0, bytes: 0, time: Duration::ZERO };
        }
        r.samples += 1;
        r.bytes += left;
        r.time += took;
        // A link seen slow for long enough needs fewer samples (one frame takes 100 ms at
        // 10 Mbit/s).
        if r.samples < RUN && !(r.samples >= 3 && r.time >= RUN_TIME) {
            return;
        }
        let rate = r.bytes as f64 / r.time.as_secs_f64().max(1e-9);
        let slow = r.slow == Some(true);
        self.run = Run::default();
        let want = match fixed_lowat() {
            _ if !slow => 0, // The system's default.
            Some(fixed) => fixed,
            None => ((rate * UNSENT_TIME) as u32).clamp(MIN_LOWAT, MAX_LOWAT),
        };
        // Re-tuned only when the link's rate moved by half or more.
        if want == self.lowat || (want > 0 && self.lowat > 0 && want.abs_diff(self.lowat) < self.lowat / 2) {
            return;
        }
        let Some(sock) = &self.sock else { return };
        match sock.set_tcp_notsent_lowat(want) {
            Ok(()) => {
                self.lowat = want;
                tracing::debug!(rate_mbps = rate / 1e6, lowat = want, "channel socket tuned to its link");
            }
            Err(e) => {
                tracing::debug!(cause = %e, "TCP_NOTSENT_LOWAT refused");
                self.sock = None;
            }
        }
    }
}

/// Samples in a row of one class of link ([`Sink::drained`]).
#[derive(Default)]
struct Run {
    /// Slow (`Some(true)`) or fast; `None`: no sample yet.
    slow: Option<bool>,
    samples: u32,
    bytes: usize,
    time: Duration,
}

/// Samples in a row it takes to call a link slow or fast...
const RUN: u32 = 8;
/// ... or three that took this long in all.
const RUN_TIME: Duration = Duration::from_millis(100);

/// `S4T_TUNNEL_LOWAT`, read once.
fn fixed_lowat() -> Option<u32> {
    static LOWAT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *LOWAT.get_or_init(|| std::env::var("S4T_TUNNEL_LOWAT").ok().and_then(|v| v.parse().ok()))
}

/// The writer task's end of a channel, for [`write_loop`].
pub(crate) struct Writer(Arc<Shared>);

/// A new channel sink over `wr`, with no socket to tune. `mask`: mask outgoing frames (an
/// RFC 6455 client).
#[cfg(test)]
pub(crate) fn outbound(wr: ChanWrite, mask: bool) -> (Outbound, Writer) {
    outbound_on(wr, mask, None)
}

/// A new channel sink over `wr`, which writes to the TCP socket `sock` (a second descriptor
/// of it): on a slow link the sink bounds what the socket holds unsent ([`Sink::drained`]).
pub(crate) fn outbound_on(wr: ChanWrite, mask: bool, sock: Option<socket2::Socket>) -> (Outbound, Writer) {
    // Bounded until the link proves fast: the first transfer on a slow link would otherwise
    // fill the send buffer (a megabyte) before the link is found slow.
    // With tuning off (`S4T_TUNNEL_LOWAT=0`), or refused, no second descriptor is kept.
    let lowat = fixed_lowat().unwrap_or(MAX_LOWAT);
    let sock = sock.filter(|s| lowat > 0 && s.set_tcp_notsent_lowat(lowat).is_ok());
    let lowat = if sock.is_some() { lowat } else { 0 };
    let (ctrl, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let sink = Sink {
        wr: Some(wr),
        sock,
        lowat,
        run: Run::default(),
        ctrl: ctrl_rx,
        pending: VecDeque::new(),
        buf: BytesMut::new(),
        from: 0,
        to: 0,
        used: false,
        full_socket: false,
    };
    let sh = Arc::new(Shared {
        ctrl,
        owed: std::sync::Mutex::default(),
        sink: tokio::sync::Mutex::new(sink),
        wake: Notify::new(),
        closing: AtomicBool::new(false),
        dead: AtomicBool::new(false),
        holds_buf: AtomicBool::new(false),
        kill: CancellationToken::new(),
    });
    (Outbound { sh: sh.clone(), mask }, Writer(sh))
}

impl Outbound {
    fn mask_key(&self) -> Option<[u8; 4]> {
        self.mask.then(rand::random::<[u8; 4]>)
    }

    /// A complete WebSocket binary frame carrying `f`.
    pub(crate) fn frame(&self, f: &Frame) -> Bytes {
        ws::encode_frame(Opcode::Binary, &f.encode(), self.mask_key())
    }

    /// A WebSocket control frame (ping, pong, close).
    pub(crate) fn ws_control(&self, op: Opcode, payload: &[u8]) -> Bytes {
        ws::encode_frame(op, payload, self.mask_key())
    }

    /// Queues a control frame without waiting; fails when the queue is full or closed.
    pub(crate) fn try_ctrl(&self, f: &Frame) -> Result<(), Error> {
        self.try_ctrl_raw(self.frame(f))
    }

    pub(crate) fn try_ctrl_raw(&self, b: Bytes) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        self.sh.ctrl.try_send(b).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Protocol("control queue overflow: the peer floods us".into()),
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        self.sh.wake.notify_one();
        Ok(())
    }

    /// Queues a stream's `Reset` without waiting, like [`try_ctrl`](Self::try_ctrl), but
    /// never drops it for a full queue: the peer would keep the stream (its task, its socket)
    /// until the channel died. It is owed instead, and written right after what the queue
    /// holds. Each owed reset follows the removal of a stream, so a live peer is owed few; one
    /// owed `max_owed` already does not read, and the channel is killed
    /// ([`kill`](Self::kill)) with an error.
    pub(crate) fn reset(&self, stream: u32, code: u16, max_owed: usize) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        match self.sh.ctrl.try_send(self.frame(&Frame::Reset { stream, code })) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::Closed),
            Err(mpsc::error::TrySendError::Full(f)) => {
                let mut owed = self.sh.owed.lock().expect("owed resets");
                if owed.len() >= max_owed {
                    drop(owed);
                    self.kill();
                    return Err(Error::Protocol(format!("the peer does not read: {max_owed} stream resets owed")));
                }
                owed.push(f);
            }
        }
        self.sh.wake.notify_one();
        Ok(())
    }

    /// Nothing more goes out on this channel: every send fails from now on, and the socket
    /// closes as soon as a holder stuck writing to it lets go (it gives up at once).
    pub(crate) fn kill(&self) {
        self.sh.dead.store(true, Ordering::Release);
        self.sh.kill.cancel();
        self.sh.wake.notify_one();
    }

    /// Writes a control frame, waiting for the socket (only from tasks other than the reader).
    pub(crate) async fn ctrl(&self, f: &Frame) -> Result<(), Error> {
        self.data(self.frame(f)).await
    }

    /// Writes a ready-made frame, waiting for the socket (backpressure).
    pub(crate) async fn data(&self, b: Bytes) -> Result<(), Error> {
        let mut g = self.lock().await?;
        g.sink.pending.push_back(b);
        g.flush().await
    }

    /// Takes the sink, writing whatever is queued first.
    pub(crate) async fn lock(&self) -> Result<SinkGuard<'_>, Error> {
        let sink = self.sh.sink.lock().await;
        let mut g = SinkGuard { sh: &self.sh, sink, mask: self.mask };
        if self.sh.dead.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        g.flush().await?;
        Ok(g)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.sh.dead.load(Ordering::Acquire) || self.sh.closing.load(Ordering::Acquire)
    }

    /// Asks the writer task to write what is queued, then close the socket and end.
    pub(crate) fn close(&self) {
        self.sh.closing.store(true, Ordering::Release);
        self.sh.wake.notify_one();
    }

    /// Turns a buffer laid out as `[PREFIX bytes of room][payload]` into a complete frame of
    /// type `kind` for `id`, in place.
    pub(crate) fn seal(&self, mut buf: BytesMut, kind: u8, id: u32) -> Bytes {
        let start = seal_in_place(&mut buf, kind, id, self.mask_key());
        buf.advance(start);
        buf.freeze()
    }

    /// The WebSocket and tunnel headers of a frame of type `kind` for `id` whose `len` payload
    /// bytes are written right after them from another buffer (no copy of the payload);
    /// `None` when this sink masks its frames (the payload must then be copied to be masked).
    pub(crate) fn header_for(&self, kind: u8, id: u32, len: usize) -> Option<Bytes> {
        if self.mask {
            return None;
        }
        let (h, start) = frame_headers(kind, id, None, len);
        Some(Bytes::copy_from_slice(&h[start..]))
    }
}

/// The WebSocket and tunnel headers of a frame of type `kind` for `id` carrying `payload_len`
/// bytes, laid out at the end of a [`PREFIX`]-byte array; returns it and where they start.
fn frame_headers(kind: u8, id: u32, mask: Option<[u8; 4]>, payload_len: usize) -> ([u8; PREFIX], usize) {
    let mut out = [0u8; PREFIX];
    out[MAX_HEADER..].copy_from_slice(&header(kind, id));
    let mut h = [0u8; MAX_HEADER];
    let n = ws::write_header(&mut h, true, Opcode::Binary, mask, HEADER_LEN + payload_len);
    out[MAX_HEADER - n..MAX_HEADER].copy_from_slice(&h[MAX_HEADER - n..]);
    (out, MAX_HEADER - n)
}

/// Writes the WebSocket and tunnel headers in front of the payload in `buf`
/// (`[PREFIX room][payload]`) and masks; returns where the frame starts.
fn seal_in_place(buf: &mut [u8], kind: u8, id: u32, mask: Option<[u8; 4]>) -> usize {
    let (h, start) = frame_headers(kind, id, mask, buf.len() - PREFIX);
    buf[start..PREFIX].copy_from_slice(&h[start..]);
    if let Some(m) = mask {
        ws::apply_mask(&mut buf[MAX_HEADER..], m);
    }
    start
}

/// The locked sink of a channel.
pub(crate) struct SinkGuard<'a> {
    sh: &'a Shared,
    sink: tokio::sync::MutexGuard<'a, Sink>,
    mask: bool,
}

/// What [`SinkGuard::send_from`] did.
pub(crate) enum Sent {
    /// A frame with this many payload bytes went out.
    Data(usize),
    /// The socket had nothing to read after all.
    WouldBlock,
    /// The socket reached end of stream.
    Eof,
    /// Reading the socket failed.
    ReadFailed,
}

impl SinkGuard<'_> {
    /// Adds a ready-made frame to write with the next [`flush`](Self::flush).
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.sink.pending.push_back(frame);
    }

    /// Writes everything pending (queued control frames first).
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        let sh = self.sh;
        let res = tokio::select! {
            r = self.flush_inner() => r,
            _ = sh.kill.cancelled() => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        self.check(res)
    }

    async fn flush_inner(&mut self) -> std::io::Result<()> {
        let sh = self.sh;
        let s = &mut *self.sink;
        let Some(wr) = s.wr.as_mut() else { return Err(std::io::ErrorKind::BrokenPipe.into()) };
        let mut wrote = false;
        loop {
            while s.pending.len() < MAX_BATCH {
                match s.ctrl.try_recv() {
                    Ok(b) => s.pending.push_back(b),
                    Err(_) => {
                        // Resets owed for want of room follow what the queue held then.
                        s.pending.extend(sh.owed.lock().expect("owed resets").drain(..));
                        break;
                    }
                }
            }
            if s.pending.is_empty() {
                break;
            }
            write_batch(wr, &mut s.pending).await?;
            wrote = true;
        }
        if wrote {
            wr.flush().await?;
        }
        Ok(())
    }

    fn check<T>(&mut self, res: std::io::Result<T>) -> Result<T, Error> {
        res.map_err(|e| {
            self.sh.dead.store(true, Ordering::Release);
            self.sink.close();
            Error::io("write to the tunnel channel", e)
        })
    }

    /// Reads up to `max` bytes from `tcp` into the sink's frame buffer and writes them as one
    /// frame of type `kind` for `id`. Fails only when the channel does.
    ///
    /// `bulk` is the stream's state across calls: whether its last read was large (at least
    /// [`BULK_MIN`] bytes).
    ///
    /// The payload is copied, never spliced, on this side: a copying sender reads up to
    /// [`BATCH`] frames in one call and writes them in one more, where a spliced one needed
    /// three calls per frame (splice in, headers, splice out); on the 2026-12-04 VM (AMD EPYC
    /// with AVX-512, fast copies) splicing on the sending side cost 20-25 % of the throughput,
    /// while splicing on the receiving side gains (docs/benchmarks.md).
    pub(crate) async fn send_from(
        &mut self,
        tcp: &TcpStream,
        max: usize,
        kind: u8,
        id: u32,
        bulk: &mut bool,
    ) -> Result<Sent, Error> {
        let s = &mut *self.sink;
        if !s.used {
            s.used = true;
            self.sh.holds_buf.store(true, Ordering::Release);
        }
        // A bulk stream (its last read was large) reads several frames' worth at once while
        // the channel's socket keeps up: a socket read in 1 MiB rather than 256 KiB calls costs
        // fewer system calls and wake-ups. After a write that found the socket full (a slow
        // link), one frame at a time, so that other streams' frames do not queue behind a
        // long batch; and small messages read into spare capacity, never zeroing a big buffer.
        let slots = if s.full_socket || !*bulk { 1 } else { max.div_ceil(MAX_READ).clamp(1, BATCH) };
        let mut max = max.min(slots * MAX_READ);
        if s.full_socket && s.lowat > 0 {
            max = max.min(s.lowat as usize);
        }
        let mask = self.mask;
        let h_full = PREFIX - frame_headers(kind, id, mask.then_some([0; 4]), MAX_READ).1;
        let at = |i: usize| PREFIX + i * (MAX_READ + h_full);
        let need = at(slots - 1) + max - (slots - 1) * MAX_READ;
        let read = if slots == 1 && s.buf.len() < need {
            s.buf.clear();
            s.buf.reserve(need);
            s.buf.resize(PREFIX, 0);
            tcp.try_read_buf(&mut (&mut s.buf).limit(max))
        } else {
            if s.buf.len() < need {
                // Zeroed once: the buffer keeps its length (so its bytes stay initialised)
                // while data flows.
                s.buf.resize(need, 0);
            }
            let mut rest = &mut s.buf[..need];
            let mut iov = Vec::with_capacity(slots);
            let mut base = 0;
            for i in 0..slots {
                let len = (max - i * MAX_READ).min(MAX_READ);
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(at(i) - base);
                let (payload, after) = tail.split_at_mut(len);
                iov.push(std::io::IoSliceMut::new(payload));
                (rest, base) = (after, at(i) + len);
            }
            tcp.try_read_vectored(&mut iov)
        };
        let n = match read {
            Ok(0) => return Ok(Sent::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Sent::WouldBlock),
            Err(_) => return Ok(Sent::ReadFailed),
        };
        *bulk = n >= BULK_MIN;
        // Seal each frame in place. Full frames (MAX_READ payload, `h_full` bytes of headers)
        // follow one another without a gap; a short last frame has shorter headers, so it is
        // moved back to close the gap.
        let frames = n.div_ceil(MAX_READ);
        let mut end = 0;
        for i in 0..frames {
            let len = (n - i * MAX_READ).min(MAX_READ);
            let p = at(i);
            let key = mask.then(rand::random::<[u8; 4]>);
            let start = p - PREFIX + seal_in_place(&mut s.buf[p - PREFIX..p + len], kind, id, key);
            if i == 0 {
                s.from = start;
            } else if start != p - h_full {
                s.buf.copy_within(start..p + len, p - h_full);
                end = p - h_full + (p + len - start);
                break;
            }
            end = p + len;
        }
        s.to = end;
        let sh = self.sh;
        let res = tokio::select! {
            r = self.write_buf() => r,
            _ = sh.kill.cancelled() => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        self.check(res)?;
        Ok(Sent::Data(n))
    }

    async fn write_buf(&mut self) -> std::io::Result<()> {
        let s = &mut *self.sink;
        let Some(wr) = s.wr.as_mut() else { return Err(std::io::ErrorKind::BrokenPipe.into()) };
        let (mut first, whole, mut waited) = (true, s.to - s.from, None);
        while s.from < s.to {
            let n = wr.write(&s.buf[s.from..s.to]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            s.from += n;
            if first {
                if s.from < s.to {
                    s.full_socket = true;
                    waited = Some((Instant::now(), s.to - s.from));
                } else if whole >= MAX_READ {
                    s.full_socket = false;
                }
                first = false;
            }
        }
        let res = wr.flush().await;
        if let Some((since, left)) = waited {
            s.drained(left, since.elapsed());
        }
        res
    }
}

impl Drop for SinkGuard<'_> {
    fn drop(&mut self) {
        let s = &mut *self.sink;
        if self.sh.dead.load(Ordering::Acquire) {
            s.close();
            s.from = s.to;
            return;
        }
        if s.from < s.to {
            // Dropped in the middle of a frame: the next holder writes the rest first.
            s.pending.push_front(Bytes::copy_from_slice(&s.buf[s.from..s.to]));
            s.from = s.to;
        }
    }
}

/// A buffer with [`PREFIX`] bytes of room, ready to receive up to `cap` payload bytes.
pub(crate) fn payload_buf(cap: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(PREFIX + cap);
    b.resize(PREFIX, 0);
    b
}

/// How long the sink keeps its frame buffer after the last frame built in it.
const BUF_LINGER: Duration = Duration::from_secs(2);

/// Writes what the reader task queues (control frames) until the channel closes or a write
/// fails, then closes the socket. Frees the frame buffer of a channel that went quiet.
pub(crate) async fn write_loop(w: Writer) -> Result<(), Error> {
    let sh = w.0.clone();
    let _closer = w;
    loop {
        if sh.holds_buf.load(Ordering::Acquire) {
            tokio::select! {
                _ = sh.wake.notified() => {}
                _ = tokio::time::sleep(BUF_LINGER) => {
                    if let Ok(mut s) = sh.sink.try_lock() {
                        if std::mem::take(&mut s.used) {
                            continue;
                        }
                        s.buf = BytesMut::new();
                        sh.holds_buf.store(false, Ordering::Release);
                    }
                    continue;
                }
            }
        } else {
            sh.wake.notified().await;
        }
        let sink = sh.sink.lock().await;
        let mut g = SinkGuard { sh: &sh, sink, mask: false };
        if sh.dead.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        g.flush().await?;
        if sh.closing.load(Ordering::Acquire) {
            if let Some(wr) = g.sink.wr.as_mut() {
                let _ = wr.shutdown().await;
            }
            return Ok(());
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // The writer task ended (or was aborted): nothing more goes out on this channel, and
        // the socket closes now or as soon as the current holder lets go of the sink.
        self.0.dead.store(true, Ordering::Release);
        self.0.kill.cancel();
        if let Ok(mut s) = self.0.sink.try_lock() {
            s.close();
        }
    }
}

fn no_pipe() -> Error {
    Error::Protocol("no pipe".into())
}

async fn write_batch(wr: &mut ChanWrite, batch: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !batch.is_empty() {
        let slices: Vec<IoSlice<'_>> = batch.iter().take(MAX_BATCH).map(|b| IoSlice::new(b)).collect();
        let mut n = wr.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let front = batch.front_mut().expect("wrote more than queued");
            if n >= front.len() {
                n -= front.len();
                batch.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Sends a WebSocket ping every `interval` while the channel lives; a peer that takes
/// nothing for three intervals is dead ([`keep_alive`]).
pub(crate) async fn ping_loop(out: Outbound, interval: Duration) {
    let _ = keep_alive(out, interval, 3 * interval).await;
}

/// Sends a WebSocket ping every `interval` until the channel closes (`Err(Closed)`) or its
/// peer is found dead: its control queue was full at every ping for longer than `stalled`
/// (the peer takes nothing we send; it may still send now and then, which keeps its reader
/// from timing out). A dead peer's channel is killed ([`Outbound::kill`]), and the error
/// says why.
pub(crate) async fn keep_alive(out: Outbound, interval: Duration, stalled: Duration) -> Result<(), Error> {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let mut full_since = None;
    loop {
        tick.tick().await;
        match out.try_ctrl_raw(out.ws_control(Opcode::Ping, b"ka")) {
            Ok(()) => full_since = None,
            Err(Error::Closed) => return Err(Error::Closed),
            Err(_) => {
                let since = *full_since.get_or_insert_with(Instant::now);
                if since.elapsed() > stalled {
                    out.kill();
                    return Err(Error::Timeout(format!("the peer has taken nothing we sent for {stalled:?}")));
                }
            }
        }
    }
}

/// Completes a read of exactly the bytes after an HTTP header: returns the header block and
/// whatever followed it.
pub(crate) async fn read_http_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    limit: usize,
) -> Result<(Vec<u8>, BytesMut), Error> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(pos) = find_head_end(&buf) {
            let head = buf.split_to(pos).to_vec();
            return Ok((head, buf));
        }
        if buf.len() >= limit {
            return Err(Error::Handshake(format!("HTTP header longer than {limit} bytes")));
        }
        buf.reserve(1024);
        let n = rd.read_buf(&mut buf).await.map_err(|e| Error::io("read the HTTP upgrade", e))?;
        if n == 0 {
            return Err(Error::Handshake("connection closed during the HTTP upgrade".into()));
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A connected pair of TCP sockets on 127.0.0.1 (port 0), for tests.
#[cfg(test)]
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    (a, l.accept().await.unwrap().0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use s4t_shared::tunnel::frame::T_PACKET;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that takes nothing we send (the control queue stays full at every ping) is
    /// found dead and its channel killed, even though it may still send now and then.
    #[tokio::test]
    async fn a_peer_that_takes_nothing_is_found_dead() {
        let (sink_end, _peer) = tcp_pair().await;
        // No writer task: nothing drains the queue.
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        while out.try_ctrl(&Frame::Fin { stream: 1 }).is_ok() {}
        tokio::time::timeout(Duration::from_secs(20), ping_loop(out.clone(), Duration::from_millis(5)))
            .await
            .expect("the pings went on");
        assert!(out.is_closed(), "the pings stopped, and the channel was left open");
    }

    /// A channel's socket starts bounded, is unbounded once its frames drain fast, and bounded
    /// to about [`UNSENT_TIME`] of the link once they wait on a slow link; a few samples of the
    /// other class among a run change nothing.
    #[tokio::test]
    async fn a_channel_socket_is_bounded_on_a_slow_link_only() {
        let (a, _b) = tcp_pair().await;
        let probe = socket2::SockRef::from(&a).try_clone().unwrap();
        let sock = socket2::SockRef::from(&a).try_clone().unwrap();
        let (out, _w) = outbound_on(Box::new(a.into_split().1), false, Some(sock));
        let lowat = || probe.tcp_notsent_lowat().unwrap();
        assert_eq!(lowat(), MAX_LOWAT, "bounded until the link proves fast");
        let mut g = out.lock().await.unwrap();
        let fast = |g: &mut SinkGuard<'_>| g.sink.drained(64 * 1024, Duration::from_micros(50));
        let slow = |g: &mut SinkGuard<'_>| g.sink.drained(100 * 1024, Duration::from_millis(8));
        for _ in 1..RUN {
            fast(&mut g);
        }
        assert_eq!(lowat(), MAX_LOWAT, "one sample short of a run");
        fast(&mut g);
        assert_eq!(lowat(), 0, "a fast link has the system's default");
        for i in 0..4 * RUN {
            if i % 4 == 0 { slow(&mut g) } else { fast(&mut g) }
        }
        // A small frame's rest, or a short wait at under 64 MB/s, is no sample.
        g.sink.drained(1024, Duration::from_millis(50));
        g.sink.drained(64 * 1024, Duration::from_millis(1));
        assert_eq!(lowat(), 0, "no run of slow samples");
        for _ in 0..RUN {
            slow(&mut g);
        }
        let want = (100.0 * 1024.0 / 0.008 * UNSENT_TIME) as u32;
        assert_eq!(lowat(), want, "about 5 ms of a 12.8 MB/s link");
        // Three long waits decide at once (a 10 Mbit/s link), and the bound has its floor.
        for _ in 0..3 {
            g.sink.drained(40 * 1024, Duration::from_millis(40));
        }
        assert_eq!(lowat(), MIN_LOWAT);
    }

    /// A header written beside its payload makes the same frame as one sealed in place.
    #[test]
    fn header_for_matches_a_sealed_frame() {
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let (out, _w) = outbound(Box::new(b), false);
        let payload = vec![9u8; 300];
        let mut buf = payload_buf(payload.len());
        buf.put_slice(&payload);
        let sealed = out.seal(buf, T_PACKET, 7);
        let head = out.header_for(T_PACKET, 7, payload.len()).expect("unmasked");
        assert_eq!([&head[..], &payload[..]].concat(), &sealed[..]);
        let (_, b2) = tokio::io::duplex(64);
        let (masked, _w2) = outbound(Box::new(b2), true);
        assert!(masked.header_for(T_PACKET, 7, 300).is_none(), "a masking sink must copy");
    }

    /// A stream pump reads up to [`BATCH`] frames' worth at once and writes the frames back to
    /// back, masked or not, a short last frame moved up against the full ones: the peer
    /// decodes every frame, none over `MAX_DATA`, and the payload whole and in order.
    #[tokio::test]
    async fn a_batch_of_frames_arrives_whole() {
        use s4t_shared::tunnel::frame::T_DATA;
        for mask in [false, true] {
            for total in [3 * MAX_READ + 1000, 2 * MAX_READ, 100_000, 4 * MAX_READ + 70_000] {
                let (chan, mut peer) = tcp_pair().await;
                let (mut src, ours) = tcp_pair().await;
                socket2::SockRef::from(&ours).set_recv_buffer_size(8 << 20).unwrap();
                let data: Vec<u8> = (0..total).map(|i| (i * 13 % 251) as u8).collect();
                // All of it waits in the socket: the first read takes a whole batch.
                src.write_all(&data).await.unwrap();
                let reader = tokio::spawn(async move {
                    let dec = Decoder::new(Role::Server, MAX_MESSAGE);
                    let mut dec = if mask { dec } else { dec.accept_unmasked() };
                    let (mut buf, mut got, mut frames) = (BytesMut::new(), Vec::new(), 0);
                    while got.len() < total {
                        match dec.decode(&mut buf).unwrap() {
                            Decoded::Message(Message::Binary(m)) => {
                                let Frame::Data { stream: 3, payload } = Frame::decode(&m).unwrap() else {
                                    panic!("not a data frame of stream 3")
                                };
                                assert!(payload.len() <= MAX_READ);
                                got.extend_from_slice(&payload);
                                frames += 1;
                            }
                            Decoded::Message(other) => panic!("{other:?}"),
                            Decoded::Need(_) => {
                                buf.reserve(64 * 1024);
                                assert_ne!(peer.read_buf(&mut buf).await.unwrap(), 0, "channel closed");
                            }
                        }
                    }
                    (got, frames)
                });
                let (_, wr) = chan.into_split();
                let (out, _w) = outbound(Box::new(wr), mask);
                let (mut sent, mut writes, mut bulk) = (0, 0, true);
                while sent < total {
                    ours.readable().await.unwrap();
                    let mut g = out.lock().await.unwrap();
                    match g.send_from(&ours, BATCH * MAX_READ, T_DATA, 3, &mut bulk).await.unwrap() {
                        Sent::Data(n) => (sent, writes) = (sent + n, writes + 1),
                        Sent::WouldBlock => {}
                        _ => panic!("the source ended early"),
                    }
                }
                let (got, frames) = reader.await.unwrap();
                assert!(got == data, "mask {mask}, {total} bytes: the payload is corrupt");
                assert_eq!(frames, total.div_ceil(MAX_READ), "{total} bytes");
                assert_eq!(writes, total.div_ceil(BATCH * MAX_READ), "{total} bytes: one write per batch");
                drop(src);
            }
        }
    }

    /// A frame whose writer is cancelled half way (here: the peer is not reading and the
    /// socket buffers are tiny) is completed by the next holder of the sink: the channel's
    /// byte stream stays whole.
    #[tokio::test]
    async fn a_frame_cut_short_is_completed_by_the_next_writer() {
        use std::future::Future;
        let (chan, mut peer) = tcp_pair().await;
        socket2::SockRef::from(&chan).set_send_buffer_size(4096).unwrap();
        socket2::SockRef::from(&peer).set_recv_buffer_size(4096).unwrap();
        let (mut src, ours) = tcp_pair().await;
        let data: Vec<u8> = (0..400_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = data.clone();
        let _feeder = tokio::spawn(async move { src.write_all(&d).await.map(|()| src) });
        let (_, wr) = chan.into_split();
        let (out, w) = outbound(Box::new(wr), false);
        let mut frames = 0;
        loop {
            ours.readable().await.unwrap();
            let mut g = out.lock().await.unwrap();
            let mut bulk = true;
            let mut fut = std::pin::pin!(g.send_from(&ours, MAX_READ, s4t_shared::tunnel::frame::T_DATA, 3, &mut bulk));
            match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                Poll::Ready(Ok(Sent::Data(_))) => frames += 1,
                Poll::Ready(Ok(Sent::WouldBlock)) => {}
                Poll::Ready(_) => panic!("the send failed"),
                Poll::Pending => break,
            }
            assert!(frames < 1000, "the channel socket never filled up");
        }
        {
            // The guard dropped with a frame half written: its rest waits in the sink.
            let s = out.sh.sink.try_lock().expect("the sink is free");
            assert!(!s.pending.is_empty(), "the rest of the cut frame was not kept");
        }
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        // The next holder writes the rest of the cut frame first, then its own.
        out.data(out.frame(&Frame::Fin { stream: 3 })).await.unwrap();
        drop(out);
        drop(w);
        let mut all = BytesMut::from(&reader.await.unwrap()[..]);
        let mut dec = Decoder::new(Role::Client, MAX_MESSAGE);
        let mut got = Vec::new();
        loop {
            let Ok(Decoded::Message(Message::Binary(b))) = dec.decode(&mut all) else { panic!("a frame is corrupt") };
            match Frame::decode(&b).unwrap() {
                Frame::Data { stream: 3, payload } => got.extend_from_slice(&payload),
                Frame::Fin { stream: 3 } => break,
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert!(all.is_empty(), "bytes after the last frame");
        assert!(got.len() > 8192, "too little went through to have filled the socket");
        assert_eq!(&got[..], &data[..got.len()], "the payload is corrupt");
    }

    /// Until its peer has proved itself, a reader refuses a message over its small limit at
    /// the header, without setting room aside for it; once the flag is set, the next message
    /// may be as large as any.
    #[tokio::test]
    async fn an_unproved_reader_refuses_large_messages_at_their_header() {
        let proved = Arc::new(AtomicBool::new(false));
        let reader = |rd| {
            WsReader::new(ChanRead::Boxed(Box::new(rd)), Role::Client, BytesMut::new(), false)
                .unproved(1024, proved.clone())
        };
        let big = ws::encode_frame(Opcode::Binary, &[5u8; 100_000], None);
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = reader(ours);
        peer.write_all(&ws::encode_frame(Opcode::Binary, &[1u8; 1000], None)).await.unwrap();
        assert!(matches!(r.next().await.unwrap(), Some(Message::Binary(b)) if b.len() == 1000));
        // Only the header and a little of the payload: the refusal comes without the rest.
        peer.write_all(&big[..100]).await.unwrap();
        let err = r.next().await.unwrap_err().to_string();
        assert!(err.contains("100000 bytes before the connection proved itself"), "{err}");
        assert!(r.buf.capacity() < 16 * 1024, "room was set aside: {}", r.buf.capacity());

        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = reader(ours);
        peer.write_all(&ws::encode_frame(Opcode::Binary, b"key", None)).await.unwrap();
        assert!(matches!(r.next().await.unwrap(), Some(Message::Binary(b)) if &b[..] == b"key"));
        proved.store(true, Ordering::Release);
        peer.write_all(&big).await.unwrap();
        assert!(matches!(r.next().await.unwrap(), Some(Message::Binary(b)) if b.len() == 100_000));
        assert!(r.unproved.is_none());
    }

    /// Between messages, a reader waiting on a quiet socket holds no buffer.
    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut r = WsReader::new(ChanRead::Boxed(Box::new(ours)), Role::Client, BytesMut::new(), false);
        let f = ws::encode_frame(Opcode::Binary, &[7u8; 3000], None);
        peer.write_all(&f).await.unwrap();
        match r.next().await.unwrap() {
            Some(Message::Binary(b)) => assert_eq!(&b[..], &[7u8; 3000][..]),
            other => panic!("expected the binary message, got {other:?}"),
        }
        // Nothing more to read: polled once, the read is pending and the buffer is gone.
        assert!(futures_util::FutureExt::now_or_never(r.next()).is_none(), "no message was sent");
        assert_eq!(r.buf.capacity(), 0, "an idle reader keeps a buffer");
        // And it still reads the next message, and the end of the stream.
        peer.write_all(&ws::encode_frame(Opcode::Binary, b"next", None)).await.unwrap();
        drop(peer);
        assert!(matches!(r.next().await.unwrap(), Some(Message::Binary(b)) if &b[..] == b"next"));
        assert!(r.next().await.unwrap().is_none());
    }
}

//! The channel's WebSocket I/O: a reader that holds no buffer while idle, and a writer task
//! that batches frames into vectored writes.
//!
//! Frames travel as complete WebSocket frames (`Bytes`) through two bounded queues: `ctrl`
//! (small control frames, always drained first) and `data` (stream data, the only queue a
//! producer waits on). The reader task never waits on either: when it must answer (a pong, a
//! reset) it uses `try_send` on `ctrl`, and a full `ctrl` queue means the peer floods us, which
//! closes the channel. That rule is what keeps two peers that both saturate their links from
//! deadlocking on each other.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use s4t_shared::tunnel::Frame;
use s4t_shared::tunnel::frame::{HEADER_LEN, header};
use s4t_shared::tunnel::ws::{self, Decoded, Decoder, MAX_HEADER, Message, Opcode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::Error;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Capacity of the control queue (frames). Overflowing it closes the channel.
pub(crate) const CTRL_QUEUE: usize = 1024;
/// Capacity of the data queue (frames of up to [`MAX_READ`] bytes each).
pub(crate) const DATA_QUEUE: usize = 64;
/// The most a stream reads from its TCP socket for one frame.
pub(crate) const MAX_READ: usize = 64 * 1024 - PREFIX;
/// Room in front of a payload for the WebSocket and tunnel headers.
pub(crate) const PREFIX: usize = MAX_HEADER + HEADER_LEN;
/// The largest message accepted on a channel: a full data frame plus headers.
pub(crate) const MAX_MESSAGE: usize = s4t_shared::tunnel::frame::MAX_DATA + 64;
/// Read size while a channel is quiet; reads grow to whole frames as soon as data flows.
const SMALL_READ: usize = 4 * 1024;
/// Frames written per vectored write at most.
const MAX_BATCH: usize = 64;

/// Reads whole messages. Between bursts it keeps at most a small buffer.
pub(crate) struct WsReader {
    rd: BoxRead,
    buf: BytesMut,
    dec: Decoder,
    big_reads: bool,
}

impl WsReader {
    pub(crate) fn new(rd: BoxRead, role: Role, leftover: BytesMut) -> WsReader {
        WsReader { rd, buf: leftover, dec: Decoder::new(role, MAX_MESSAGE), big_reads: false }
    }

    /// The next message; `Ok(None)` on a clean end of stream between messages.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, Error> {
        loop {
            let need = match self.dec.decode(&mut self.buf)? {
                Decoded::Message(m) => return Ok(Some(m)),
                Decoded::Need(n) => n,
            };
            if self.buf.is_empty() && self.buf.capacity() > 4 * SMALL_READ {
                // Quiet again: let the last burst's buffer go.
                self.buf = BytesMut::new();
            }
            let chunk = if self.big_reads { MAX_READ } else { SMALL_READ };
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
}

/// The sending side of a channel: builds WebSocket frames (masked when this is the client)
/// and queues them for the writer task.
#[derive(Clone)]
pub(crate) struct Outbound {
    ctrl: mpsc::Sender<Bytes>,
    data: mpsc::Sender<Bytes>,
    mask: bool,
}

/// The receiving ends, owned by the writer task.
pub(crate) struct OutboundRx {
    ctrl: mpsc::Receiver<Bytes>,
    data: mpsc::Receiver<Bytes>,
}

pub(crate) fn outbound(role: Role) -> (Outbound, OutboundRx) {
    let (ctrl, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let (data, data_rx) = mpsc::channel(DATA_QUEUE);
    (Outbound { ctrl, data, mask: role == Role::Client }, OutboundRx { ctrl: ctrl_rx, data: data_rx })
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
        self.ctrl.try_send(self.frame(f)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Protocol("control queue overflow: the peer floods us".into()),
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })
    }

    pub(crate) fn try_ctrl_raw(&self, b: Bytes) -> Result<(), Error> {
        self.ctrl.try_send(b).map_err(|_| Error::Protocol("control queue overflow: the peer floods us".into()))
    }

    /// Queues a control frame, waiting for room (only from tasks other than the reader).
    pub(crate) async fn ctrl(&self, f: &Frame) -> Result<(), Error> {
        self.ctrl.send(self.frame(f)).await.map_err(|_| Error::Closed)
    }

    /// Queues a ready-made frame on the data queue, waiting for room (backpressure).
    pub(crate) async fn data(&self, b: Bytes) -> Result<(), Error> {
        self.data.send(b).await.map_err(|_| Error::Closed)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.ctrl.is_closed()
    }

    /// Turns a buffer laid out as `[PREFIX bytes of room][payload]` into a complete frame of
    /// type `kind` for `id`, in place.
    pub(crate) fn seal(&self, mut buf: BytesMut, kind: u8, id: u32) -> Bytes {
        let payload_len = buf.len() - PREFIX;
        buf[MAX_HEADER..PREFIX].copy_from_slice(&header(kind, id));
        let mask = self.mask_key();
        let mut h = [0u8; MAX_HEADER];
        let n = ws::write_header(&mut h, true, Opcode::Binary, mask, HEADER_LEN + payload_len);
        buf[MAX_HEADER - n..MAX_HEADER].copy_from_slice(&h[MAX_HEADER - n..]);
        if let Some(m) = mask {
            ws::apply_mask(&mut buf[MAX_HEADER..], m);
        }
        buf.advance(MAX_HEADER - n);
        buf.freeze()
    }
}

/// A buffer with [`PREFIX`] bytes of room, ready to receive up to `cap` payload bytes.
pub(crate) fn payload_buf(cap: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(PREFIX + cap);
    b.resize(PREFIX, 0);
    b
}

/// Writes queued frames until both queues close or a write fails. Control frames go first;
/// data is taken only when no control frame waits, so an `Open` always precedes the data of
/// its stream.
pub(crate) async fn write_loop(mut wr: BoxWrite, mut rx: OutboundRx) -> Result<(), Error> {
    let mut batch: VecDeque<Bytes> = VecDeque::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            biased;
            Some(b) = rx.ctrl.recv() => b,
            Some(b) = rx.data.recv() => b,
            else => return Ok(()),
        };
        batch.push_back(first);
        while batch.len() < MAX_BATCH {
            match rx.ctrl.try_recv() {
                Ok(b) => batch.push_back(b),
                Err(_) => match rx.data.try_recv() {
                    Ok(b) => batch.push_back(b),
                    Err(_) => break,
                },
            }
        }
        write_batch(&mut wr, &mut batch).await.map_err(|e| Error::io("write to the tunnel channel", e))?;
        wr.flush().await.map_err(|e| Error::io("flush the tunnel channel", e))?;
    }
}

async fn write_batch(wr: &mut BoxWrite, batch: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    while !batch.is_empty() {
        let slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
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

/// Sends a WebSocket ping every `interval` while the channel lives.
pub(crate) async fn ping_loop(out: Outbound, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if out.try_ctrl_raw(out.ws_control(Opcode::Ping, b"ka")).is_err() {
            return;
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

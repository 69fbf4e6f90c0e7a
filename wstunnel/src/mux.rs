//! Streams multiplexed over one channel: the table of open streams, the reader task's dispatch
//! of stream frames, and the two pumps between a stream and its TCP socket.
//!
//! A channel may have **lanes**: extra connections, each with its own reader task and sink,
//! that share the channel's stream table. Every frame of a stream travels on its stream's lane
//! (the channel's own connection is lane 0), so a stream's data and its `Fin` stay in order;
//! the server opens each new stream on the lane with the fewest streams.
//!
//! Memory per stream is bounded by the flow-control window: the sender never has more than the
//! receiver's credit in flight, the receiver buffers at most that much per stream, and grants
//! more only as it drains to the socket. An idle stream holds no buffer at all (its pump waits
//! for socket readiness, then reads into a fresh buffer).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use s4t_shared::tunnel::Frame;
use s4t_shared::tunnel::frame::{T_DATA, code};
use s4t_shared::tunnel::window::{RecvWindow, SendWindow};
use s4t_shared::tunnel::ws::{Message, Opcode};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::io::{LargeData, MAX_READ, Next, Outbound, Sent, WsReader};
use crate::splice::Pipe;
use crate::stats::Counters;

/// Most bytes of a new connection read as it is accepted, to ride with its `Open`.
const FIRST_READ: usize = 4096;
/// Most pipes a channel's streams hold queued data in (two descriptors each). One stream's
/// window is 16 full frames, but a pipe holds what one splice brought, often part of a frame:
/// with 16 pipes 9 % of a bulk transfer still went through memory, with 64 none. Beyond,
/// queued data is read into memory.
const MAX_QUEUED_PIPES: usize = 64;

/// Queued payloads shorter than this are copied out of the buffer they were read into, which
/// a slice of them would keep whole (a read buffer holds up to a largest message, 256 KiB): a
/// peer sending tiny frames to a stream whose socket is full would otherwise make the channel
/// hold a read buffer per byte counted. A payload left uncopied pins at most a few times its
/// size. Large frames, the bulk of a transfer, are never copied.
const COPY_BELOW: usize = 64 * 1024;
/// Smallest buffer small payloads are copied into: a stream's next small payloads are copied
/// in behind, so tiny frames cost a few bytes each, not a chunk each.
const COPY_CHUNK: usize = 4096;
/// What a queued chunk costs against the channel's budget besides its bytes: its slot in the
/// inbox and its bookkeeping.
const CHUNK_OVERHEAD: usize = 64;

/// A stream that has moved this many bytes (either way) is a bulk stream: new streams avoid
/// its lane. An interactive session moves far less in its first minutes.
pub(crate) const BULK: usize = 1 << 20;

/// The streams of one channel.
pub(crate) struct Mux {
    /// The channel's own connection (lane 0's sink), for channel-wide frames.
    pub(crate) out: Outbound,
    /// Lane 0, then the lanes that joined.
    lanes: Mutex<Vec<Arc<Lane>>>,
    streams: Mutex<HashMap<u32, Arc<Stream>>>,
    /// Initial credit in both directions (from `Welcome`).
    window: u32,
    max_streams: usize,
    next_id: AtomicU32,
    /// Streams entered so far (idle lanes retire when it stops moving).
    opened: AtomicUsize,
    /// Packet channels open (they travel on lane 0, and keep the lanes up).
    packets: AtomicUsize,
    /// Cancelled when the channel dies: every stream dies with it.
    pub(crate) cancel: CancellationToken,
    /// The server's (or client's) traffic counters.
    counters: Arc<Counters>,
    /// Bytes held for all streams of this channel whose sockets could not take them yet, as
    /// charged by [`Chunk::cost`].
    buffered: AtomicUsize,
    /// Most bytes the channel holds that way: beyond, the stream holding the most is reset
    /// (its reader has stalled the longest). Each stream stays within its window as well.
    budget: usize,
    /// Pipes queued in the streams' inboxes ([`Piped`]).
    pipes: Arc<AtomicUsize>,
}

/// One connection of a channel: the channel's own (lane 0) or a lane that joined it.
pub(crate) struct Lane {
    pub(crate) out: Outbound,
    /// Streams on this lane.
    streams: AtomicUsize,
    /// Streams on this lane that have moved at least [`BULK`] bytes.
    bulk: AtomicUsize,
    /// Cancelled when this lane's connection dies (or the channel does): its streams die
    /// with it.
    pub(crate) dead: CancellationToken,
}

impl Lane {
    fn new(out: Outbound, channel: &CancellationToken) -> Lane {
        let (streams, bulk) = (AtomicUsize::new(0), AtomicUsize::new(0));
        Lane { out, streams, bulk, dead: channel.child_token() }
    }
}

pub(crate) struct Stream {
    pub(crate) id: u32,
    /// The lane all of this stream's frames travel on.
    lane: Arc<Lane>,
    /// Payload bytes moved either way, counted up to [`BULK`].
    moved: AtomicUsize,
    /// Counted in its lane's `bulk` (set under the stream table's lock).
    bulk: AtomicBool,
    /// The local socket, once connected. Shared: the reader task writes to it directly when
    /// nothing is queued (saving a task hop per frame), the pumps do the rest.
    tcp: OnceLock<Arc<TcpStream>>,
    state: Mutex<StreamState>,
    /// Inbox got data, a FIN, or the stream died.
    readable: Notify,
    /// Credit arrived.
    writable: Notify,
    /// Cancelled on reset (either side) and when its lane or the channel dies.
    pub(crate) dead: CancellationToken,
}

struct StreamState {
    inbox: VecDeque<Chunk>,
    /// The down pump holds chunks taken from the inbox and is writing them: the reader task
    /// must queue behind them rather than write directly.
    writing: bool,
    /// What the inbox and the chunks the down pump is writing cost ([`Chunk::cost`], counted
    /// in `Mux::buffered`).
    held: usize,
    /// Credit to grant that the reader task could not queue; the down pump sends it.
    pending_window: u32,
    fin_in: bool,
    recv: RecvWindow,
    send: SendWindow,
}

impl StreamState {
    /// Nothing is queued ahead of new data (and no FIN came): the reader task may write it
    /// straight to the socket.
    fn writes_directly(&self) -> bool {
        self.inbox.is_empty() && !self.writing && !self.fin_in
    }

    /// Queues a copy of the small payload `b`: behind the last chunk if that is a copy with
    /// room, else in a new copy. Returns the cost added.
    fn copy_in(&mut self, b: &[u8]) -> usize {
        if let Some(Chunk::Copied(v)) = self.inbox.back_mut()
            && v.capacity() - v.len() >= b.len()
        {
            // Within its capacity: no reallocation, so its cost stays what was charged.
            v.extend_from_slice(b);
            return 0;
        }
        let mut v = Vec::with_capacity(b.len().max(COPY_CHUNK));
        v.extend_from_slice(b);
        let c = Chunk::Copied(v);
        let cost = c.cost();
        self.inbox.push_back(c);
        cost
    }
}

/// Data a stream's down pump has yet to write.
enum Chunk {
    /// A slice of the buffer it was read into (a large payload).
    Mem(Bytes),
    /// Small payloads copied out of their read buffers ([`COPY_BELOW`]).
    Copied(Vec<u8>),
    /// Spliced from the channel's socket while the stream's socket was full or had data
    /// queued ahead: it waits in the kernel, never copied through user space.
    Piped(Piped),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Mem(b) => b.len(),
            Chunk::Copied(v) => v.len(),
            Chunk::Piped(p) => p.len,
        }
    }

    /// What it costs against the channel's budget: the memory it holds (a copy's whole
    /// capacity) and its bookkeeping. Fixed once it left the inbox.
    fn cost(&self) -> usize {
        CHUNK_OVERHEAD
            + match self {
                Chunk::Copied(v) => v.capacity(),
                c => c.len(),
            }
    }
}

/// A pipe holding a stream's next `len` bytes, counted in its channel's pipes until dropped.
struct Piped {
    pipe: Pipe,
    len: usize,
    count: Arc<AtomicUsize>,
}

impl Drop for Piped {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a stream ended when it did not end cleanly.
#[derive(Debug)]
enum End {
    /// Reset by the peer, or the channel died: nothing to tell the peer.
    Gone,
    /// A local failure: the peer gets a `Reset` with this code.
    Local(u16),
}

impl Mux {
    pub(crate) fn new(
        out: Outbound,
        window: u32,
        max_streams: usize,
        cancel: CancellationToken,
        counters: Arc<Counters>,
        budget: usize,
    ) -> Mux {
        let streams = Mutex::new(HashMap::new());
        let (buffered, pipes) = (AtomicUsize::new(0), Arc::default());
        let next_id = AtomicU32::new(1);
        let main = Arc::new(Lane::new(out.clone(), &cancel));
        let lanes = Mutex::new(vec![main]);
        let (opened, packets) = (AtomicUsize::new(0), AtomicUsize::new(0));
        Mux {
            out,
            lanes,
            streams,
            window,
            max_streams,
            next_id,
            opened,
            packets,
            cancel,
            counters,
            buffered,
            budget,
            pipes,
        }
    }

    /// Lane 0: the channel's own connection.
    pub(crate) fn main_lane(&self) -> Arc<Lane> {
        self.lanes.lock().expect("lanes")[0].clone()
    }

    /// A lane joins, writing to `out`; `None` when the channel has `max` lanes already (or is
    /// dead).
    pub(crate) fn add_lane(&self, out: Outbound, max: usize) -> Option<Arc<Lane>> {
        let mut lanes = self.lanes.lock().expect("lanes");
        if lanes.len() > max || self.cancel.is_cancelled() {
            return None;
        }
        let lane = Arc::new(Lane::new(out, &self.cancel));
        lanes.push(lane.clone());
        Some(lane)
    }

    /// A lane's connection died: its streams die with it (each end finds its own lane dead;
    /// neither sends a `Reset`), and no new stream goes on it.
    pub(crate) fn drop_lane(&self, lane: &Arc<Lane>) {
        lane.dead.cancel();
        self.lanes.lock().expect("lanes").retain(|l| !Arc::ptr_eq(l, lane));
    }

    /// Streams entered so far.
    pub(crate) fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// Whether the channel has no stream and no packet channel now.
    pub(crate) fn is_idle(&self) -> bool {
        self.idle_with(&self.streams.lock().expect("stream table"))
    }

    /// [`is_idle`](Self::is_idle), the stream table `t` being locked already.
    fn idle_with(&self, t: &HashMap<u32, Arc<Stream>>) -> bool {
        t.is_empty() && self.packets.load(Ordering::Relaxed) == 0
    }

    /// A packet channel opened on this channel (`+1`) or closed (`-1`). Packets travel on
    /// lane 0, which new streams then avoid, and the lanes stay up while any is open.
    /// Also counted in the operator's `packet_channels_open`.
    pub(crate) fn packet_channels_changed(&self, opened: bool) {
        if opened {
            self.packets.fetch_add(1, Ordering::Relaxed);
            Counters::add(&self.counters.packet_channels_opened, 1);
        } else if self.packets.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
            Counters::add(&self.counters.packet_channels_closed, 1);
        }
    }

    /// Server side: takes `lane` out of the lanes new streams may go on, if the channel has no
    /// stream nor packet channel and none was entered since `*seen` streams had been (which
    /// it then updates).
    /// Checked under the stream table's lock, which [`open_stream`](Self::open_stream) holds
    /// while it picks a lane: no stream can be opened on a lane retired this way.
    pub(crate) fn retire_if_idle(&self, lane: &Arc<Lane>, seen: &mut usize) -> bool {
        let t = self.streams.lock().expect("stream table");
        let opened = self.opened.load(Ordering::Relaxed);
        let idle = self.idle_with(&t) && opened == *seen;
        *seen = opened;
        if idle {
            self.lanes.lock().expect("lanes").retain(|l| !Arc::ptr_eq(l, lane));
        }
        idle
    }

    /// Enters a new stream in the table `t`, on `lane`.
    fn insert(&self, t: &mut HashMap<u32, Arc<Stream>>, id: u32, lane: Arc<Lane>) -> Arc<Stream> {
        lane.streams.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        let s = self.make(id, lane);
        t.insert(id, s.clone());
        Counters::add(&self.counters.streams_opened, 1);
        s
    }

    fn make(&self, id: u32, lane: Arc<Lane>) -> Arc<Stream> {
        let dead = lane.dead.child_token();
        Arc::new(Stream {
            id,
            lane,
            moved: AtomicUsize::new(0),
            bulk: AtomicBool::new(false),
            tcp: OnceLock::new(),
            state: Mutex::new(StreamState {
                inbox: VecDeque::new(),
                writing: false,
                held: 0,
                pending_window: 0,
                fin_in: false,
                recv: RecvWindow::new(self.window),
                send: SendWindow::new(self.window),
            }),
            readable: Notify::new(),
            writable: Notify::new(),
            dead,
        })
    }

    /// Server side: a new stream with a fresh id, on the least busy lane, or `None` at the
    /// stream limit. Least busy: the fewest bulk streams (and packet channels, on lane 0), then
    /// the fewest streams; the first such (lane 0 while the others are as busy). So a new
    /// connection, an interactive session most likely, does not queue behind a transfer.
    pub(crate) fn open_stream(&self) -> Option<Arc<Stream>> {
        let mut t = self.streams.lock().expect("stream table");
        if t.len() >= self.max_streams {
            return None;
        }
        let lane = {
            let lanes = self.lanes.lock().expect("lanes");
            let packets = self.packets.load(Ordering::Relaxed);
            let load = |(i, l): (usize, &Arc<Lane>)| {
                let heavy = l.bulk.load(Ordering::Relaxed) + if i == 0 { packets } else { 0 };
                (heavy, l.streams.load(Ordering::Relaxed))
            };
            let live = lanes.iter().enumerate().filter(|(_, l)| !l.dead.is_cancelled());
            let least = live.min_by_key(|&il| load(il)).map(|(_, l)| l);
            least.unwrap_or(&lanes[0]).clone()
        };
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !t.contains_key(&id) {
                return Some(self.insert(&mut t, id, lane));
            }
        }
    }

    /// Server side: tells the peer about stream `s` with `open`, carrying in the same write
    /// the first bytes the user has already sent (a request, a client banner: they usually
    /// arrive with the connection). The board then learns of the stream and gets its first
    /// data in one wake-up instead of two. Reads past tokio's readiness (a fresh socket's is
    /// not known before the next poll of the driver), at most [`FIRST_READ`] bytes.
    pub(crate) async fn announce(&self, s: &Stream, open: &Frame, tcp: &TcpStream) -> Result<(), Error> {
        let mut first = [0u8; FIRST_READ];
        let credit = s.state.lock().expect("stream state").send.take(FIRST_READ);
        // Errors and EOF are left for the up pump to find again.
        let n = std::io::Read::read(&mut &*socket2::SockRef::from(tcp), &mut first[..credit]).unwrap_or(0);
        give_back(s, credit - n);
        let out = &s.lane.out;
        let mut sink = out.lock().await?;
        sink.push(out.frame(open));
        if n > 0 {
            let payload = Bytes::copy_from_slice(&first[..n]);
            sink.push(out.frame(&Frame::Data { stream: s.id, payload }));
            Counters::add(&self.counters.bytes_sent, n as u64);
        }
        sink.flush().await
    }

    /// Client side: registers a stream the server opened on `lane`, so that data sent right
    /// after the `Open` is buffered (within the window) while the local connect runs.
    pub(crate) fn accept_stream(&self, id: u32, lane: &Arc<Lane>) -> Result<Arc<Stream>, u16> {
        let mut t = self.streams.lock().expect("stream table");
        if t.contains_key(&id) || id == 0 {
            return Err(code::PROTOCOL);
        }
        if t.len() >= self.max_streams {
            return Err(code::LIMIT);
        }
        Ok(self.insert(&mut t, id, lane.clone()))
    }

    fn remove(&self, id: u32) -> Option<Arc<Stream>> {
        let removed = self.streams.lock().expect("stream table").remove(&id);
        if let Some(s) = &removed {
            s.dead.cancel();
            s.lane.streams.fetch_sub(1, Ordering::Relaxed);
            if s.bulk.load(Ordering::Relaxed) {
                s.lane.bulk.fetch_sub(1, Ordering::Relaxed);
            }
            Counters::add(&self.counters.streams_closed, 1);
            // What it queued goes now (its pipes closed and uncounted), not when the last
            // holder of the stream lets go: a stream whose local connect is still running
            // would hold it, uncounted, until the connect ended.
            let mut st = s.state.lock().expect("stream state");
            st.inbox.clear();
            self.buffered.fetch_sub(std::mem::take(&mut st.held), Ordering::Relaxed);
        }
        removed
    }

    /// Resets a stream from this side: tells the peer (on the stream's lane, or on the channel
    /// for a stream never entered) and drops it. Never waits, and the peer is always told
    /// ([`Outbound::reset`]), unless it reads nothing: the channel is then closed.
    pub(crate) fn reset(&self, id: u32, code: u16) {
        let out = self.remove(id).map(|s| s.lane.out.clone()).unwrap_or_else(|| self.out.clone());
        if let Err(e @ Error::Protocol(_)) = out.reset(id, code, self.max_streams) {
            tracing::warn!(cause = %e, "channel closed");
            self.cancel.cancel();
        }
    }

    /// Counts `n` payload bytes moved by `s`; the first time it reaches [`BULK`], it counts in
    /// its lane's bulk streams (under the table's lock, so that [`remove`](Self::remove) takes
    /// it out again exactly once).
    fn moved(&self, s: &Arc<Stream>, n: usize) {
        if n == 0 || s.bulk.load(Ordering::Relaxed) {
            return;
        }
        let before = s.moved.fetch_add(n, Ordering::Relaxed);
        if before < BULK && before.saturating_add(n) >= BULK {
            let t = self.streams.lock().expect("stream table");
            if t.get(&s.id).is_some_and(|e| Arc::ptr_eq(e, s)) && !s.bulk.swap(true, Ordering::Relaxed) {
                s.lane.bulk.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn get(&self, id: u32) -> Option<Arc<Stream>> {
        self.streams.lock().expect("stream table").get(&id).cloned()
    }

    /// Applies a stream frame received from the peer. Never waits. Frames for unknown streams
    /// are dropped: they are in flight after a reset.
    pub(crate) fn on_frame(&self, f: Frame) -> Result<(), Error> {
        match f {
            Frame::Data { stream, payload } => {
                let Some(s) = self.get(stream) else { return Ok(()) };
                self.on_data(&s, payload);
            }
            Frame::Fin { stream } => {
                if let Some(s) = self.get(stream) {
                    s.state.lock().expect("stream state").fin_in = true;
                    s.readable.notify_one();
                }
            }
            Frame::Reset { stream, code } => {
                tracing::debug!(stream, code, "stream reset by the peer");
                self.remove(stream);
            }
            Frame::Window { stream, increment } => {
                let Some(s) = self.get(stream) else { return Ok(()) };
                let ok = s.state.lock().expect("stream state").send.on_window(increment).is_ok();
                if ok {
                    s.writable.notify_one();
                } else {
                    self.reset(stream, code::PROTOCOL);
                }
            }
            other => return Err(Error::Protocol(format!("not a stream frame: {other:?}"))),
        }
        Ok(())
    }
}

impl Mux {
    fn on_data(&self, s: &Arc<Stream>, payload: Bytes) {
        if self.admit(s, payload.len()) {
            self.deliver(s, payload);
        }
    }

    /// Counts `len` bytes in against the stream's window; resets the stream on an overrun.
    fn admit(&self, s: &Arc<Stream>, len: usize) -> bool {
        let res = s.state.lock().expect("stream state").recv.on_data(len);
        Counters::add(&self.counters.bytes_received, len as u64);
        self.moved(s, len);
        if let Err(e) = res {
            tracing::warn!(stream = s.id, cause = %e, "peer overran the stream window: reset");
            self.reset(s.id, code::PROTOCOL);
        }
        res.is_ok()
    }

    /// The channel's next message, after delivering the large data frames that come before
    /// it ([`on_large_data`](Self::on_large_data)); `None` at the end of the stream. Fails
    /// when `idle` passes without a message or a frame's progress.
    pub(crate) async fn next_message(&self, reader: &mut WsReader, idle: Duration) -> Result<Option<Message>, Error> {
        let stalled = |_| Error::Timeout(format!("nothing received for {idle:?}"));
        loop {
            match tokio::time::timeout(idle, reader.next_data()).await.map_err(stalled)?? {
                Some(Next::Data(d)) => {
                    tokio::time::timeout(idle, self.on_large_data(reader, d)).await.map_err(stalled)??
                }
                Some(Next::Message(m)) => return Ok(Some(m)),
                None => return Ok(None),
            }
        }
    }

    /// Delivers a large data frame whose payload is still mostly in the channel's socket
    /// ([`WsReader::next_data`]): spliced socket → pipe → the stream's socket while nothing
    /// is queued ahead of it (no copy through user space); what the stream's socket cannot
    /// take, or what has data queued ahead of it, waits in its pipe in the stream's inbox
    /// (read into memory instead beyond [`MAX_QUEUED_PIPES`]); dropped for a stream that is
    /// gone. Takes exactly the frame's bytes from `reader`, whatever happens to the stream.
    pub(crate) async fn on_large_data(&self, reader: &mut WsReader, d: LargeData) -> Result<(), Error> {
        let LargeData { stream, head, mut rest } = d;
        let mut target = self.get(stream).filter(|s| self.admit(s, head.len() + rest));
        if let Some(s) = &target
            && !head.is_empty()
        {
            self.deliver(s, head);
        }
        while rest > 0 {
            let want = rest.min(MAX_READ);
            let Some(s) = target.as_ref().filter(|s| !s.dead.is_cancelled()) else {
                rest -= reader.read_some(want).await?.len();
                continue;
            };
            let tcp = s.tcp.get().filter(|_| s.state.lock().expect("stream state").writes_directly());
            let may_queue_a_pipe = self.pipes.load(Ordering::Relaxed) < MAX_QUEUED_PIPES;
            let spliced = if tcp.is_some() || may_queue_a_pipe { reader.splice_in(want).await? } else { None };
            let Some(k) = spliced else {
                let b = reader.read_some(want).await?;
                rest -= b.len();
                self.deliver(s, b);
                continue;
            };
            rest -= k;
            let j = match tcp.map(|tcp| reader.pipe_to(tcp, k)) {
                None => 0,
                Some(Ok(j)) => j,
                Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Some(Err(_)) => {
                    // The stream's socket failed: its bytes go with the pipe.
                    drop(reader.take_pipe()?);
                    self.reset(s.id, code::IO);
                    target = None;
                    continue;
                }
            };
            let mut st = s.state.lock().expect("stream state");
            self.drained_directly(s, &mut st, j);
            if j < k {
                // The rest waits in its inbox, in the pipe; the reader makes another.
                let pipe = reader.take_pipe()?;
                self.pipes.fetch_add(1, Ordering::Relaxed);
                let piped = Piped { pipe, len: k - j, count: self.pipes.clone() };
                self.queue(s, st, Chunk::Piped(piped));
            }
        }
        Ok(())
    }

    /// Counts `n` bytes the reader task wrote straight to the stream's socket, and grants the
    /// peer credit when it is time: queued without waiting, or left to the down pump when the
    /// control queue is full (the reader task never waits).
    fn drained_directly(&self, s: &Stream, st: &mut StreamState, n: usize) {
        if let Some(increment) = st.recv.on_drained(n)
            && s.lane.out.try_ctrl(&Frame::Window { stream: s.id, increment }).is_err()
        {
            st.pending_window += increment;
            s.readable.notify_one();
        }
    }

    /// Writes `payload` to the stream's socket now if nothing is queued ahead of it and the
    /// socket has room; queues the rest for the down pump.
    fn deliver(&self, s: &Stream, payload: Bytes) {
        let mut st = s.state.lock().expect("stream state");
        let mut rest = payload;
        // Fast path: nothing queued ahead, so write straight to the socket without waiting.
        if st.writes_directly()
            && let Some(tcp) = s.tcp.get()
        {
            match tcp.try_write(&rest) {
                Ok(n) => {
                    let _ = rest.split_to(n);
                    self.drained_directly(s, &mut st, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    drop(st);
                    self.reset(s.id, code::IO);
                    return;
                }
            }
        }
        if !rest.is_empty() {
            self.queue(s, st, Chunk::Mem(rest));
        }
    }

    /// Queues `b` for the stream's down pump, counted against the channel's budget; small
    /// payloads are copied ([`COPY_BELOW`]). Dropped for a dead stream.
    fn queue(&self, s: &Stream, mut st: std::sync::MutexGuard<'_, StreamState>, b: Chunk) {
        // `remove` cancels `dead`, then gives back what the stream holds under this lock:
        // bytes queued after that (the reader task got the stream before waiting in a splice
        // or a read) would be counted for good, and the channel would shed streams at random.
        if s.dead.is_cancelled() {
            return;
        }
        let cost = match b {
            Chunk::Mem(b) if b.len() < COPY_BELOW => st.copy_in(&b),
            b => {
                let cost = b.cost();
                st.inbox.push_back(b);
                cost
            }
        };
        st.held += cost;
        let total = self.buffered.fetch_add(cost, Ordering::Relaxed) + cost;
        drop(st);
        s.readable.notify_one();
        if total > self.budget {
            self.shed();
        }
    }

    /// The channel holds more than its budget for streams whose sockets do not take their
    /// data: resets the stream holding the most, whose reader has stalled the longest.
    fn shed(&self) {
        let victim = {
            let t = self.streams.lock().expect("stream table");
            t.values().map(|s| (s.state.lock().expect("stream state").held, s.id)).max()
        };
        if let Some((held, id)) = victim {
            tracing::warn!(stream = id, held, budget = self.budget, "channel over its buffer budget: stream reset");
            self.reset(id, code::LIMIT);
        }
    }

    /// The down pump wrote a queued chunk that cost `n`.
    fn written(&self, s: &Stream, n: usize) {
        let mut st = s.state.lock().expect("stream state");
        // A stream removed meanwhile has given its bytes back already.
        let n = n.min(st.held);
        st.held -= n;
        self.buffered.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Pumps bytes both ways between `tcp` and stream `s` until both directions have ended (or
/// the stream is reset), then removes it from the table.
pub(crate) async fn run_stream(mux: Arc<Mux>, s: Arc<Stream>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let tcp = Arc::new(tcp);
    let _ = s.tcp.set(tcp.clone());
    let res = tokio::try_join!(up(&mux, &s, &tcp), down(&mux, &s, &tcp));
    match res {
        Ok(_) | Err(End::Gone) => drop(mux.remove(s.id)),
        Err(End::Local(code)) => mux.reset(s.id, code),
    }
}

/// Reads a lane that joined the channel until it ends: stream frames go to the stream table,
/// pings are answered, any other frame goes to `other` (the board's `Open`), whose error ends
/// the lane, as does a malformed frame. Fails when `idle` passes without a message.
pub(crate) async fn read_lane(
    mux: &Mux,
    lane: &Lane,
    reader: &mut WsReader,
    idle: Duration,
    mut other: impl FnMut(Frame) -> Result<(), Error>,
) -> Result<(), Error> {
    loop {
        let msg = tokio::select! {
            m = mux.next_message(reader, idle) => m?,
            _ = lane.dead.cancelled() => return Err(Error::Closed),
        };
        match msg {
            None | Some(Message::Close(_)) => return Ok(()),
            Some(Message::Binary(b)) => match Frame::decode(&b)? {
                f @ (Frame::Data { .. } | Frame::Fin { .. } | Frame::Reset { .. } | Frame::Window { .. }) => {
                    mux.on_frame(f)?
                }
                f => other(f)?,
            },
            Some(Message::Ping(p)) => lane.out.try_ctrl_raw(lane.out.ws_control(Opcode::Pong, &p))?,
            Some(Message::Pong(_)) => {}
            Some(Message::Text(_)) => return Err(Error::Protocol("text message on a tunnel lane".into())),
        }
    }
}

/// TCP → channel: waits for credit, then for readability, then takes the channel's sink and
/// reads straight into its frame buffer, which it writes out as one frame.
async fn up(mux: &Mux, s: &Arc<Stream>, tcp: &TcpStream) -> Result<(), End> {
    let mut bulk = false;
    loop {
        let credit = wait_credit(s).await?;
        tokio::select! {
            r = tcp.readable() => r.map_err(|_| End::Local(code::IO))?,
            _ = s.dead.cancelled() => return Err(End::Gone),
        }
        let mut sink = tokio::select! {
            g = s.lane.out.lock() => g.map_err(|_| End::Gone)?,
            _ = s.dead.cancelled() => return Err(End::Gone),
        };
        // Not cancelled by a reset of this stream: a frame half written stays in the sink.
        let res = sink.send_from(tcp, credit, T_DATA, s.id, &mut bulk).await;
        let used = match &res {
            Ok(Sent::Data(n)) => *n,
            _ => 0,
        };
        Counters::add(&mux.counters.bytes_sent, used as u64);
        mux.moved(s, used);
        if used < credit {
            give_back(s, credit - used);
        }
        match res {
            Ok(Sent::Data(_)) | Ok(Sent::WouldBlock) => {}
            Ok(Sent::Eof) => {
                sink.push(s.lane.out.frame(&Frame::Fin { stream: s.id }));
                sink.flush().await.map_err(|_| End::Gone)?;
                return Ok(());
            }
            Ok(Sent::ReadFailed) => return Err(End::Local(code::IO)),
            Err(_) => return Err(End::Gone),
        }
    }
}

async fn wait_credit(s: &Stream) -> Result<usize, End> {
    loop {
        let n = s.state.lock().expect("stream state").send.take(crate::io::BATCH * MAX_READ);
        if n > 0 {
            return Ok(n);
        }
        tokio::select! {
            _ = s.writable.notified() => {}
            _ = s.dead.cancelled() => return Err(End::Gone),
        }
    }
}

fn give_back(s: &Stream, n: usize) {
    // Cannot overflow: it is credit taken a moment ago.
    let _ = s.state.lock().expect("stream state").send.on_window(n as u32);
}

enum Inbound {
    Data(VecDeque<Chunk>),
    Fin,
    Window(u32),
}

/// Channel → TCP: drains what the reader task could not write directly, and grants credit
/// back as it goes.
async fn down(mux: &Mux, s: &Stream, tcp: &TcpStream) -> Result<(), End> {
    loop {
        match wait_inbox(s).await? {
            Inbound::Fin => {
                let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Inbound::Window(increment) => {
                s.lane.out.ctrl(&Frame::Window { stream: s.id, increment }).await.map_err(|_| End::Gone)?;
            }
            Inbound::Data(chunks) => {
                let mut total = 0;
                for c in chunks {
                    total += c.len();
                    let w = async {
                        match &c {
                            Chunk::Mem(b) => write_all(tcp, b).await,
                            Chunk::Copied(v) => write_all(tcp, v).await,
                            Chunk::Piped(p) => drain_all(tcp, p).await,
                        }
                    };
                    tokio::select! {
                        r = w => r.map_err(|_| End::Local(code::IO))?,
                        _ = s.dead.cancelled() => return Err(End::Gone),
                    }
                    mux.written(s, c.cost());
                }
                let inc = {
                    let mut st = s.state.lock().expect("stream state");
                    st.writing = false;
                    st.recv.on_drained(total)
                };
                if let Some(increment) = inc {
                    s.lane.out.ctrl(&Frame::Window { stream: s.id, increment }).await.map_err(|_| End::Gone)?;
                }
            }
        }
    }
}

async fn write_all(tcp: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn drain_all(tcp: &TcpStream, p: &Piped) -> std::io::Result<()> {
    let mut left = p.len;
    while left > 0 {
        match p.pipe.drain_into(tcp, left).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => left -= n,
        }
    }
    Ok(())
}

async fn wait_inbox(s: &Stream) -> Result<Inbound, End> {
    loop {
        {
            let mut st = s.state.lock().expect("stream state");
            if st.pending_window > 0 {
                return Ok(Inbound::Window(std::mem::take(&mut st.pending_window)));
            }
            if !st.inbox.is_empty() {
                st.writing = true;
                return Ok(Inbound::Data(std::mem::take(&mut st.inbox)));
            }
            if st.fin_in {
                return Ok(Inbound::Fin);
            }
        }
        tokio::select! {
            _ = s.readable.notified() => {}
            _ = s.dead.cancelled() => return Err(End::Gone),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{ChanRead, outbound, tcp_pair};
    use bytes::BytesMut;
    use s4t_shared::tunnel::ws::{self, Opcode, Role};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn data_frame(stream: u32, payload: &[u8]) -> Bytes {
        ws::encode_frame(
            Opcode::Binary,
            &Frame::Data { stream, payload: Bytes::copy_from_slice(payload) }.encode(),
            None,
        )
    }

    /// The next frame `reader` reads (within 10 s).
    async fn next_frame(reader: &mut WsReader) -> Frame {
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(m) => match m.unwrap() {
                Some(Message::Binary(b)) => Frame::decode(&b).unwrap(),
                other => panic!("expected a frame, got {other:?}"),
            },
            Err(_) => panic!("no frame came"),
        }
    }

    /// What the user sent before the connection was announced rides in the same write as
    /// `Open`, and costs the stream that much credit; with nothing sent, only `Open` goes.
    #[tokio::test]
    async fn the_first_bytes_ride_with_open() {
        let (sink_end, peer) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        let window = 1 << 20;
        let mux = Mux::new(out, window, 8, CancellationToken::new(), Arc::default(), usize::MAX);
        let mut reader = WsReader::new(ChanRead::Tcp(peer.into_split().0), Role::Client, BytesMut::new(), false);
        let (mut user, accepted) = tcp_pair().await;
        user.write_all(b"SSH-2.0-client\r\n").await.unwrap();
        accepted.readable().await.unwrap();
        let s = mux.open_stream().unwrap();
        mux.announce(&s, &Frame::Open { stream: s.id, listener: 3, peer: "u".into() }, &accepted).await.unwrap();
        assert!(matches!(next_frame(&mut reader).await, Frame::Open { stream, listener: 3, .. } if stream == s.id));
        match next_frame(&mut reader).await {
            Frame::Data { stream, payload } => assert!(stream == s.id && payload == b"SSH-2.0-client\r\n"[..]),
            f => panic!("expected the user's first bytes, got {f:?}"),
        }
        assert_eq!(s.state.lock().unwrap().send.credit(), u64::from(window) - 16);

        let (_quiet_user, accepted) = tcp_pair().await;
        let s2 = mux.open_stream().unwrap();
        mux.announce(&s2, &Frame::Open { stream: s2.id, listener: 3, peer: "u".into() }, &accepted).await.unwrap();
        mux.out.try_ctrl(&Frame::Fin { stream: 99 }).unwrap();
        mux.out.lock().await.unwrap().flush().await.unwrap();
        assert!(matches!(next_frame(&mut reader).await, Frame::Open { stream, .. } if stream == s2.id));
        assert!(matches!(next_frame(&mut reader).await, Frame::Fin { stream: 99 }), "no data frame for a quiet user");
        assert_eq!(s2.state.lock().unwrap().send.credit(), u64::from(window));
    }

    /// A reset is never lost for a full control queue: it follows what the queue holds (the
    /// peer would otherwise keep the stream, its task and its socket until the channel died).
    /// A channel that owes more resets than it may have streams (its peer reads nothing) is
    /// closed.
    #[tokio::test]
    async fn a_reset_is_sent_even_when_the_control_queue_is_full() {
        let (sink_end, peer) = tcp_pair().await;
        // The writer task is not running: nothing drains the queue.
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        let mux = Mux::new(out, 1 << 20, 8, CancellationToken::new(), Arc::default(), usize::MAX);
        let mut queued = 0;
        while mux.out.try_ctrl(&Frame::Fin { stream: 99 }).is_ok() {
            queued += 1;
        }
        let s = mux.open_stream().unwrap();
        mux.reset(s.id, code::IO);
        assert!(mux.get(s.id).is_none() && !mux.cancel.is_cancelled());
        mux.out.lock().await.unwrap().flush().await.unwrap();
        // A marker after everything that was queued or owed.
        mux.out.try_ctrl(&Frame::Fin { stream: 7 }).unwrap();
        mux.out.lock().await.unwrap().flush().await.unwrap();
        let mut reader = WsReader::new(ChanRead::Tcp(peer.into_split().0), Role::Client, BytesMut::new(), false);
        for _ in 0..queued {
            assert!(matches!(next_frame(&mut reader).await, Frame::Fin { stream: 99 }));
        }
        match next_frame(&mut reader).await {
            Frame::Reset { stream, code: code::IO } if stream == s.id => {}
            f => panic!("expected the Reset of stream {} after the queued frames, got {f:?}", s.id),
        }
        assert!(matches!(next_frame(&mut reader).await, Frame::Fin { stream: 7 }));

        // A peer that reads nothing is owed at most as many resets as the channel may have
        // streams.
        for _ in 0..queued {
            mux.out.try_ctrl(&Frame::Fin { stream: 99 }).unwrap();
        }
        for id in 0..8 {
            mux.reset(1000 + id, code::IO);
        }
        assert!(!mux.cancel.is_cancelled() && !mux.out.is_closed(), "closed within the limit");
        mux.reset(2000, code::IO);
        assert!(mux.cancel.is_cancelled() && mux.out.is_closed(), "a channel owing too many resets stays open");
    }

    /// A channel whose streams' sockets stop taking data holds at most its budget: the
    /// stream holding the most is reset, the others keep their data.
    #[tokio::test]
    async fn a_channel_over_its_budget_resets_the_stream_holding_the_most() {
        let (sink_end, _keep) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        let budget = 1 << 20;
        let mux = Arc::new(Mux::new(out, 4 << 20, 8, CancellationToken::new(), Arc::default(), budget));
        let mut readers_that_never_read = Vec::new();
        for id in 1..=3 {
            let s = mux.accept_stream(id, &mux.main_lane()).unwrap();
            let (local, peer) = tcp_pair().await;
            socket2::SockRef::from(&peer).set_recv_buffer_size(4096).unwrap();
            socket2::SockRef::from(&local).set_send_buffer_size(4096).unwrap();
            tokio::spawn(run_stream(mux.clone(), s, local));
            readers_that_never_read.push(peer);
        }
        for (stream, n) in [(1, 400_000), (2, 700_000), (3, 300_000)] {
            mux.on_frame(Frame::Data { stream, payload: Bytes::from(vec![7u8; n]) }).unwrap();
        }
        assert!(mux.get(2).is_none(), "the stream holding the most was reset");
        assert!(mux.get(1).is_some() && mux.get(3).is_some(), "the others were not");
        let held = mux.buffered.load(Ordering::Relaxed);
        assert!(held <= budget && held > 600_000, "{held} bytes held");
    }

    /// Tiny frames for a stream whose socket takes nothing are copied together, not kept as a
    /// chunk each pinning the buffer they were read into; the channel is charged for what it
    /// holds (the copies' buffers and a chunk's bookkeeping), and large frames stay uncopied.
    #[tokio::test]
    async fn tiny_frames_are_charged_for_what_they_hold() {
        let (sink_end, _keep) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(sink_end.into_split().1), false);
        let mux = Mux::new(out, 4 << 20, 8, CancellationToken::new(), Arc::default(), usize::MAX);
        // No socket yet: everything queues.
        let s = mux.accept_stream(1, &mux.main_lane()).unwrap();
        let read_buffer = Bytes::from(vec![9u8; 256 * 1024]);
        let frames = 100_000;
        for i in 0..frames {
            mux.on_frame(Frame::Data { stream: 1, payload: read_buffer.slice(i..i + 1) }).unwrap();
        }
        assert!(read_buffer.is_unique(), "queued tiny frames still pin their read buffer");
        let large = Bytes::from(vec![3u8; 200_000]);
        mux.on_frame(Frame::Data { stream: 1, payload: large.clone() }).unwrap();
        assert!(!large.is_unique(), "a large frame was copied");

        let st = s.state.lock().unwrap();
        let chunks = st.inbox.len();
        assert!(chunks <= frames / COPY_CHUNK + 2, "{chunks} chunks for {frames} one-byte frames");
        assert_eq!(st.inbox.iter().map(Chunk::len).sum::<usize>(), frames + large.len());
        let held: usize = st.inbox.iter().map(|c| CHUNK_OVERHEAD + c.len().max(COPY_CHUNK)).sum();
        assert_eq!(st.held, held, "the copies' buffers and each chunk's overhead are charged");
        assert_eq!(mux.buffered.load(Ordering::Relaxed), held);
    }

    /// Data that reaches a stream reset while the reader task waited for the rest of its
    /// frame (in a splice or a read) is dropped, not counted: the reset gave back what the
    /// stream held, and nothing would ever give back what came after it, leaving the channel
    /// over its budget for good.
    #[tokio::test]
    async fn data_for_a_stream_reset_meanwhile_is_not_counted() {
        let Rig { mut peer, mut reader, mux, s: _, local: _, dst: _, _keep } = rig(4 << 20).await;
        let payload = vec![5u8; 100_000];
        let wire = data_frame(5, &payload);
        peer.write_all(&wire[..100]).await.unwrap();
        let Some(Next::Data(d)) = reader.next_data().await.unwrap() else { panic!("expected a large data frame") };
        let mut delivering = std::pin::pin!(mux.on_large_data(&mut reader, d));
        // Delivers what was read (no socket yet: queued), then waits for the rest.
        assert!(futures_util::FutureExt::now_or_never(&mut delivering).is_none(), "the rest was not sent yet");
        assert!(mux.buffered.load(Ordering::Relaxed) > 0, "the first bytes were queued");
        mux.on_frame(Frame::Reset { stream: 5, code: code::NORMAL }).unwrap();
        assert_eq!(mux.buffered.load(Ordering::Relaxed), 0, "the reset gave back what the stream held");
        peer.write_all(&wire[100..]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), delivering).await.expect("the frame was not taken").unwrap();
        assert_eq!(mux.buffered.load(Ordering::Relaxed), 0, "bytes counted for a stream that is gone");
        assert_eq!(mux.pipes.load(Ordering::Relaxed), 0, "a pipe queued for a stream that is gone");
    }

    /// A stream removed (reset by either side) lets go of what it had queued at once, pipes
    /// included: whoever still holds the stream (its local connect, still running) would
    /// otherwise keep it alive, no longer counted against the channel's budget.
    #[tokio::test]
    async fn a_reset_stream_holds_nothing() {
        let Rig { mut peer, mut reader, mux, s, local: _, dst: _, _keep } = rig(4 << 20).await;
        // No socket yet (its connect is running): a small frame queues in memory, a large one
        // in a pipe.
        mux.on_frame(Frame::Data { stream: 5, payload: Bytes::from_static(b"small") }).unwrap();
        let wire = data_frame(5, &[4u8; 200_000]);
        let (next, ()) = tokio::join!(reader.next_data(), async { peer.write_all(&wire).await.unwrap() });
        let Some(Next::Data(d)) = next.unwrap() else { panic!("expected a large data frame") };
        mux.on_large_data(&mut reader, d).await.unwrap();
        assert!(s.state.lock().unwrap().inbox.len() >= 2, "both frames queued");
        assert!(mux.pipes.load(Ordering::Relaxed) > 0, "the large frame waits in a pipe");
        mux.on_frame(Frame::Reset { stream: 5, code: code::NORMAL }).unwrap();
        let st = s.state.lock().unwrap();
        assert_eq!(st.inbox.len(), 0, "chunks kept by a stream that is gone");
        assert_eq!((st.held, mux.buffered.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(mux.pipes.load(Ordering::Relaxed), 0, "a pipe kept by a stream that is gone");
    }

    /// New streams go on the lane with the fewest bulk streams and packet channels, then the
    /// fewest streams; a bulk stream stops counting when it ends, and a channel with a packet
    /// channel open keeps its lanes.
    #[tokio::test]
    async fn new_streams_avoid_lanes_with_bulk_streams_or_packets() {
        let (a, _a_peer) = tcp_pair().await;
        let (out, _w) = outbound(Box::new(a.into_split().1), false);
        let mux = Mux::new(out, 1 << 20, 64, CancellationToken::new(), Arc::default(), usize::MAX);
        let (b, _b_peer) = tcp_pair().await;
        let (lane_out, _lw) = outbound(Box::new(b.into_split().1), false);
        let lane = mux.add_lane(lane_out, 4).unwrap();
        let on_lane = |s: &Arc<Stream>| Arc::ptr_eq(&s.lane, &lane);

        let transfer = mux.open_stream().unwrap();
        assert!(!on_lane(&transfer), "lane 0 while the lanes are as busy");
        let session = mux.open_stream().unwrap();
        assert!(on_lane(&session), "the lane with fewer streams");
        mux.moved(&transfer, BULK - 1);
        let third = mux.open_stream().unwrap();
        assert!(!on_lane(&third), "not bulk yet: a tie, lane 0");
        mux.reset(third.id, code::NORMAL);
        mux.moved(&transfer, 1);
        let fourth = mux.open_stream().unwrap();
        assert!(on_lane(&fourth), "lane 0 carries a bulk stream");
        mux.reset(transfer.id, code::NORMAL);
        mux.reset(fourth.id, code::NORMAL);
        assert!(!on_lane(&mux.open_stream().unwrap()), "the bulk stream ended: lane 0 has fewer streams");

        mux.packet_channels_changed(true);
        assert!(on_lane(&mux.open_stream().unwrap()), "lane 0 carries packets");
        mux.reset(session.id, code::NORMAL);

        // Lanes are retired only when the channel has neither streams nor packet channels.
        let quiet = Mux::new(mux.out.clone(), 1 << 20, 64, CancellationToken::new(), Arc::default(), usize::MAX);
        let (c, _c_peer) = tcp_pair().await;
        let quiet_lane = quiet.add_lane(outbound(Box::new(c.into_split().1), false).0, 4).unwrap();
        let mut seen = quiet.opened();
        quiet.packet_channels_changed(true);
        assert!(!quiet.is_idle());
        assert!(!quiet.retire_if_idle(&quiet_lane, &mut seen), "a packet channel is open");
        quiet.packet_channels_changed(false);
        assert!(quiet.is_idle());
        assert!(quiet.retire_if_idle(&quiet_lane, &mut seen));
    }

    /// A board-side channel end read from a real socket, with stream 5 accepted: the peer's
    /// end of the channel, the reader, the mux, the stream, and the stream's local socket pair
    /// (`local` for the pump, `dst` the service's end).
    struct Rig {
        peer: TcpStream,
        reader: WsReader,
        mux: Arc<Mux>,
        s: Arc<Stream>,
        local: TcpStream,
        dst: TcpStream,
        _keep: (TcpStream, crate::io::Writer),
    }

    async fn rig(window: u32) -> Rig {
        let (peer, chan) = tcp_pair().await;
        let (rd, _) = chan.into_split();
        let reader = WsReader::new(ChanRead::Tcp(rd), Role::Client, BytesMut::new(), false);
        let (sink_end, sink_peer) = tcp_pair().await;
        let (out, w) = outbound(Box::new(sink_end.into_split().1), false);
        let mux = Arc::new(Mux::new(out, window, 8, CancellationToken::new(), Arc::default(), usize::MAX));
        let s = mux.accept_stream(5, &mux.main_lane()).unwrap();
        let (local, dst) = tcp_pair().await;
        Rig { peer, reader, mux, s, local, dst, _keep: (sink_peer, w) }
    }

    /// Large data frames are delivered with their payload spliced (or, behind a full socket,
    /// queued) in order, and a large frame for a stream that is gone is skipped whole: the
    /// channel's next frame is read from the right place.
    #[tokio::test]
    async fn large_frames_reach_their_stream_whole_and_in_order() {
        let Rig { mut peer, mut reader, mux, s, local, mut dst, _keep } = rig(4 << 20).await;
        // A small receive buffer that is not read at first: part of the data must queue.
        socket2::SockRef::from(&dst).set_recv_buffer_size(64 * 1024).unwrap();
        let pump = tokio::spawn(run_stream(mux.clone(), s, local));
        let a: Vec<u8> = (0..250_000u32).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let mut wire = Vec::new();
        wire.extend_from_slice(&data_frame(5, &a));
        wire.extend_from_slice(&data_frame(9, &[1u8; 100_000])); // no such stream
        wire.extend_from_slice(&data_frame(5, &b));
        wire.extend_from_slice(&ws::encode_frame(Opcode::Binary, &Frame::Fin { stream: 5 }.encode(), None));
        wire.extend_from_slice(&ws::encode_frame(Opcode::Binary, &Frame::Reset { stream: 77, code: 1 }.encode(), None));
        let writer = tokio::spawn(async move {
            peer.write_all(&wire).await.unwrap();
            peer
        });
        let mut frames = 0;
        loop {
            let Some(Message::Binary(m)) = mux.next_message(&mut reader, Duration::from_secs(30)).await.unwrap() else {
                panic!("expected a binary message")
            };
            let f = Frame::decode(&m).unwrap();
            let last = matches!(f, Frame::Reset { stream: 77, .. });
            assert!(matches!(f, Frame::Fin { stream: 5 }) || last, "read from the wrong place: {f:?}");
            mux.on_frame(f).unwrap();
            frames += 1;
            if last {
                break;
            }
        }
        assert_eq!(frames, 2);
        let mut got = Vec::new();
        dst.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), a.len() + b.len());
        assert!(got[..a.len()] == a[..] && got[a.len()..] == b[..], "the stream's bytes are corrupt");
        drop(writer.await.unwrap());
        drop(dst); // the stream's other direction ends too
        pump.await.unwrap();
    }

    /// A bulk transfer keeps one splice pipe from frame to frame, even when the reader has to
    /// wait for the next frame's headers; once a small message came last, a wait for more
    /// lets the pipe go (a quiet channel holds none). Every frame's bytes arrive.
    #[tokio::test]
    async fn a_bulk_transfer_keeps_its_splice_pipe_between_frames() {
        let Rig { mut peer, mut reader, mux, s, local, mut dst, _keep } = rig(4 << 20).await;
        let _pump = tokio::spawn(run_stream(mux.clone(), s, local));
        let chunk: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut inodes = Vec::new();
        for round in 0..3 {
            if round == 2 {
                // A small message between two bulk frames.
                peer.write_all(&data_frame(5, b"small")).await.unwrap();
                let Some(Next::Message(_)) = reader.next_data().await.unwrap() else { panic!("expected a message") };
            }
            // The reader waits (nothing is sent yet) before the frame arrives.
            let (next, ()) = tokio::join!(reader.next_data(), async {
                tokio::task::yield_now().await;
                peer.write_all(&data_frame(5, &chunk)).await.unwrap();
            });
            let Some(Next::Data(d)) = next.unwrap() else { panic!("expected a large data frame") };
            mux.on_large_data(&mut reader, d).await.unwrap();
            let mut got = vec![0u8; chunk.len()];
            dst.read_exact(&mut got).await.unwrap();
            assert!(got == chunk, "round {round}: the stream's bytes are corrupt");
            inodes.push(reader.pipe_inode().expect("the frame was spliced"));
        }
        assert_eq!(inodes[0], inodes[1], "a new pipe for the second frame of a bulk transfer");
        assert_ne!(inodes[1], inodes[2], "the pipe outlived a quiet channel");
    }

    /// Large frames for a stream whose socket is full wait in pipes (no copy through user
    /// space), at most [`MAX_QUEUED_PIPES`] per channel, then in memory; every byte arrives
    /// in order, and the pipes are gone with the stream.
    #[tokio::test]
    async fn frames_behind_a_full_socket_wait_in_pipes_then_in_memory() {
        let Rig { mut peer, mut reader, mux, s, local, mut dst, _keep } = rig(32 << 20).await;
        socket2::SockRef::from(&dst).set_recv_buffer_size(64 * 1024).unwrap();
        socket2::SockRef::from(&local).set_send_buffer_size(64 * 1024).unwrap();
        let pump = tokio::spawn(run_stream(mux.clone(), s, local));
        let frames = MAX_QUEUED_PIPES + 8;
        let mut sent = Vec::new();
        for i in 0..frames {
            let chunk: Vec<u8> = (0..200_000u32).map(|j| ((i as u32 * 7 + j) % 249) as u8).collect();
            let wire = data_frame(5, &chunk);
            sent.extend_from_slice(&chunk);
            let (next, ()) = tokio::join!(reader.next_data(), async { peer.write_all(&wire).await.unwrap() });
            let Some(Next::Data(d)) = next.unwrap() else { panic!("expected a large data frame") };
            mux.on_large_data(&mut reader, d).await.unwrap();
        }
        assert_eq!(mux.pipes.load(Ordering::Relaxed), MAX_QUEUED_PIPES, "queued frames should fill the pipes");
        mux.on_frame(Frame::Fin { stream: 5 }).unwrap();
        let mut got = Vec::new();
        dst.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the stream's bytes are corrupt or out of order");
        drop(dst);
        pump.await.unwrap();
        assert_eq!(mux.pipes.load(Ordering::Relaxed), 0, "pipes outlived their stream");
    }
}

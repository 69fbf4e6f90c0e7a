//! The multiplexing frames carried, one per WebSocket binary message, on a board's tunnel
//! channel.
//!
//! Every frame starts with a one-byte type and a big-endian `u32` id (a stream, listener or
//! packet-channel id, or 0 for channel-wide frames), then a type-specific body:
//!
//! | type | frame | direction | body |
//! |---|---|---|---|
//! | 0x01 | `Hello` | client → server | version u16, agent str |
//! | 0x02 | `Welcome` | server → client | version u16, initial window u32 |
//! | 0x03 | `GoAway` | both | code u16, reason str (the channel closes after it) |
//! | 0x04 | `Lanes` | server → client | count u16, key str: the client may open up to `count` lanes |
//! | 0x05 | `Lane` | client → server | key str: the first frame on a lane, in place of `Hello` |
//! | 0x10 | `Listen` | client → server | port u16, token str (id = listener id chosen by the client) |
//! | 0x11 | `ListenOk` | server → client | port u16 |
//! | 0x12 | `ListenErr` | server → client | code u16, reason str |
//! | 0x13 | `Unlisten` | client → server | empty |
//! | 0x14 | `ListenerClosed` | server → client | code u16, reason str |
//! | 0x20 | `Open` | server → client | listener id u32, peer str (id = new stream id) |
//! | 0x21 | `Data` | both | the bytes (never empty) |
//! | 0x22 | `Fin` | both | empty: no more data in this direction |
//! | 0x23 | `Reset` | both | code u16: the stream is gone in both directions |
//! | 0x24 | `Window` | both | increment u32: the sender may send that many more bytes |
//! | 0x30 | `PacketOpen` | client → server | vpn str, token str (id chosen by the client) |
//! | 0x31 | `PacketOk` | server → client | empty |
//! | 0x32 | `PacketErr` | server → client | code u16, reason str |
//! | 0x33 | `Packet` | both | one whole packet |
//! | 0x34 | `PacketClose` | both | code u16, reason str |
//!
//! A **lane** is an extra connection of a channel that carries some of its streams (all the
//! frames of a stream travel on the lane its `Open` came on), so that bulk streams do not share
//! one TCP connection. The server offers lanes with `Lanes` only to a client that asked for
//! them in its upgrade request; a lane carries only stream frames and WebSocket pings.
//!
//! A `str` is a u16 length then that many bytes of UTF-8, at most [`MAX_STR`] bytes. Decoding
//! never panics: anything malformed is a [`FrameError`] and the caller decides what to close.

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol version this codec speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of the type + id header in front of every frame body.
pub const HEADER_LEN: usize = 5;
/// The longest string field accepted (tokens, reasons, peer addresses, agent names).
pub const MAX_STR: usize = 1024;
/// The largest `Data` payload a peer may send in one frame.
pub const MAX_DATA: usize = 256 * 1024;
/// The largest packet carried by a packet channel (a jumbo Ethernet frame plus GRE).
pub const MAX_PACKET: usize = 65_535;

/// Reason codes carried by `GoAway`, `ListenErr`, `ListenerClosed`, `Reset`, `PacketErr` and
/// `PacketClose`. Unknown codes are kept as they are.
pub mod code {
    /// Normal close.
    pub const NORMAL: u16 = 0;
    /// The peer speaks another protocol version.
    pub const VERSION: u16 = 1;
    /// The token is missing, forged, expired or for another board/port/vpn.
    pub const UNAUTHORIZED: u16 = 2;
    /// The cloud's policy refused it (port not allocated to this board, …).
    pub const FORBIDDEN: u16 = 3;
    /// The public port is already in use.
    pub const IN_USE: u16 = 4;
    /// A limit was reached (listeners, streams, packet channels).
    pub const LIMIT: u16 = 5;
    /// The peer broke the protocol (malformed frame, window overrun, …).
    pub const PROTOCOL: u16 = 6;
    /// The local connect on the board failed.
    pub const CONNECT_FAILED: u16 = 7;
    /// Revoked by the cloud (lease ended, service disabled).
    pub const REVOKED: u16 = 8;
    /// An I/O error on one end of the stream.
    pub const IO: u16 = 9;
    /// The server or client is shutting down.
    pub const SHUTDOWN: u16 = 10;
    /// Anything else.
    pub const OTHER: u16 = 11;
    /// The cloud could not decide now (its database is unreachable, …): ask again later. Clients
    /// that predate this code treat it as any other refusal (they drop the request).
    pub const UNAVAILABLE: u16 = 12;
}

/// One multiplexing frame. `Data` and `Packet` payloads are slices of the received message
/// (no copy). `Debug` leaves out tokens, lane keys and payloads.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    Hello { version: u16, agent: String },
    Welcome { version: u16, initial_window: u32 },
    GoAway { code: u16, reason: String },
    Lanes { count: u16, key: String },
    Lane { key: String },
    Listen { listener: u32, port: u16, token: String },
    ListenOk { listener: u32, port: u16 },
    ListenErr { listener: u32, code: u16, reason: String },
    Unlisten { listener: u32 },
    ListenerClosed { listener: u32, code: u16, reason: String },
    Open { stream: u32, listener: u32, peer: String },
    Data { stream: u32, payload: Bytes },
    Fin { stream: u32 },
    Reset { stream: u32, code: u16 },
    Window { stream: u32, increment: u32 },
    PacketOpen { channel: u32, vpn: String, token: String },
    PacketOk { channel: u32 },
    PacketErr { channel: u32, code: u16, reason: String },
    Packet { channel: u32, payload: Bytes },
    PacketClose { channel: u32, code: u16, reason: String },
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HIDDEN: &str = "<hidden>";
        match self {
            Frame::Hello { version, agent } => {
                f.debug_struct("Hello").field("version", version).field("agent", agent).finish()
            }
            Frame::Welcome { version, initial_window } => {
                f.debug_struct("Welcome").field("version", version).field("initial_window", initial_window).finish()
            }
            Frame::GoAway { code, reason } => {
                f.debug_struct("GoAway").field("code", code).field("reason", reason).finish()
            }
            Frame::Lanes { count, .. } => f.debug_struct("Lanes").field("count", count).field("key", &HIDDEN).finish(),
            Frame::Lane { .. } => f.debug_struct("Lane").field("key", &HIDDEN).finish(),
            Frame::Listen { listener, port, .. } => f
                .debug_struct("Listen")
                .field("listener", listener)
                .field("port", port)
                .field("token", &HIDDEN)
                .finish(),
            Frame::ListenOk { listener, port } => {
                f.debug_struct("ListenOk").field("listener", listener).field("port", port).finish()
            }
            Frame::ListenErr { listener, code, reason } => f
                .debug_struct("ListenErr")
                .field("listener", listener)
                .field("code", code)
                .field("reason", reason)
                .finish(),
            Frame::Unlisten { listener } => f.debug_struct("Unlisten").field("listener", listener).finish(),
            Frame::ListenerClosed { listener, code, reason } => f
                .debug_struct("ListenerClosed")
                .field("listener", listener)
                .field("code", code)
                .field("reason", reason)
                .finish(),
            Frame::Open { stream, listener, peer } => {
                f.debug_struct("Open").field("stream", stream).field("listener", listener).field("peer", peer).finish()
            }
            Frame::Data { stream, payload } => {
                f.debug_struct("Data").field("stream", stream).field("len", &payload.len()).finish()
            }
            Frame::Fin { stream } => f.debug_struct("Fin").field("stream", stream).finish(),
            Frame::Reset { stream, code } => {
                f.debug_struct("Reset").field("stream", stream).field("code", code).finish()
            }
            Frame::Window { stream, increment } => {
                f.debug_struct("Window").field("stream", stream).field("increment", increment).finish()
            }
            Frame::PacketOpen { channel, vpn, .. } => f
                .debug_struct("PacketOpen")
                .field("channel", channel)
                .field("vpn", vpn)
                .field("token", &HIDDEN)
                .finish(),
            Frame::PacketOk { channel } => f.debug_struct("PacketOk").field("channel", channel).finish(),
            Frame::PacketErr { channel, code, reason } => f
                .debug_struct("PacketErr")
                .field("channel", channel)
                .field("code", code)
                .field("reason", reason)
                .finish(),
            Frame::Packet { channel, payload } => {
                f.debug_struct("Packet").field("channel", channel).field("len", &payload.len()).finish()
            }
            Frame::PacketClose { channel, code, reason } => f
                .debug_struct("PacketClose")
                .field("channel", channel)
                .field("code", code)
                .field("reason", reason)
                .finish(),
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame too short: needed {needed} bytes, had {had}")]
    Truncated { needed: usize, had: usize },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{0} bytes of trailing garbage after the frame")]
    Trailing(usize),
    #[error("string field of {0} bytes exceeds the limit of {MAX_STR}")]
    StringTooLong(usize),
    #[error("string field is not UTF-8")]
    NotUtf8,
    #[error("empty data frame")]
    EmptyData,
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
}

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_GOAWAY: u8 = 0x03;
const T_LANES: u8 = 0x04;
const T_LANE: u8 = 0x05;
const T_LISTEN: u8 = 0x10;
const T_LISTEN_OK: u8 = 0x11;
const T_LISTEN_ERR: u8 = 0x12;
const T_UNLISTEN: u8 = 0x13;
const T_LISTENER_CLOSED: u8 = 0x14;
const T_OPEN: u8 = 0x20;
/// Frame type of `Data`, for writers that build the header in place.
pub const T_DATA: u8 = 0x21;
const T_FIN: u8 = 0x22;
const T_RESET: u8 = 0x23;
const T_WINDOW: u8 = 0x24;
const T_PACKET_OPEN: u8 = 0x30;
const T_PACKET_OK: u8 = 0x31;
const T_PACKET_ERR: u8 = 0x32;
/// Frame type of `Packet`, for writers that build the header in place.
pub const T_PACKET: u8 = 0x33;
const T_PACKET_CLOSE: u8 = 0x34;

/// The 5-byte header of a frame of type `kind` for `id`: lets I/O code read a payload straight
/// into a buffer behind it and send the whole without copying.
pub fn header(kind: u8, id: u32) -> [u8; HEADER_LEN] {
    let b = id.to_be_bytes();
    [kind, b[0], b[1], b[2], b[3]]
}

impl Frame {
    /// Encodes the frame into a fresh buffer.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.body_len_hint());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello { version, agent } => {
                out.put_slice(&header(T_HELLO, 0));
                out.put_u16(*version);
                put_str(out, agent);
            }
            Frame::Welcome { version, initial_window } => {
                out.put_slice(&header(T_WELCOME, 0));
                out.put_u16(*version);
                out.put_u32(*initial_window);
            }
            Frame::GoAway { code, reason } => put_code_reason(out, T_GOAWAY, 0, *code, reason),
            Frame::Lanes { count, key } => {
                out.put_slice(&header(T_LANES, 0));
                out.put_u16(*count);
                put_str(out, key);
            }
            Frame::Lane { key } => {
                out.put_slice(&header(T_LANE, 0));
                put_str(out, key);
            }
            Frame::Listen { listener, port, token } => {
                out.put_slice(&header(T_LISTEN, *listener));
                out.put_u16(*port);
                put_str(out, token);
            }
            Frame::ListenOk { listener, port } => {
                out.put_slice(&header(T_LISTEN_OK, *listener));
                out.put_u16(*port);
            }
            Frame::ListenErr { listener, code, reason } => put_code_reason(out, T_LISTEN_ERR, *listener, *code, reason),
            Frame::Unlisten { listener } => out.put_slice(&header(T_UNLISTEN, *listener)),
            Frame::ListenerClosed { listener, code, reason } => {
                put_code_reason(out, T_LISTENER_CLOSED, *listener, *code, reason)
            }
            Frame::Open { stream, listener, peer } => {
                out.put_slice(&header(T_OPEN, *stream));
                out.put_u32(*listener);
                put_str(out, peer);
            }
            Frame::Data { stream, payload } => {
                out.put_slice(&header(T_DATA, *stream));
                out.put_slice(payload);
            }
            Frame::Fin { stream } => out.put_slice(&header(T_FIN, *stream)),
            Frame::Reset { stream, code } => {
                out.put_slice(&header(T_RESET, *stream));
                out.put_u16(*code);
            }
            Frame::Window { stream, increment } => {
                out.put_slice(&header(T_WINDOW, *stream));
                out.put_u32(*increment);
            }
            Frame::PacketOpen { channel, vpn, token } => {
                out.put_slice(&header(T_PACKET_OPEN, *channel));
                put_str(out, vpn);
                put_str(out, token);
            }
            Frame::PacketOk { channel } => out.put_slice(&header(T_PACKET_OK, *channel)),
            Frame::PacketErr { channel, code, reason } => put_code_reason(out, T_PACKET_ERR, *channel, *code, reason),
            Frame::Packet { channel, payload } => {
                out.put_slice(&header(T_PACKET, *channel));
                out.put_slice(payload);
            }
            Frame::PacketClose { channel, code, reason } => {
                put_code_reason(out, T_PACKET_CLOSE, *channel, *code, reason)
            }
        }
    }

    fn body_len_hint(&self) -> usize {
        match self {
            Frame::Data { payload, .. } | Frame::Packet { payload, .. } => payload.len(),
            _ => 64,
        }
    }

    /// Decodes one whole frame (one WebSocket message).
    pub fn decode(msg: &Bytes) -> Result<Frame, FrameError> {
        if msg.len() < HEADER_LEN {
            return Err(FrameError::Truncated { needed: HEADER_LEN, had: msg.len() });
        }
        let kind = msg[0];
        let id = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let mut r = Reader { buf: msg, pos: HEADER_LEN };
        let frame = match kind {
            T_HELLO => Frame::Hello { version: r.u16()?, agent: r.str()? },
            T_WELCOME => Frame::Welcome { version: r.u16()?, initial_window: r.u32()? },
            T_GOAWAY => Frame::GoAway { code: r.u16()?, reason: r.str()? },
            T_LANES => Frame::Lanes { count: r.u16()?, key: r.str()? },
            T_LANE => Frame::Lane { key: r.str()? },
            T_LISTEN => Frame::Listen { listener: id, port: r.u16()?, token: r.str()? },
            T_LISTEN_OK => Frame::ListenOk { listener: id, port: r.u16()? },
            T_LISTEN_ERR => Frame::ListenErr { listener: id, code: r.u16()?, reason: r.str()? },
            T_UNLISTEN => Frame::Unlisten { listener: id },
            T_LISTENER_CLOSED => Frame::ListenerClosed { listener: id, code: r.u16()?, reason: r.str()? },
            T_OPEN => Frame::Open { stream: id, listener: r.u32()?, peer: r.str()? },
            T_DATA => Frame::Data { stream: id, payload: r.rest(MAX_DATA, false)? },
            T_FIN => Frame::Fin { stream: id },
            T_RESET => Frame::Reset { stream: id, code: r.u16()? },
            T_WINDOW => Frame::Window { stream: id, increment: r.u32()? },
            T_PACKET_OPEN => Frame::PacketOpen { channel: id, vpn: r.str()?, token: r.str()? },
            T_PACKET_OK => Frame::PacketOk { channel: id },
            T_PACKET_ERR => Frame::PacketErr { channel: id, code: r.u16()?, reason: r.str()? },
            T_PACKET => Frame::Packet { channel: id, payload: r.rest(MAX_PACKET, true)? },
            T_PACKET_CLOSE => Frame::PacketClose { channel: id, code: r.u16()?, reason: r.str()? },
            other => return Err(FrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Encoders truncate rather than fail: a reason longer than MAX_STR is cut at a char boundary.
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
}

fn put_code_reason(out: &mut BytesMut, kind: u8, id: u32, code: u16, reason: &str) {
    out.put_slice(&header(kind, id));
    out.put_u16(code);
    put_str(out, reason);
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        let had = self.buf.len() - self.pos;
        if had < n {
            return Err(FrameError::Truncated { needed: self.pos + n, had: self.buf.len() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn str(&mut self) -> Result<String, FrameError> {
        let len = self.u16()? as usize;
        if len > MAX_STR {
            return Err(FrameError::StringTooLong(len));
        }
        let b = self.take(len)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| FrameError::NotUtf8)
    }

    fn rest(&mut self, max: usize, allow_empty: bool) -> Result<Bytes, FrameError> {
        let len = self.buf.len() - self.pos;
        if len == 0 && !allow_empty {
            return Err(FrameError::EmptyData);
        }
        if len > max {
            return Err(FrameError::PayloadTooLarge { len, max });
        }
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        Ok(out)
    }

    fn finish(self) -> Result<(), FrameError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello { version: PROTOCOL_VERSION, agent: "wstunnel/0.1".into() },
            Frame::Welcome { version: 1, initial_window: 262_144 },
            Frame::GoAway { code: code::VERSION, reason: "upgrade".into() },
            Frame::Lanes { count: 3, key: "k3y".into() },
            Frame::Lane { key: "k3y".into() },
            Frame::Listen { listener: 7, port: 0, token: "tok".into() },
            Frame::ListenOk { listener: 7, port: 50_001 },
            Frame::ListenErr { listener: 7, code: code::IN_USE, reason: "busy".into() },
            Frame::Unlisten { listener: 7 },
            Frame::ListenerClosed { listener: 7, code: code::REVOKED, reason: "lease ended".into() },
            Frame::Open { stream: 1, listener: 7, peer: "203.0.113.5:4242".into() },
            Frame::Data { stream: 1, payload: Bytes::from_static(b"hello") },
            Frame::Fin { stream: 1 },
            Frame::Reset { stream: 1, code: code::CONNECT_FAILED },
            Frame::Window { stream: 1, increment: 65_536 },
            Frame::PacketOpen { channel: 3, vpn: "vpn-1".into(), token: "t".into() },
            Frame::PacketOk { channel: 3 },
            Frame::PacketErr { channel: 3, code: code::FORBIDDEN, reason: "no".into() },
            Frame::Packet { channel: 3, payload: Bytes::from_static(&[0x45, 0, 0, 20]) },
            Frame::PacketClose { channel: 3, code: code::NORMAL, reason: String::new() },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let bytes = f.encode();
            assert_eq!(Frame::decode(&bytes).unwrap(), f, "{f:?}");
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for f in all_frames() {
            let bytes = f.encode();
            for cut in 0..bytes.len() {
                let short = bytes.slice(..cut);
                // Data/Packet frames shortened still decode (shorter payload) except when empty.
                let res = Frame::decode(&short);
                if !matches!(f, Frame::Data { .. } | Frame::Packet { .. }) || cut < HEADER_LEN {
                    assert!(res.is_err(), "{f:?} cut at {cut} decoded as {res:?}");
                }
            }
        }
    }

    #[test]
    fn malformed_inputs_are_rejected() {
        assert_eq!(Frame::decode(&Bytes::from_static(&[0x99, 0, 0, 0, 1])), Err(FrameError::UnknownType(0x99)));
        assert_eq!(Frame::decode(&Bytes::from_static(&[T_DATA, 0, 0, 0, 1])), Err(FrameError::EmptyData));
        let mut trailing = BytesMut::from(&Frame::Fin { stream: 1 }.encode()[..]);
        trailing.put_u8(0);
        assert_eq!(Frame::decode(&trailing.freeze()), Err(FrameError::Trailing(1)));
        let mut bad_utf8 = BytesMut::from(&header(T_GOAWAY, 0)[..]);
        bad_utf8.put_u16(0);
        bad_utf8.put_u16(2);
        bad_utf8.put_slice(&[0xff, 0xfe]);
        assert_eq!(Frame::decode(&bad_utf8.freeze()), Err(FrameError::NotUtf8));
        let mut long = BytesMut::from(&header(T_GOAWAY, 0)[..]);
        long.put_u16(0);
        long.put_u16(MAX_STR as u16 + 1);
        assert_eq!(Frame::decode(&long.freeze()), Err(FrameError::StringTooLong(MAX_STR + 1)));
        let mut big = BytesMut::from(&header(T_DATA, 1)[..]);
        big.put_bytes(0, MAX_DATA + 1);
        assert!(matches!(Frame::decode(&big.freeze()), Err(FrameError::PayloadTooLarge { .. })));
    }

    #[test]
    fn debug_output_leaves_out_secrets_and_payloads() {
        let secret = "s3cr3t-value";
        let frames = [
            Frame::Listen { listener: 1, port: 2, token: secret.into() },
            Frame::PacketOpen { channel: 1, vpn: "v".into(), token: secret.into() },
            Frame::Lanes { count: 2, key: secret.into() },
            Frame::Lane { key: secret.into() },
            Frame::Data { stream: 1, payload: Bytes::from(secret) },
        ];
        for f in frames {
            let shown = format!("{f:?}");
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(
            format!("{:?}", Frame::Data { stream: 4, payload: Bytes::from_static(b"abc") }),
            "Data { stream: 4, len: 3 }"
        );
    }

    #[test]
    fn long_strings_are_truncated_at_a_char_boundary() {
        let reason = "é".repeat(MAX_STR);
        let f = Frame::GoAway { code: 1, reason };
        match Frame::decode(&f.encode()).unwrap() {
            Frame::GoAway { reason, .. } => assert_eq!(reason.len(), MAX_STR),
            other => panic!("{other:?}"),
        }
    }
}

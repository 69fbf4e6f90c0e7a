//! RFC 6455 WebSocket framing, sans-I/O: frame headers, masking and message reassembly.
//!
//! The tunnel channel does its own framing instead of going through tungstenite so that an
//! idle channel holds no read buffer (the I/O side waits for readiness, then reads into a
//! fresh buffer), payloads are handed out as slices of the read buffer, and a frame can be
//! built in place behind the bytes read from a TCP socket (see [`MAX_HEADER`]). The HTTP
//! upgrade itself lives in the `wstunnel` crate.
//!
//! Supported: binary and text messages (text is reported, the tunnel refuses it),
//! fragmentation, ping/pong/close, masking both ways. Not supported: extensions (any RSV bit
//! set is an error).

use bytes::{Buf, Bytes, BytesMut};

/// The longest frame header: 2 bytes + 8-byte length + 4-byte mask key.
pub const MAX_HEADER: usize = 14;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Which end of the connection this codec runs on: clients mask what they send and expect
/// unmasked frames; servers the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// A complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Bytes),
    Text(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame: the code and reason when present.
    Close(Option<(u16, String)>),
}

/// A framing violation. The connection must be closed (with code 1002 or 1009).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("reserved bits set (no extension was negotiated)")]
    Reserved,
    #[error("unknown opcode 0x{0:x}")]
    Opcode(u8),
    #[error("frame masking is wrong for this side of the connection")]
    Masking,
    #[error("control frame is fragmented or longer than 125 bytes")]
    BadControl,
    #[error("continuation frame without a message to continue, or a new message inside a fragmented one")]
    Fragmentation,
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLong { len: u64, max: usize },
    #[error("close frame payload is malformed")]
    BadClose,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header itself takes.
    pub header_len: usize,
}

/// Parses a header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let opcode = Opcode::from_u8(b0 & 0x0F).ok_or(WsError::Opcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin: b0 & 0x80 != 0, opcode, mask, len, header_len: pos }))
}

/// Writes a frame header for a payload of `len` bytes at the end of `out` (so that it sits
/// right before a payload that follows `out`) and returns how many bytes it used.
pub fn write_header(out: &mut [u8; MAX_HEADER], fin: bool, opcode: Opcode, mask: Option<[u8; 4]>, len: usize) -> usize {
    let mut h = [0u8; MAX_HEADER];
    h[0] = (if fin { 0x80 } else { 0 }) | opcode.as_u8();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        h[1] = mask_bit | len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = mask_bit | 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = mask_bit | 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(m) = mask {
        h[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    out[MAX_HEADER - n..].copy_from_slice(&h[..n]);
    n
}

/// XORs `buf` with the masking key, as if `buf` started at payload offset 0.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k32 = u32::from_ne_bytes(key) as u64;
    let k64 = k32 | (k32 << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k64).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Message(Message),
    /// Needs at least this many bytes in the buffer (in total) to make progress.
    Need(usize),
}

/// Reassembles messages from the bytes read off a connection.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_message: usize,
    /// Server side only: also accept unmasked frames (the client negotiated unmasked frames).
    unmasked_ok: bool,
    /// A fragmented data message being assembled: its opcode and the bytes so far.
    partial: Option<(Opcode, BytesMut)>,
}

impl Decoder {
    pub fn new(role: Role, max_message: usize) -> Decoder {
        Decoder { role, max_message, unmasked_ok: false, partial: None }
    }

    /// A server-side decoder that also accepts unmasked frames from the client. RFC 6455 makes
    /// clients mask; a protocol on top may agree otherwise during the upgrade (masking guards
    /// intermediaries that misread the stream as HTTP, and costs a pass over every byte).
    pub fn accept_unmasked(mut self) -> Decoder {
        self.unmasked_ok = true;
        self
    }

    /// A fragmented message is being assembled (the next frame continues it).
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes the next message out of `buf` (consuming its bytes). Unmasks in place, so data
    /// messages are slices of `buf`'s allocation.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WsError> {
        loop {
            let Some(h) = parse_header(buf)? else {
                return Ok(Decoded::Need(buf.len() + 1));
            };
            let masking_ok = match self.role {
                Role::Client => h.mask.is_none(),
                Role::Server => h.mask.is_some() || self.unmasked_ok,
            };
            if !masking_ok {
                return Err(WsError::Masking);
            }
            if h.opcode.is_control() && (!h.fin || h.len > 125) {
                return Err(WsError::BadControl);
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len()) as u64;
            if h.len.saturating_add(if h.opcode.is_control() { 0 } else { so_far }) > self.max_message as u64 {
                return Err(WsError::TooLong { len: h.len.saturating_add(so_far), max: self.max_message });
            }
            let total = h.header_len + h.len as usize;
            if buf.len() < total {
                return Ok(Decoded::Need(total));
            }
            buf.advance(h.header_len);
            let mut payload = buf.split_to(h.len as usize);
            if let Some(m) = h.mask {
                apply_mask(&mut payload, m);
            }
            if let Some(msg) = self.assemble(h, payload)? {
                return Ok(Decoded::Message(msg));
            }
        }
    }

    fn assemble(&mut self, h: Header, payload: BytesMut) -> Result<Option<Message>, WsError> {
        match h.opcode {
            Opcode::Ping => Ok(Some(Message::Ping(payload.freeze()))),
            Opcode::Pong => Ok(Some(Message::Pong(payload.freeze()))),
            Opcode::Close => parse_close(&payload).map(|c| Some(Message::Close(c))),
            Opcode::Continuation => {
                let Some((op, mut acc)) = self.partial.take() else {
                    return Err(WsError::Fragmentation);
                };
                acc.extend_from_slice(&payload);
                if h.fin {
                    Ok(Some(data_message(op, acc.freeze())))
                } else {
                    self.partial = Some((op, acc));
                    Ok(None)
                }
            }
            Opcode::Text | Opcode::Binary => {
                if self.partial.is_some() {
                    return Err(WsError::Fragmentation);
                }
                if h.fin {
                    Ok(Some(data_message(h.opcode, payload.freeze())))
                } else {
                    self.partial = Some((h.opcode, payload));
                    Ok(None)
                }
            }
        }
    }
}

fn data_message(op: Opcode, b: Bytes) -> Message {
    if op == Opcode::Text { Message::Text(b) } else { Message::Binary(b) }
}

fn parse_close(p: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match p.len() {
        0 => Ok(None),
        1 => Err(WsError::BadClose),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| WsError::BadClose)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Encodes a whole (unfragmented) frame into a new buffer, masking it with `mask` if given.
/// For control frames and small messages; the tunnel's data path builds frames in place.
pub fn encode_frame(opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let mut h = [0u8; MAX_HEADER];
    let n = write_header(&mut h, true, opcode, mask, payload.len());
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.extend_from_slice(&h[MAX_HEADER - n..]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m);
    }
    out.freeze()
}

/// The payload of a close frame with `code` and `reason` (reason cut to fit 125 bytes).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(role_from: Role, payload_len: usize) {
        let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
        let mask = (role_from == Role::Client).then_some([1, 2, 3, 4]);
        let wire = encode_frame(Opcode::Binary, &payload, mask);
        let to = if role_from == Role::Client { Role::Server } else { Role::Client };
        let mut dec = Decoder::new(to, 1 << 20);
        // Feed byte by byte up to the end: every prefix asks for more.
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = dec.decode(&mut buf).unwrap();
            if i + 1 < wire.len() {
                assert!(matches!(r, Decoded::Need(n) if n > buf.len()), "prefix {i}: {r:?}");
            } else {
                assert_eq!(r, Decoded::Message(Message::Binary(Bytes::from(payload.clone()))));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_round_trip_at_every_length_class() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 70_000] {
            roundtrip(Role::Client, len);
            roundtrip(Role::Server, len);
        }
    }

    #[test]
    fn masking_is_an_involution_at_any_length() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut b = orig.clone();
            apply_mask(&mut b, [9, 8, 7, 6]);
            for (i, (x, y)) in b.iter().zip(&orig).enumerate() {
                assert_eq!(*x, y ^ [9, 8, 7, 6][i % 4]);
            }
            apply_mask(&mut b, [9, 8, 7, 6]);
            assert_eq!(b, orig);
        }
    }

    #[test]
    fn fragments_are_reassembled_and_controls_interleave() {
        let mut buf = BytesMut::new();
        let mut h = [0u8; MAX_HEADER];
        let n = write_header(&mut h, false, Opcode::Binary, None, 3);
        buf.extend_from_slice(&h[MAX_HEADER - n..]);
        buf.extend_from_slice(b"abc");
        buf.extend_from_slice(&encode_frame(Opcode::Ping, b"p", None));
        let n = write_header(&mut h, true, Opcode::Continuation, None, 2);
        buf.extend_from_slice(&h[MAX_HEADER - n..]);
        buf.extend_from_slice(b"de");
        let mut dec = Decoder::new(Role::Client, 100);
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::Message(Message::Ping(Bytes::from_static(b"p"))));
        assert_eq!(dec.decode(&mut buf).unwrap(), Decoded::Message(Message::Binary(Bytes::from_static(b"abcde"))));
    }

    #[test]
    fn violations_are_errors() {
        // Unless the upgrade agreed otherwise, a server accepts only masked frames.
        let mut lenient = Decoder::new(Role::Server, 100).accept_unmasked();
        for mask in [None, Some([9, 8, 7, 6])] {
            let mut b = BytesMut::from(&encode_frame(Opcode::Binary, b"hi", mask)[..]);
            assert_eq!(lenient.decode(&mut b), Ok(Decoded::Message(Message::Binary(Bytes::from_static(b"hi")))));
        }
        let mut dec = Decoder::new(Role::Server, 100);
        // Unmasked frame sent to a server.
        let mut b = BytesMut::from(&encode_frame(Opcode::Binary, b"x", None)[..]);
        assert_eq!(dec.decode(&mut b), Err(WsError::Masking));
        // Too long.
        let mut b = BytesMut::from(&encode_frame(Opcode::Binary, &[0; 101], Some([0; 4]))[..]);
        assert!(matches!(Decoder::new(Role::Server, 100).decode(&mut b), Err(WsError::TooLong { .. })));
        // Reserved bits, unknown opcode.
        assert_eq!(Decoder::new(Role::Client, 9).decode(&mut BytesMut::from(&[0xC2u8, 0][..])), Err(WsError::Reserved));
        assert_eq!(
            Decoder::new(Role::Client, 9).decode(&mut BytesMut::from(&[0x83u8, 0][..])),
            Err(WsError::Opcode(3))
        );
        // Continuation without a start; fragmented ping.
        assert_eq!(
            Decoder::new(Role::Client, 9).decode(&mut BytesMut::from(&[0x80u8, 0][..])),
            Err(WsError::Fragmentation)
        );
        assert_eq!(
            Decoder::new(Role::Client, 9).decode(&mut BytesMut::from(&[0x09u8, 0][..])),
            Err(WsError::BadControl)
        );
        // A 1-byte close payload.
        assert_eq!(
            Decoder::new(Role::Client, 9).decode(&mut BytesMut::from(&[0x88u8, 1, 0][..])),
            Err(WsError::BadClose)
        );
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut b = BytesMut::from(&encode_frame(Opcode::Close, &close_payload(1000, "bye"), None)[..]);
        assert_eq!(
            Decoder::new(Role::Client, 9).decode(&mut b).unwrap(),
            Decoded::Message(Message::Close(Some((1000, "bye".into()))))
        );
    }
}

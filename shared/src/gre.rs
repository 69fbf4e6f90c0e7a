//! GRE framing (RFC 2784) for Ethernet over GRE ("GRE-TAP", protocol type 0x6558).
//!
//! L2 overlays carry each Ethernet frame of a TAP device as one GRE packet in one packet-channel
//! message, in user space, because the kernel may lack `ip_gre`. We send the minimal 4-byte
//! header (no checksum); we accept a checksum when present and verify it.

/// The protocol type of Transparent Ethernet Bridging (Ethernet frames inside GRE).
pub const PROTO_TEB: u16 = 0x6558;
/// Header length without the optional checksum field.
pub const HEADER_LEN: usize = 4;

/// Why a packet is not acceptable GRE-TAP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GreError {
    #[error("packet of {0} bytes is shorter than a GRE header")]
    Truncated(usize),
    #[error("GRE version {0} is not 0")]
    Version(u8),
    #[error("reserved GRE flags set (RFC 1701 key/sequence/routing are not supported)")]
    Reserved,
    #[error("GRE protocol type 0x{0:04x} is not Ethernet (0x6558)")]
    Protocol(u16),
    #[error("GRE checksum does not match")]
    Checksum,
}

/// Prepends the 4-byte GRE-TAP header to an Ethernet frame.
pub fn encapsulate(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + frame.len());
    out.extend_from_slice(&header());
    out.extend_from_slice(frame);
    out
}

/// The 4-byte header: no flags, version 0, protocol 0x6558.
pub fn header() -> [u8; HEADER_LEN] {
    let p = PROTO_TEB.to_be_bytes();
    [0, 0, p[0], p[1]]
}

/// Validates a GRE packet and returns the Ethernet frame inside it.
pub fn decapsulate(packet: &[u8]) -> Result<&[u8], GreError> {
    if packet.len() < HEADER_LEN {
        return Err(GreError::Truncated(packet.len()));
    }
    let flags = u16::from_be_bytes([packet[0], packet[1]]);
    let version = (flags & 0x7) as u8;
    if version != 0 {
        return Err(GreError::Version(version));
    }
    // RFC 2784 §2.3: bits 1-5 non-zero must be discarded (we do not implement RFC 1701);
    // bits 6-12 must be ignored on receipt.
    if flags & 0x7C00 != 0 {
        return Err(GreError::Reserved);
    }
    let proto = u16::from_be_bytes([packet[2], packet[3]]);
    if proto != PROTO_TEB {
        return Err(GreError::Protocol(proto));
    }
    if flags & 0x8000 != 0 {
        if packet.len() < HEADER_LEN + 4 {
            return Err(GreError::Truncated(packet.len()));
        }
        if internet_checksum(packet) != 0 {
            return Err(GreError::Checksum);
        }
        return Ok(&packet[HEADER_LEN + 4..]);
    }
    Ok(&packet[HEADER_LEN..])
}

/// The one's complement sum (RFC 1071) over `data`; 0 when a checksum embedded in it is valid.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encapsulated_frames_come_back_out() {
        let frame = [0xffu8; 60];
        let p = encapsulate(&frame);
        assert_eq!(&p[..4], &[0x00, 0x00, 0x65, 0x58]);
        assert_eq!(decapsulate(&p).unwrap(), &frame[..]);
    }

    #[test]
    fn checksummed_packets_are_verified() {
        let frame = [1u8, 2, 3, 4, 5];
        let mut p = vec![0x80, 0x00, 0x65, 0x58, 0, 0, 0, 0];
        p.extend_from_slice(&frame);
        let c = internet_checksum(&p);
        p[4..6].copy_from_slice(&c.to_be_bytes());
        assert_eq!(decapsulate(&p).unwrap(), &frame[..]);
        p[9] ^= 0xff;
        assert_eq!(decapsulate(&p), Err(GreError::Checksum));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(decapsulate(&[0, 0, 0x65]), Err(GreError::Truncated(3)));
        assert_eq!(decapsulate(&[0, 1, 0x65, 0x58]), Err(GreError::Version(1)));
        assert_eq!(decapsulate(&[0x20, 0, 0x65, 0x58]), Err(GreError::Reserved), "key bit (RFC 1701)");
        assert_eq!(decapsulate(&[0, 0, 0x08, 0x00]), Err(GreError::Protocol(0x0800)));
        assert_eq!(decapsulate(&[0x80, 0, 0x65, 0x58, 0]), Err(GreError::Truncated(5)));
        // Bits 6-12 are ignored on receipt.
        assert_eq!(decapsulate(&[0x02, 0x00, 0x65, 0x58, 9]).unwrap(), &[9]);
    }
}

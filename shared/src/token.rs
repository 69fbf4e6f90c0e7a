//! Tunnel tokens: what lets a board open a public listener or a packet channel.
//!
//! The conductor mints a token for `(board, port, vpn, expiry)` with the wstun-agent's secret;
//! the tunnel server verifies it. Port 0 means "any port the server assigns" for a listener,
//! and is what a packet-channel token carries (with `vpn` set).
//!
//! Encoding: base64url (no padding) of
//! `version u8 = 1 | board_len u8 | board | port u16 | vpn_len u8 | vpn | expiry u64 | tag[32]`
//! (integers big-endian, expiry in Unix seconds), where `tag` is HMAC-SHA256 over everything
//! before it. Verification recomputes the tag and compares in constant time before trusting
//! any field.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Longest board id and vpn name a token can carry.
pub const MAX_NAME: usize = 128;
/// Longest encoded token accepted before decoding anything.
pub const MAX_TOKEN_LEN: usize = 512;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The board the channel belongs to.
    pub board: String,
    /// The public port, or 0: any port (server-assigned), or a packet channel.
    pub port: u16,
    /// For a packet channel: the VPN it joins.
    pub vpn: Option<String>,
    /// Unix seconds after which the token is refused.
    pub expiry: u64,
}

/// The HMAC key tokens are minted and verified with. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a token was refused. The text is safe to log and to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not valid base64url")]
    Encoding,
    #[error("token is malformed")]
    Malformed,
    #[error("token version {0} is not supported")]
    Version(u8),
    #[error("token signature does not match (forged, or minted with another secret)")]
    BadSignature,
    #[error("token expired at {expiry} (now {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("board id or vpn name longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("the secret is empty")]
    EmptyKey,
    #[error("a VPN token names no VPN")]
    EmptyVpn,
}

impl TokenKey {
    /// A key from secret bytes (e.g. a secret file's content, trimmed). Refuses an empty one.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<TokenKey, TokenError> {
        let s = secret.into();
        if s.is_empty() {
            return Err(TokenError::EmptyKey);
        }
        Ok(TokenKey(s))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// Mints a token for `claims`.
    pub fn mint(&self, claims: &Claims) -> Result<String, TokenError> {
        let vpn = claims.vpn.as_deref().unwrap_or("");
        if claims.board.len() > MAX_NAME || vpn.len() > MAX_NAME {
            return Err(TokenError::NameTooLong);
        }
        // An empty name is how a listener token says "no VPN": minted, a VPN token for ""
        // would verify as a listener token for port `claims.port`.
        if claims.vpn.as_deref() == Some("") {
            return Err(TokenError::EmptyVpn);
        }
        let mut body = Vec::with_capacity(16 + claims.board.len() + vpn.len() + TAG_LEN);
        body.push(VERSION);
        body.push(claims.board.len() as u8);
        body.extend_from_slice(claims.board.as_bytes());
        body.extend_from_slice(&claims.port.to_be_bytes());
        body.push(vpn.len() as u8);
        body.extend_from_slice(vpn.as_bytes());
        body.extend_from_slice(&claims.expiry.to_be_bytes());
        let mut mac = self.mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes());
        Ok(URL_SAFE_NO_PAD.encode(body))
    }

    /// Checks the signature, then the expiry against `now` (Unix seconds), and returns the
    /// claims. Whether they fit the request (board, port, vpn) is the caller's check.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD.decode(token.trim()).map_err(|_| TokenError::Encoding)?;
        if raw.len() < 1 + TAG_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = raw.split_at(raw.len() - TAG_LEN);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| TokenError::BadSignature)?;
        let claims = parse_body(body)?;
        if now > claims.expiry {
            return Err(TokenError::Expired { expiry: claims.expiry, now });
        }
        Ok(claims)
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], TokenError> {
    if r.len() < n {
        return Err(TokenError::Malformed);
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Ok(a)
}

fn parse_body(body: &[u8]) -> Result<Claims, TokenError> {
    let r = &mut &body[..];
    let version = take(r, 1)?[0];
    if version != VERSION {
        return Err(TokenError::Version(version));
    }
    let blen = take(r, 1)?[0] as usize;
    let board = std::str::from_utf8(take(r, blen)?).map_err(|_| TokenError::Malformed)?.to_owned();
    let p = take(r, 2)?;
    let port = u16::from_be_bytes([p[0], p[1]]);
    let vlen = take(r, 1)?[0] as usize;
    let vpn = std::str::from_utf8(take(r, vlen)?).map_err(|_| TokenError::Malformed)?.to_owned();
    let mut e = [0u8; 8];
    e.copy_from_slice(take(r, 8)?);
    if !r.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(Claims { board, port, vpn: (!vpn.is_empty()).then_some(vpn), expiry: u64::from_be_bytes(e) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vpn_token_must_name_a_vpn() {
        let k = super::TokenKey::new(b"k".to_vec()).unwrap();
        let claims = super::Claims { board: "b".into(), port: 0, vpn: Some(String::new()), expiry: 9 };
        assert!(matches!(k.mint(&claims), Err(super::TokenError::EmptyVpn)));
    }

    use super::*;

    fn claims() -> Claims {
        Claims { board: "3f1c9a52-0000-4000-8000-000000000001".into(), port: 50_022, vpn: None, expiry: 2_000 }
    }

    #[test]
    fn minted_tokens_verify_and_round_trip() {
        let k = TokenKey::new(b"s3cret".to_vec()).unwrap();
        let t = k.mint(&claims()).unwrap();
        assert_eq!(k.verify(&t, 1_999).unwrap(), claims());
        let with_vpn = Claims { port: 0, vpn: Some("vpn-a".into()), ..claims() };
        assert_eq!(k.verify(&k.mint(&with_vpn).unwrap(), 0).unwrap(), with_vpn);
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused() {
        let k = TokenKey::new(b"s3cret".to_vec()).unwrap();
        let t = k.mint(&claims()).unwrap();
        assert_eq!(k.verify(&t, 2_001), Err(TokenError::Expired { expiry: 2_000, now: 2_001 }));
        let other = TokenKey::new(b"other".to_vec()).unwrap();
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadSignature));
        // Flip one byte of the body: the signature no longer matches.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[3] ^= 1;
        assert_eq!(k.verify(&URL_SAFE_NO_PAD.encode(&raw), 0), Err(TokenError::BadSignature));
        assert_eq!(k.verify("!!!", 0), Err(TokenError::Encoding));
        assert_eq!(k.verify("", 0), Err(TokenError::Malformed));
        assert_eq!(k.verify(&"A".repeat(MAX_TOKEN_LEN + 1), 0), Err(TokenError::Malformed));
    }

    #[test]
    fn a_well_signed_but_malformed_body_is_refused() {
        let k = TokenKey::new(b"k".to_vec()).unwrap();
        let mut body = vec![VERSION, 200, b'x'];
        let mut mac = k.mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(k.verify(&URL_SAFE_NO_PAD.encode(&body), 0), Err(TokenError::Malformed));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = TokenKey::new(b"hunter2".to_vec()).unwrap();
        assert!(!format!("{k:?}").contains("hunter2"));
        assert!(TokenKey::new(Vec::new()).is_err());
    }
}

//! WAMP authentication helpers: ticket and WAMP-CRA (salted), as autobahn and crossbar do
//! them.
//!
//! WAMP-CRA with a salt: the shared key is `base64(PBKDF2-HMAC-SHA256(secret, salt,
//! iterations, keylen))`, and the signature of a challenge string is
//! `base64(HMAC-SHA256(key, challenge))`, where the key is used as its base64 text. The router
//! stores only the derived key ([`CraCredential`]); the board keeps the secret.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;

use super::message::{Dict, Id};

/// PBKDF2 iterations for new board credentials. The secrets are random (not passwords), so
/// stretching adds little; autobahn's default keeps clients on small boards fast.
pub const DEFAULT_ITERATIONS: u32 = 1000;
/// Derived key length in bytes (autobahn's default).
pub const DEFAULT_KEYLEN: u32 = 32;
/// The most PBKDF2 work a client accepts from a challenge, in iterations times 32-byte blocks
/// of key: a hostile router must not be able to make a board spin (PBKDF2 runs every
/// iteration once per block; a million iterations of a 256-byte key took eight times a
/// million, a minute on a small board, on the agent's one thread). Autobahn's and our default
/// is 1,000 iterations of one block.
pub const MAX_DERIVATION_WORK: u64 = 100_000;
/// The largest derived key a client accepts to compute.
pub const MAX_KEYLEN: u64 = 256;
/// The shortest derived key a client accepts: the signature of a challenge is keyed by it, so
/// a router that asks for a key of 1 byte, then 2, ... learns the board's derived key (which
/// logs in as the board) one byte at a time, 256 guesses each.
pub const MIN_KEYLEN: u64 = 16;

/// A secret (ticket, board secret, derived key). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison.
    pub fn ct_eq(&self, other: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), other.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// What the router stores for a WAMP-CRA identity: the salted derived key, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CraCredential {
    pub salt: String,
    pub iterations: u32,
    pub keylen: u32,
    /// `base64(PBKDF2(secret, salt, iterations, keylen))`.
    pub derived_key: Secret,
}

impl CraCredential {
    /// Derives the stored credential for `secret` with a fresh random salt.
    pub fn derive(secret: &Secret) -> CraCredential {
        let salt_bytes: [u8; 16] = rand::rng().random();
        let salt = B64.encode(salt_bytes);
        let derived_key = derive_key(secret, &salt, DEFAULT_ITERATIONS, DEFAULT_KEYLEN);
        CraCredential { salt, iterations: DEFAULT_ITERATIONS, keylen: DEFAULT_KEYLEN, derived_key }
    }

    /// What a router challenges an unknown `authid` with, so that a peer cannot tell unknown
    /// identities from known ones before it answers: a salt that looks like a real one and
    /// stays the same for the same `authid` and `key` (a real board's salt does not change
    /// between attempts), the default parameters, and a random derived key no signature
    /// matches.
    pub fn decoy(key: &Secret, authid: &str) -> CraCredential {
        let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()).expect("HMAC accepts keys of any length");
        mac.update(authid.as_bytes());
        let salt = B64.encode(&mac.finalize().into_bytes()[..16]);
        let derived: [u8; 32] = rand::rng().random();
        CraCredential {
            salt,
            iterations: DEFAULT_ITERATIONS,
            keylen: DEFAULT_KEYLEN,
            derived_key: Secret(B64.encode(derived)),
        }
    }

    /// True when `signature` signs `challenge` with this credential.
    pub fn verify(&self, challenge: &str, signature: &str) -> bool {
        verify_signature(&self.derived_key, challenge, signature)
    }
}

/// `base64(PBKDF2-HMAC-SHA256(secret, salt, iterations, keylen))`, as autobahn's `derive_key`.
pub fn derive_key(secret: &Secret, salt: &str, iterations: u32, keylen: u32) -> Secret {
    let mut key = vec![0u8; keylen as usize];
    pbkdf2::pbkdf2_hmac::<Sha256>(secret.expose().as_bytes(), salt.as_bytes(), iterations, &mut key);
    Secret(B64.encode(key))
}

/// `base64(HMAC-SHA256(key, challenge))`, as autobahn's `compute_wcs`.
pub fn sign(key: &Secret, challenge: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(challenge.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// Constant-time check of a WAMP-CRA signature.
pub fn verify_signature(key: &Secret, challenge: &str, signature: &str) -> bool {
    let Ok(sig) = B64.decode(signature.trim()) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(challenge.as_bytes());
    mac.verify_slice(&sig).is_ok()
}

/// Who a challenge is for.
#[derive(Debug, Clone)]
pub struct ChallengeFor<'a> {
    pub authid: &'a str,
    pub authrole: &'a str,
    pub authprovider: &'a str,
    pub session: Id,
}

/// Builds the WAMP-CRA challenge string (a JSON object) and the CHALLENGE extra dict.
pub fn cra_challenge(who: &ChallengeFor<'_>, cred: &CraCredential, now: SystemTime) -> (String, Dict) {
    let nonce_bytes: [u8; 16] = rand::rng().random();
    let challenge = json!({
        "authid": who.authid,
        "authrole": who.authrole,
        "authmethod": "wampcra",
        "authprovider": who.authprovider,
        "nonce": B64.encode(nonce_bytes),
        "timestamp": iso8601(now),
        "session": who.session,
    })
    .to_string();
    let mut extra = Dict::new();
    extra.insert("challenge".into(), Value::String(challenge.clone()));
    extra.insert("salt".into(), Value::String(cred.salt.clone()));
    extra.insert("iterations".into(), cred.iterations.into());
    extra.insert("keylen".into(), cred.keylen.into());
    (challenge, extra)
}

/// Why a client refuses to answer a WAMP-CRA challenge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChallengeError {
    #[error("CHALLENGE without a challenge string")]
    MissingChallenge,
    #[error("CHALLENGE asks for unacceptable key derivation ({0})")]
    BadDerivation(String),
}

/// Salting parameters announced in a CHALLENGE, if any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Salting {
    pub salt: String,
    pub iterations: u32,
    pub keylen: u32,
}

/// Whether deriving a key of `keylen` bytes with `iterations` stays within [`MAX_KEYLEN`] and
/// [`MAX_DERIVATION_WORK`] (PBKDF2 runs every iteration once per 32-byte block of key).
pub fn derivation_bounded(iterations: u64, keylen: u64) -> bool {
    keylen <= MAX_KEYLEN && iterations.saturating_mul(keylen.div_ceil(32)) <= MAX_DERIVATION_WORK
}

/// Reads the challenge string and the optional salting parameters from a CHALLENGE extra.
pub fn read_cra_challenge(extra: &Dict) -> Result<(&str, Option<Salting>), ChallengeError> {
    let challenge = extra.get("challenge").and_then(Value::as_str).ok_or(ChallengeError::MissingChallenge)?;
    let Some(salt) = extra.get("salt") else { return Ok((challenge, None)) };
    let salt = salt.as_str().ok_or_else(|| ChallengeError::BadDerivation("salt is not a string".into()))?;
    let iterations = extra.get("iterations").and_then(Value::as_u64).unwrap_or(1000);
    let keylen = extra.get("keylen").and_then(Value::as_u64).unwrap_or(32);
    if iterations == 0 || keylen < MIN_KEYLEN || !derivation_bounded(iterations, keylen) {
        return Err(ChallengeError::BadDerivation(format!("iterations {iterations}, keylen {keylen}")));
    }
    Ok((challenge, Some(Salting { salt: salt.to_owned(), iterations: iterations as u32, keylen: keylen as u32 })))
}

/// UTC time as ISO 8601 with milliseconds, e.g. `2014-06-22T16:36:25.448Z`.
pub fn iso8601(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn derive_and_sign_match_autobahn() {
        // Vectors computed with autobahn 26.10.2:
        //   derive_key("secret123", "salt123", 1000, 32)
        //   compute_wcs(key, "challenge")
        let key = derive_key(&Secret::new("secret123"), "salt123", 1000, 32);
        assert_eq!(key.expose(), "Eu7CQLfR+/Ffb+275A4s9/6H/RGKYxM4s6IMrsNKzC8=");
        assert_eq!(sign(&key, "challenge"), "+JFh6T23kY53ywZTfp5kaIX6SJK6NbLXSU8arKiIWsw=");
    }

    #[test]
    fn verify_accepts_only_the_right_signature() {
        let cred = CraCredential::derive(&Secret::new("s3cret"));
        let key = derive_key(&Secret::new("s3cret"), &cred.salt, cred.iterations, cred.keylen);
        let sig = sign(&key, "{\"nonce\":\"x\"}");
        assert!(cred.verify("{\"nonce\":\"x\"}", &sig));
        assert!(!cred.verify("{\"nonce\":\"y\"}", &sig));
        assert!(!cred.verify("{\"nonce\":\"x\"}", "not base64!"));
        let wrong = derive_key(&Secret::new("other"), &cred.salt, cred.iterations, cred.keylen);
        assert!(!cred.verify("{\"nonce\":\"x\"}", &sign(&wrong, "{\"nonce\":\"x\"}")));
    }

    #[test]
    fn challenge_carries_identity_and_salting() {
        let cred = CraCredential::derive(&Secret::new("s"));
        let who = ChallengeFor { authid: "b1", authrole: "board", authprovider: "s4t", session: 42 };
        let (challenge, extra) = cra_challenge(&who, &cred, UNIX_EPOCH + Duration::from_millis(1_403_455_001_643));
        let parsed: Value = serde_json::from_str(&challenge).unwrap();
        assert_eq!(parsed["authid"], "b1");
        assert_eq!(parsed["session"], 42);
        assert_eq!(parsed["timestamp"], "2014-06-22T16:36:41.643Z");
        let (c, salting) = read_cra_challenge(&extra).unwrap();
        assert_eq!(c, challenge);
        assert_eq!(salting.unwrap().salt, cred.salt);
    }

    #[test]
    fn hostile_derivation_parameters_are_refused() {
        let mut extra = Dict::new();
        extra.insert("challenge".into(), "c".into());
        extra.insert("salt".into(), "s".into());
        let refused = |extra: &Dict| matches!(read_cra_challenge(extra), Err(ChallengeError::BadDerivation(_)));
        extra.insert("iterations".into(), (MAX_DERIVATION_WORK + 1).into());
        assert!(refused(&extra));
        // The work is iterations times 32-byte blocks: a long key counts each block.
        extra.insert("iterations".into(), (MAX_DERIVATION_WORK / 8 + 1).into());
        extra.insert("keylen".into(), MAX_KEYLEN.into());
        assert!(refused(&extra), "the key's blocks are not counted");
        extra.insert("iterations".into(), 10.into());
        // A short key lets a router learn the derived key byte by byte (`MIN_KEYLEN`).
        for keylen in [0, 1, 2, MIN_KEYLEN - 1] {
            extra.insert("keylen".into(), keylen.into());
            assert!(refused(&extra), "keylen {keylen}");
        }
        extra.insert("keylen".into(), 32.into());
        extra.insert("iterations".into(), 1000.into());
        assert!(read_cra_challenge(&extra).is_ok(), "autobahn's defaults");
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let cred = CraCredential { salt: "x".into(), iterations: 1, keylen: 1, derived_key: Secret::new("dk-value") };
        assert!(!format!("{cred:?}").contains("dk-value"));
        assert!(s.ct_eq("hunter2") && !s.ct_eq("hunter3") && !s.ct_eq("hunter"));
    }
}

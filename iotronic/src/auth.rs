//! Passwords (argon2), bearer tokens (random, stored as SHA-256) and the admin bootstrap.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::db::{Db, Role, now_ms};

/// How long a token is valid (a caller may ask for less with `"ttl"`).
pub const TOKEN_TTL_MS: i64 = 12 * 3600 * 1000;
/// How long a board's one-time registration code works when nobody said otherwise.
pub const CODE_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// Longest password a user may have (bytes): hashing and verifying cost time in its length, and
/// the token endpoint refuses longer ones before any work.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The argon2 PHC string of `password` (at most [`MAX_PASSWORD_BYTES`]).
pub fn hash_password(password: &str) -> Result<String, Error> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::Invalid(format!("the password must have at most {MAX_PASSWORD_BYTES} bytes")));
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Invalid(format!("cannot hash the password: {e}")))
}

/// The hash an unknown user name is checked against: of a random password no one knows, made
/// once with the parameters every password gets, so checking it costs what a real one does.
fn unknown_user_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(&random_secret()).unwrap_or_default())
}

/// Password checks running at once, cloud-wide: each takes argon2's 19 MiB and a core for a
/// while, and the per-name and per-address throttles do not bound how many run at once
/// (distinct names from many addresses: up to the 512 blocking threads, some 10 GiB). The
/// rest wait their turn.
static PASSWORD_CHECKS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
});

/// Runs `f` on the blocking pool once `limit` has a permit for it; `None` if it panicked.
async fn limited_blocking<T: Send + 'static>(
    limit: &tokio::sync::Semaphore,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let _permit = limit.acquire().await.ok()?;
    tokio::task::spawn_blocking(f).await.ok()
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A fresh random secret: 32 bytes, URL-safe base64.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database stores for a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token just issued. `Debug` hides the token itself.
pub struct IssuedToken {
    pub token: String,
    pub expires_at: i64,
    pub project: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("expires_at", &self.expires_at).field("project", &self.project).finish()
    }
}

/// Checks a user's password and issues a token scoped to `project` (or the user's first
/// project). Every failure is the same 401, so names cannot be probed.
pub async fn issue_token(db: &Db, username: &str, password: &str, project: Option<&str>) -> Result<IssuedToken, Error> {
    issue_token_for(db, username, password, project, TOKEN_TTL_MS).await
}

/// [`issue_token`] with a lifetime of `ttl_ms` (capped at [`TOKEN_TTL_MS`]).
pub async fn issue_token_for(
    db: &Db,
    username: &str,
    password: &str,
    project: Option<&str>,
    ttl_ms: i64,
) -> Result<IssuedToken, Error> {
    let denied = || Error::Unauthorized("wrong user name or password".into());
    let user = db.user_by_name(username).await?;
    // An unknown name costs the same argon2 verification as a known one: a quicker 401 would
    // tell which names exist.
    let hash = user.as_ref().map_or_else(|| unknown_user_hash().to_owned(), |u| u.password_hash.clone());
    let password = password.to_owned();
    let ok = limited_blocking(&PASSWORD_CHECKS, move || verify_password(&password, &hash)).await.unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else { return Err(denied()) };
    let memberships = db.memberships(&user.uuid).await?;
    let chosen = match project {
        Some(p) => memberships.iter().find(|(proj, _)| proj.name == p || proj.uuid == p),
        None => memberships.first(),
    };
    let Some((proj, _)) = chosen else {
        return Err(Error::Unauthorized(match project {
            Some(p) => format!("user {username} is not a member of project {p}"),
            None => format!("user {username} belongs to no project"),
        }));
    };
    let token = random_secret();
    let expires_at = now_ms() + ttl_ms.clamp(1000, TOKEN_TTL_MS);
    db.insert_token(&token_hash(&token), &user.uuid, &proj.uuid, expires_at).await?;
    Ok(IssuedToken { token, expires_at, project: proj.name.clone() })
}

/// On first start (no users yet) creates project `admin` and user `admin` with `password`, or
/// with a generated one. Returns the generated password so the caller prints it once.
pub async fn bootstrap_admin(db: &Db, password: Option<&str>) -> Result<Option<String>, Error> {
    if db.count_users().await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match password {
        Some(p) if !p.is_empty() => (p.to_owned(), false),
        _ => (random_secret(), true),
    };
    // Several processes may start at once on one database: whoever loses a race reads back.
    let project = match db.project("admin").await? {
        Some(p) => p,
        None => match db.create_project("admin").await {
            Ok(p) => p,
            Err(Error::Conflict(_)) => {
                db.project("admin").await?.ok_or_else(|| Error::NotFound("project admin vanished".into()))?
            }
            Err(e) => return Err(e),
        },
    };
    let hash = tokio::task::spawn_blocking(move || hash_password(&password).map(|h| (h, password)))
        .await
        .map_err(|e| Error::Invalid(format!("password hashing task failed: {e}")))??;
    let user = match db.create_user("admin", &hash.0, true).await {
        Ok(u) => u,
        // Another process bootstrapped at the same time: theirs wins.
        Err(Error::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    db.set_membership(&user.uuid, &project.uuid, Role::Admin).await?;
    Ok(generated.then_some(hash.1))
}

/// A failure-driven throttle: every key (a user name, a peer address, or one key for all
/// enrollment codes) has a bucket of `burst` attempts that refills at `per_second`. A failed
/// attempt takes one; success takes none, so legitimate users are never slowed down, while a
/// guesser gets `burst` tries and then `per_second` tries per second. The map is bounded, in
/// keys ([`THROTTLE_KEYS`]) and in bytes: keys are stored as their SHA-256, whatever their
/// length (a key may come from the network: a user name of a request body).
pub struct Throttle {
    buckets: std::sync::Mutex<std::collections::HashMap<KeyDigest, Bucket>>,
    burst: f64,
    per_second: f64,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("burst", &self.burst).field("per_second", &self.per_second).finish()
    }
}

/// Most keys a throttle remembers; beyond that, keys whose bucket has refilled are forgotten
/// and, if that is not enough, new keys share one bucket (an attacker spraying addresses gains
/// nothing but throttles himself).
const THROTTLE_KEYS: usize = 16_384;

/// What a throttle stores of a key: its SHA-256.
type KeyDigest = [u8; 32];

/// The bucket new keys share beyond [`THROTTLE_KEYS`]: no key hashes to all zeros.
const OVERFLOW_KEY: KeyDigest = [0; 32];

fn key_digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

impl Throttle {
    pub fn new(burst: u32, per_second: f64) -> Throttle {
        Throttle {
            buckets: std::sync::Mutex::new(std::collections::HashMap::new()),
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(1e-6),
        }
    }

    /// Takes one attempt for `key`: Ok if it may try now (the attempt counts as a failure
    /// until [`Throttle::refund`] says it succeeded), otherwise the seconds to wait. Taking
    /// before trying, under the lock, keeps concurrent guessers within the budget.
    pub fn take(&self, key: &str) -> Result<(), u64> {
        let now = std::time::Instant::now();
        let key = key_digest(key);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= THROTTLE_KEYS {
            let (burst, rate) = (self.burst, self.per_second);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let key = if !map.contains_key(&key) && map.len() >= THROTTLE_KEYS { OVERFLOW_KEY } else { key };
        let b = map.entry(key).or_insert(Bucket { tokens: self.burst, at: now });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }

    /// The attempt taken for `key` succeeded: it does not count.
    pub fn refund(&self, key: &str) {
        let key = key_digest(key);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get_mut(&key) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }

    fn refill(&self, b: &mut Bucket, now: std::time::Instant) {
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_second).min(self.burst);
        b.at = now;
    }
}

/// The throttles of the token endpoint: per user name (lock-out after 5 failures, then one
/// try every 30 s) and per peer address (20 failures, then 1 per second).
#[derive(Debug)]
pub struct LoginThrottle {
    pub per_user: Throttle,
    pub per_peer: Throttle,
    /// How many attempts refused before any check (throttled, oversized) each peer gets into
    /// the audit log: 10, then one a minute. They cost the sender nothing, so recording each
    /// would let anyone grow the audit table at the rate they can send; the rest are counted
    /// by `/metrics` (`iotronic_http_responses_total`, 400 and 429).
    pub audited_refusals: Throttle,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            per_user: Throttle::new(5, 1.0 / 30.0),
            per_peer: Throttle::new(20, 1.0),
            audited_refusals: Throttle::new(10, 1.0 / 60.0),
        }
    }
}

/// The throttle of enrollment codes, one bucket for the whole agent (WAMP does not tell us
/// the peer): 20 failures, then 2 per second. A board with a valid code is refused only while
/// somebody is guessing, and its enrollment is retried by the operator or the agent's backoff.
pub fn enrollment_throttle() -> Throttle {
    Throttle::new(20, 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown name is checked against a real argon2 hash with the parameters of every
    /// password (an unparsable one would be refused at once, telling unknown names apart).
    /// However many checks are asked for at once, no more than the limit run at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_checks_run_a_few_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let limit = tokio::sync::Semaphore::new(3);
        let (now, most) = (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
        let checks = (0..24).map(|_| {
            let (now, most) = (now.clone(), most.clone());
            limited_blocking(&limit, move || {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                now.fetch_sub(1, Ordering::SeqCst);
            })
        });
        assert_eq!(futures_util::future::join_all(checks).await.len(), 24);
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} ran at once");
    }

    #[test]
    fn unknown_names_cost_a_real_verification() {
        let dummy = PasswordHash::new(unknown_user_hash()).expect("a PHC string");
        let real_hash = hash_password("a real password").unwrap();
        let real = PasswordHash::new(&real_hash).unwrap();
        assert_eq!((dummy.algorithm, dummy.version), (real.algorithm, real.version));
        assert_eq!(dummy.params, real.params);
        assert!(!verify_password("", unknown_user_hash()) && !verify_password("a real password", unknown_user_hash()));
    }

    #[test]
    fn throttle_allows_a_burst_then_refills() {
        let t = Throttle::new(3, 1000.0);
        for _ in 0..3 {
            assert!(t.take("k").is_ok());
        }
        assert!(t.take("other").is_ok(), "keys are independent");
        let slow = Throttle::new(2, 0.01);
        assert!(slow.take("u").is_ok() && slow.take("u").is_ok());
        assert_eq!(slow.take("u"), Err(100));
        slow.refund("u");
        assert!(slow.take("u").is_ok(), "a success gives its attempt back");
        // Refills with time (1000/s: one token within a few ms).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while t.take("k").is_err() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
    }

    #[test]
    fn throttle_is_bounded() {
        let t = Throttle::new(1, 1e-6);
        for i in 0..THROTTLE_KEYS + 10 {
            assert!(t.take(&format!("peer{i}")).is_ok() || i >= THROTTLE_KEYS);
        }
        assert!(t.buckets.lock().unwrap().len() <= THROTTLE_KEYS + 1);
        assert!(t.take("peer-new").is_err(), "beyond the bound, new keys share the overflow bucket");
    }

    /// Bytes the keys of `t` hold (the map's own slots aside).
    fn key_bytes(t: &Throttle) -> usize {
        t.buckets.lock().unwrap().keys().map(|k| std::mem::size_of_val::<[u8]>(k.as_ref())).sum()
    }

    #[test]
    fn throttle_memory_is_bounded_for_long_keys() {
        // Keys may be user names from request bodies: 64 different 1 MiB names must not make
        // the throttle hold 64 MiB (a 2 MB body per request would otherwise fill 16,384 keys).
        let t = Throttle::new(5, 1e-6);
        let long = "x".repeat(1 << 20);
        for i in 0..64 {
            assert!(t.take(&format!("user:{i}{long}")).is_ok());
        }
        assert_eq!(t.buckets.lock().unwrap().len(), 64, "long keys stay distinct");
        assert!(key_bytes(&t) <= 64 * 32, "keys hold {} bytes", key_bytes(&t));
        // Still one bucket per key: refunds and lock-outs find their key.
        let k = format!("user:0{long}");
        t.refund(&k);
        for _ in 0..5 {
            assert!(t.take(&k).is_ok());
        }
        assert!(t.take(&k).is_err());
    }

    #[test]
    fn passwords_verify_and_tokens_hash() {
        let h = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a phc string"));
        assert!(matches!(hash_password(&"p".repeat(MAX_PASSWORD_BYTES + 1)), Err(Error::Invalid(_))));
        assert_eq!(token_hash("abc").len(), 64);
        assert_ne!(random_secret(), random_secret());
    }
}

//! The cloud's TLS (security issue): HTTPS for REST, WSS for WAMP and tunnels, one rustls
//! (ring) server configuration shared by the three listeners.
//!
//! Trust is pinned, not public: on first start the cloud creates its own CA (ECDSA P-256) in
//! the data directory and a server certificate signed by it; boards and `s4t` trust exactly
//! that CA, named by the SHA-256 fingerprint of its DER certificate (`sha256:HEX`), which
//! `iotronic serve` prints and writes to `DATA_DIR/ca.fingerprint`. Later starts reuse both;
//! the server certificate is re-issued by the same CA when the names it must carry change
//! (another `--bind` or `--public-host`), or when it is not its key's or does not chain to the
//! CA, so the pin never changes. Processes sharing the data directory (a split cloud) make and
//! read these files under a lock, so they all serve the one CA. With `--tls-cert` and
//! `--tls-key` the operator's chain is served instead, and the pin is the last certificate of
//! that chain (its CA, or the certificate itself when it is alone).
//!
//! Files (keys 0600, written atomically): `ca.crt`, `ca.key`, `server.crt`, `server.key`,
//! `server.names` (the names in `server.crt`), `ca.fingerprint`, and the lock `.tls.lock`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use crate::{Error, ServeConfig};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const SERVER_NAMES: &str = "server.names";
pub const FINGERPRINT: &str = "ca.fingerprint";

/// The CA's subject. Fixed, so that a server certificate issued on a later start names the
/// same issuer as the stored CA certificate (rcgen signs with the name and key, not the file).
const CA_NAME: &str = "Stack4Things cloud CA";
/// Validity of the CA and of the server certificates it issues. Long on purpose: the CA is
/// pinned on every board like an SSH host key, and an expired server certificate would cut
/// every board off a cloud that has not been restarted. Rotation is explicit (new files,
/// boards re-pinned at their next enrollment).
const CA_YEARS: i32 = 30;
const SERVER_YEARS: i32 = 10;

/// Longest a client may take over its TLS handshake on the REST port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on the REST port; more wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;
/// TLS handshakes one source address may have in progress; more are closed at once. One
/// peer could otherwise hold all of [`MAX_HANDSHAKES`] with idle sockets, renewed every
/// [`HANDSHAKE_TIMEOUT`], and the REST port accepted nobody else.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Handshaken connections waiting for axum to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// What the three listeners serve, and the pin clients must use.
#[derive(Clone)]
pub struct CloudTls {
    pub server: Arc<rustls::ServerConfig>,
    /// `sha256:HEX` of the pinned certificate (the CA).
    pub fingerprint: String,
}

impl std::fmt::Debug for CloudTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudTls").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

fn msg(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Tls { context: context.into(), source: source.into() }
}

/// `sha256:` and the lowercase hex SHA-256 of a DER certificate (the form boards and `s4t`
/// take with `--ca-fingerprint`).
pub use wstunnel::tls::fingerprint_of;

/// The TLS set-up of `config`: `None` with `--plaintext`; otherwise the operator's chain or the
/// cloud's own CA (created on first start). Writes `DATA_DIR/ca.fingerprint` either way.
pub fn set_up(config: &ServeConfig) -> Result<Option<CloudTls>, Error> {
    if config.plaintext {
        return Ok(None);
    }
    let (chain, key) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => operator_chain(cert, key)?,
        (None, None) => own_ca(&config.data_dir, &server_names(config))?,
        _ => {
            return Err(msg(
                "operator certificate",
                "give both --tls-cert and --tls-key (or neither: the cloud's own CA)",
            ));
        }
    };
    let pinned =
        chain.last().ok_or_else(|| msg("operator certificate", "the certificate file holds no certificate"))?;
    let fingerprint = fingerprint_of(pinned);
    let server = server_config(chain, key)?;
    crate::serve::create_data_dir(&config.data_dir)?;
    write_atomic(&config.data_dir.join(FINGERPRINT), format!("{fingerprint}\n").as_bytes(), 0o644)?;
    Ok(Some(CloudTls { server, fingerprint }))
}

/// The rustls (ring) server configuration for a chain and its key; HTTP/1.1 only.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = wstunnel::tls::provider();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| msg("server configuration", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| msg("the certificate and key do not make a server configuration", e))?;
    Ok(Arc::new(config))
}

/// The names the server certificate carries: the public host boards dial, the bind address,
/// this host's name and the loopback names.
pub fn server_names(config: &ServeConfig) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |n: String| {
        let n = n.trim().trim_start_matches('[').trim_end_matches(']').to_owned();
        if !n.is_empty() && !names.contains(&n) {
            names.push(n);
        }
    };
    if let Some(h) = &config.public_host {
        add(h.clone());
    }
    if !config.bind.is_unspecified() {
        add(config.bind.to_string());
    }
    add(config.public_host());
    if config.boards_dial_back() {
        // Boards may dial any address of this host (and are answered with URLs of the one
        // they dialed): the certificate names them all.
        for a in local_addresses() {
            add(a.to_string());
        }
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        add(h);
    }
    for n in ["localhost", "127.0.0.1", "::1"] {
        add(n.to_owned());
    }
    names
}

/// The addresses of this host's interfaces (IPv6 link-local ones left out: they need a zone).
fn local_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        if a.segments()[0] & 0xffc0 != 0xfe80 {
                            out.push(std::net::IpAddr::V6(a));
                        }
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.sort();
    out.dedup();
    out
}

/// The operator's PEM chain (leaf first) and key.
fn operator_chain(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| msg(format!("cannot read {}", cert.display()), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| msg(format!("{} is not a PEM certificate chain", cert.display()), e))?;
    if chain.is_empty() {
        return Err(msg(format!("{}", cert.display()), "no certificate in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| msg(format!("cannot read the key {}", key.display()), e))?;
    Ok((chain, key))
}

/// The CA's parameters: the same on every start, so certificates issued later chain to it.
fn ca_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "Stack4Things");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p
}

/// The current calendar year (UTC), for validity periods.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Days to a civil year (Howard Hinnant's algorithm, year part only).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400 + i64::from(mp >= 10);
    year as i32
}

fn validity(p: &mut rcgen::CertificateParams, years: i32) {
    let y = this_year();
    // From a year back: a board whose clock is behind still accepts the certificate.
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + years, 1, 1);
}

fn random_serial(p: &mut rcgen::CertificateParams) {
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial);
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| msg(what.to_owned(), e)
}

/// The cloud's own CA in `dir` (created when absent) and a server certificate for `names`
/// (re-issued when the stored one carries other names, is not the stored key's, or does not
/// chain to the CA).
///
/// The processes of a split cloud (`iotronic@api`, `@wamp-agent`, `@wstun-agent`) share the
/// data directory and start together, so all of this runs under an exclusive lock on
/// `DATA_DIR/.tls.lock`: one of them makes the CA (or a new server certificate), the others
/// wait and then read what it wrote. Unlocked, each made a CA of its own, the processes served
/// different pins, and the files left behind could pair one process's key with another's
/// certificate, which rustls then refused at every start.
fn own_ca(dir: &Path, names: &[String]) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    crate::serve::create_data_dir(dir)?;
    let _lock = lock(dir)?;
    let (ca_crt, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    // Checked under the lock: a process that waited sees the CA the first one made.
    let (ca_der, ca_keypair) = if ca_crt.exists() || ca_key.exists() {
        crate::serve::warn_if_readable(&ca_key, "600");
        let der =
            CertificateDer::from_pem_file(&ca_crt).map_err(|e| msg(format!("cannot read {}", ca_crt.display()), e))?;
        let pem = read(&ca_key)?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(rcgen_err("the CA key"))?;
        // A server certificate signed with another key would not verify under the pin the
        // boards hold: say so instead of serving it.
        key_matches(&der, PrivateKeyDer::Pkcs8(key.serialize_der().into())).map_err(|e| {
            msg(
                format!(
                    "{} does not match {}: restore the pair from a backup, or remove both to make a new CA \
                     (every board and s4t must then pin its new fingerprint)",
                    ca_key.display(),
                    ca_crt.display()
                ),
                e,
            )
        })?;
        (der, key)
    } else {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("CA key"))?;
        let mut params = ca_params();
        validity(&mut params, CA_YEARS);
        random_serial(&mut params);
        let cert = params.self_signed(&key).map_err(rcgen_err("CA certificate"))?;
        // Key first: a crash in between leaves a key without a certificate, which the next
        // start reports instead of silently making another CA.
        write_atomic(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&ca_crt, cert.pem().as_bytes(), 0o644)?;
        (cert.der().clone(), key)
    };
    let (crt, key, names_file) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY), dir.join(SERVER_NAMES));
    let wanted = names.join("\n") + "\n";
    let current = std::fs::read_to_string(&names_file).ok();
    let stored =
        if current.as_deref() == Some(wanted.as_str()) { stored_leaf(&crt, &key, &ca_der, names) } else { None };
    let (leaf, leaf_key) = match stored {
        Some(pair) => pair,
        None => {
            let leaf_key =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("server key"))?;
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = names.iter().filter_map(|n| san(n)).collect();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(rcgen::DnType::CommonName, names.first().map_or("iotronic", String::as_str));
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            validity(&mut params, SERVER_YEARS);
            random_serial(&mut params);
            let issuer = rcgen::Issuer::new(ca_params(), ca_keypair);
            let cert = params.signed_by(&leaf_key, &issuer).map_err(rcgen_err("server certificate"))?;
            write_atomic(&key, leaf_key.serialize_pem().as_bytes(), 0o600)?;
            write_atomic(&crt, cert.pem().as_bytes(), 0o644)?;
            write_atomic(&names_file, wanted.as_bytes(), 0o644)?;
            (cert.der().clone(), PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()))
        }
    };
    crate::serve::warn_if_readable(&key, "600");
    Ok((vec![leaf, ca_der], leaf_key))
}

/// The lock file of [`own_ca`], in the data directory.
const TLS_LOCK: &str = ".tls.lock";

/// An exclusive `flock` on `dir/.tls.lock`, held until the returned file is dropped (or the
/// process dies). The file stays: removing it would let the next two processes lock two
/// different files.
fn lock(dir: &Path) -> Result<std::fs::File, Error> {
    let path = dir.join(TLS_LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| msg(format!("cannot open {}", path.display()), e))?;
    file.lock().map_err(|e| msg(format!("cannot lock {}", path.display()), e))?;
    Ok(file)
}

/// Whether `key` is the private key of `cert` (the check rustls makes when it loads a pair).
fn key_matches(cert: &CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<(), rustls::Error> {
    rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key, &wstunnel::tls::provider()).map(drop)
}

/// The stored server certificate and key, when both load, belong together and the
/// certificate verifies under `ca` for the first of `names` a client could dial (an expired
/// one does not). Anything else is re-issued: a pair left mismatched by a crash between its
/// two writes, or by an older cloud that wrote it unlocked, would otherwise be refused by
/// rustls at every start.
fn stored_leaf(
    crt: &Path,
    key: &Path,
    ca: &CertificateDer<'static>,
    names: &[String],
) -> Option<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let leaf = CertificateDer::from_pem_file(crt).ok()?;
    let leaf_key = PrivateKeyDer::from_pem_file(key).ok()?;
    if let Err(e) = key_matches(&leaf, leaf_key.clone_key()) {
        warn!(cause = %e, path = %key.display(), "the server key is not the server certificate's: issuing a new pair");
        return None;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).ok()?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), wstunnel::tls::provider())
            .build()
            .ok()?;
    let name = names.iter().find_map(|n| rustls::pki_types::ServerName::try_from(n.as_str()).ok())?;
    let now = rustls::pki_types::UnixTime::now();
    if let Err(e) =
        rustls::client::danger::ServerCertVerifier::verify_server_cert(&*verifier, &leaf, &[], &name, &[], now)
    {
        warn!(cause = %e, path = %crt.display(), "the server certificate does not verify under the CA: issuing a new one");
        return None;
    }
    Some((leaf, leaf_key))
}

fn san(name: &str) -> Option<rcgen::SanType> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(rcgen::SanType::IpAddress(ip));
    }
    match rcgen::string::Ia5String::try_from(name) {
        Ok(dns) => Some(rcgen::SanType::DnsName(dns)),
        Err(_) => {
            warn!(name, "not a DNS name: left out of the server certificate");
            None
        }
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| msg(format!("cannot read {}", path.display()), e))
}

/// Writes a file atomically with `mode` (temporary file, fsync, rename).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    // The temporary file is this call's own (process id and a counter): two writers of one
    // file, threads or processes, never write into or rename away each other's.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp{}.{n}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        msg(format!("cannot write {}", path.display()), e)
    })
}

/// A TLS listener for axum: TCP accepts on one task, each handshake on its own task (under
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once), handshaken connections queued
/// for `accept`. A client speaking plain HTTP gets a 400 that says to use https, then the close.
/// Dropping the listener stops the accept task and closes the port.
pub struct TlsListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(accept_loop(listener, tokio_rustls::TlsAcceptor::from(config), tx));
        Ok(TlsListener { local, accepted })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_source = crate::listen::SourceSlots::new(MAX_HANDSHAKES_PER_SOURCE);
    loop {
        let permit = tokio::select! {
            () = tx.closed() => return,
            p = slots.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { return };
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(source) = per_source.take(peer.ip()) else {
            debug!(%peer, "too many TLS handshakes from this address: closed");
            continue; // dropping `tcp` closes it, dropping `permit` frees its slot
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _source = source;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp)).await {
                Ok(Some(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(None) => {}
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn handshake(acceptor: &tokio_rustls::TlsAcceptor, mut tcp: TcpStream) -> Option<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] != TLS_HANDSHAKE => {
            let body =
                "this port speaks HTTPS only: use https:// (and pin the cloud's CA, see DATA_DIR/ca.fingerprint)\n";
            let reply = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(reply.as_bytes()).await;
            let _ = tcp.shutdown().await;
            return None;
        }
        Ok(1) => {}
        _ => return None,
    }
    match acceptor.accept(tcp).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            debug!(cause = %e, "TLS handshake failed");
            None
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accept task ends only when this receiver is gone; never reached.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(
        chain: &[CertificateDer<'static>],
        ca: &CertificateDer<'static>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            v.as_ref(),
            &chain[0],
            &chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(drop)
    }

    /// One address holding idle sockets gets its handshakes capped (the one beyond the cap is
    /// closed at once); another address is still served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_cannot_take_every_handshake_slot() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::new(dir.path().join("data"));
        config.plaintext = false;
        let tls = set_up(&config).unwrap().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = TlsListener::new(tcp, tls.server).unwrap();
        let from = |ip: &str| {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            s.connect(addr)
        };
        let mut idle = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            idle.push(from("127.0.0.2").await.unwrap());
        }
        let mut extra = from("127.0.0.2").await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, extra.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "the connection beyond the cap was held: {read:?}");
        // Another address completes its handshake and reaches the server.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(config.data_dir.join(CA_CERT)).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let dial = connector.connect(name, from("127.0.0.1").await.unwrap());
        let _tls = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, dial).await.unwrap().unwrap();
        let (_, peer) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, axum::serve::Listener::accept(&mut listener)).await.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        drop(idle);
    }

    #[test]
    fn the_ca_is_made_once_and_reissues_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["192.0.2.1".to_owned(), "localhost".to_owned()];
        let (chain, _) = own_ca(dir.path(), &names).unwrap();
        let ca = chain[1].clone();
        verify(&chain, &ca, "192.0.2.1").unwrap();
        verify(&chain, &ca, "localhost").unwrap();
        assert!(verify(&chain, &ca, "cloud.example").is_err(), "a name the certificate lacks");
        for key in [CA_KEY, SERVER_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        // Same names: everything reused.
        let (again, _) = own_ca(dir.path(), &names).unwrap();
        assert_eq!(again, chain);
        // Another public name: same CA, a new server certificate that verifies under it.
        let more = vec!["cloud.example".to_owned(), "localhost".to_owned()];
        let (other, _) = own_ca(dir.path(), &more).unwrap();
        assert_eq!(other[1], ca, "the CA (and so the pin) never changes");
        assert_ne!(other[0], chain[0]);
        verify(&other, &ca, "cloud.example").unwrap();
    }

    /// The chain and key on disk, as a restarted process would serve them.
    fn stored(dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let leaf = CertificateDer::from_pem_file(dir.join(SERVER_CERT)).unwrap();
        let ca = CertificateDer::from_pem_file(dir.join(CA_CERT)).unwrap();
        (vec![leaf, ca], PrivateKeyDer::from_pem_file(dir.join(SERVER_KEY)).unwrap())
    }

    /// The processes of a split cloud (`iotronic@api`, `@wamp-agent`, `@wstun-agent`) start
    /// together on one data directory: they all serve one CA, and the files left on disk are
    /// one CA's pair and one server certificate with its own key.
    #[test]
    fn processes_starting_together_make_one_ca() {
        const THREADS: usize = 6;
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Barrier::new(THREADS);
            let chains: Vec<_> = std::thread::scope(|s| {
                let spawned: Vec<_> = (0..THREADS)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            own_ca(dir.path(), &names)
                        })
                    })
                    .collect();
                spawned.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let (chain, key) = stored(dir.path());
            let (ca, leaf) = (fingerprint_of(&chain[1]), fingerprint_of(&chain[0]));
            for (i, c) in chains.into_iter().enumerate() {
                let (c, _) = c.unwrap_or_else(|e| panic!("round {round}, thread {i}: {e:?}"));
                assert_eq!(fingerprint_of(&c[1]), ca, "round {round}, thread {i} serves another CA than ca.crt");
                assert_eq!(fingerprint_of(&c[0]), leaf, "round {round}, thread {i}: another server certificate");
            }
            verify(&chain, &chain[1], "localhost").unwrap();
            server_config(chain, key).unwrap_or_else(|e| panic!("round {round}: the files on disk: {e}"));
            let pem = std::fs::read_to_string(dir.path().join(CA_KEY)).unwrap();
            key_matches(&stored(dir.path()).0[1], PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap())
                .unwrap_or_else(|e| panic!("round {round}: ca.key is not ca.crt's: {e}"));
        }
    }

    /// A server key and certificate that do not belong together (a crash between their two
    /// writes, or two processes each writing one) are replaced, not refused at every start.
    #[test]
    fn a_mismatched_server_pair_is_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        let (first, _) = own_ca(dir.path(), &names).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join(SERVER_KEY), other.serialize_pem()).unwrap();
        let (chain, key) = own_ca(dir.path(), &names).unwrap();
        assert_eq!(chain[1], first[1], "same CA");
        verify(&chain, &chain[1], "localhost").unwrap();
        server_config(chain, key).expect("a fresh pair");
        let (chain, key) = stored(dir.path());
        server_config(chain, key).expect("the fresh pair is on disk");

        // A matching pair that another CA issued (same names): re-issued by ours.
        let stray = rcgen::generate_simple_self_signed(names.clone()).unwrap();
        std::fs::write(dir.path().join(SERVER_CERT), stray.cert.pem()).unwrap();
        std::fs::write(dir.path().join(SERVER_KEY), stray.signing_key.serialize_pem()).unwrap();
        let (chain, _) = own_ca(dir.path(), &names).unwrap();
        assert_ne!(&chain[0], stray.cert.der());
        verify(&chain, &first[1], "localhost").expect("a certificate of our CA");
    }

    /// A CA key that is not the CA certificate's is a clear refusal: a server certificate it
    /// signed would not verify under the pin boards hold.
    #[test]
    fn a_ca_key_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        own_ca(dir.path(), &names).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join(CA_KEY), other.serialize_pem()).unwrap();
        let Err(e) = own_ca(dir.path(), &names) else { panic!("a CA key that does not match ca.crt was taken") };
        let text = format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
        assert!(text.contains("ca.key") && text.contains("does not match"), "{text}");
    }

    #[test]
    fn set_up_writes_the_fingerprint_and_takes_operator_chains() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::new(dir.path().join("data"));
        config.plaintext = true;
        assert!(set_up(&config).unwrap().is_none());
        config.plaintext = false;
        let tls = set_up(&config).unwrap().unwrap();
        let ca = CertificateDer::from_pem_file(config.data_dir.join(CA_CERT)).unwrap();
        assert_eq!(tls.fingerprint, fingerprint_of(&ca));
        let written = std::fs::read_to_string(config.data_dir.join(FINGERPRINT)).unwrap();
        assert_eq!(written.trim(), tls.fingerprint);
        assert!(!format!("{tls:?}").contains("PRIVATE"), "no key in Debug");
        // An operator's self-signed certificate: it is its own pin.
        let ck = rcgen::generate_simple_self_signed(vec!["cloud.example".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("op.crt"), dir.path().join("op.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        config.tls_cert = Some(cert.clone());
        let e = set_up(&config).unwrap_err();
        assert!(e.to_string().contains("operator"), "{e}");
        config.tls_key = Some(key);
        let op = set_up(&config).unwrap().unwrap();
        assert_eq!(op.fingerprint, fingerprint_of(ck.cert.der()));
        config.tls_key = Some(cert);
        assert!(set_up(&config).is_err(), "a certificate is not a key");
    }

    #[test]
    fn the_year_is_computed() {
        let y = this_year();
        assert!((2025..2200).contains(&y), "{y}");
    }
}

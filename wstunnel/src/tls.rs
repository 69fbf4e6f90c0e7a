//! rustls configurations (ring provider): the tunnel's command line and benchmark, and the
//! CA pin every Stack4Things client (board, `s4t`) uses to trust exactly the cloud's CA.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// ring's provider, AES-128-GCM first: as safe for TLS 1.3 and cheaper per byte than
/// AES-256-GCM (10 AES rounds instead of 14), which ring's default order puts first. Every
/// Stack4Things TLS end uses it (a server follows the client's order).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// A server configuration from PEM files (certificate chain, private key).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
    server_config_der(certs, key)
}

/// A server configuration from DER (e.g. a certificate generated in memory).
pub fn server_config_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_err)?;
    Ok(Arc::new(cfg))
}

/// A client configuration trusting only the CA certificates in a PEM file.
pub fn client_config_with_ca(ca: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))? {
        roots.add(c.map_err(tls_err)?).map_err(tls_err)?;
    }
    client_config_with_roots(roots)
}

/// Where Linux distributions keep the system's CA bundle (Debian/Ubuntu/Alpine/OpenWrt,
/// Fedora/RHEL, openSUSE, and the OpenSSL default).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A client configuration trusting the system's CA bundle: `$SSL_CERT_FILE`, else the first
/// of [`SYSTEM_CA_FILES`] that exists.
pub fn client_config_system() -> Result<Arc<rustls::ClientConfig>, Error> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let found = from_env.or_else(|| SYSTEM_CA_FILES.iter().map(std::path::PathBuf::from).find(|p| p.is_file()));
    match found {
        Some(bundle) => client_config_with_ca(&bundle),
        None => Err(Error::Tls(format!(
            "no system CA certificates (SSL_CERT_FILE, {}): give --ca-file",
            SYSTEM_CA_FILES.join(", ")
        ))),
    }
}

/// A client configuration trusting `roots`.
pub fn client_config_with_roots(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client configuration that accepts any server certificate, as wstun 1.0.11 does
/// (`rejectUnauthorized=false`). Only for the wstun-compatible mode and explicit opt-in.
pub fn client_config_insecure() -> Result<Arc<rustls::ClientConfig>, Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Starts every failure of a pinned client's certificate check (lightning-rod tells it from a
/// network failure by it).
pub const UNTRUSTED: &str = "the cloud did not prove it holds the pinned CA";

/// Parses a CA pin, `sha256:` and 64 hex digits (colons between bytes allowed).
pub fn parse_fingerprint(fp: &str) -> Option<[u8; 32]> {
    let hex: Vec<u8> = fp.strip_prefix("sha256:")?.bytes().filter(|c| *c != b':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The pin of a DER certificate: `sha256:` and the lowercase hex of its SHA-256.
pub fn fingerprint_of(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A client configuration that trusts exactly the CA whose certificate has SHA-256 `pin`
/// ([`parse_fingerprint`]). No system roots are involved. The server must present the pinned
/// certificate in its chain: the CA (the leaf is then verified against it, host name
/// included), or a self-signed server certificate pinned directly (accepted like an SSH host
/// key). Failures start with [`UNTRUSTED`].
pub fn pinned_client_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = |c: &CertificateDer<'_>| Sha256::digest(c.as_ref()).as_slice() == self.pin;
        if pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(ca) = intermediates.iter().find(|c| pinned(c)) else {
            return Err(rustls::Error::General(format!(
                "{UNTRUSTED}: its certificate chain does not contain it (check --ca-fingerprint)"
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        // The CA certificate is public: a man in the middle can send it too, and then fails
        // here (signature, name, validity), which is the same verdict.
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map_err(|e| rustls::Error::General(format!("{UNTRUSTED}: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

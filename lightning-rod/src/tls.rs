//! TLS for `wss://` (WAMP and tunnels): the board trusts exactly the cloud's CA, named by the
//! SHA-256 fingerprint of its DER certificate (`--ca-fingerprint sha256:HEX`, printed by
//! `iotronic serve`). No system roots are involved, so a board needs no CA bundle.
//!
//! The server must present the pinned certificate in its chain: either the CA (the usual
//! leaf + CA chain; the leaf is then verified against it, host name included) or a self-signed
//! server certificate pinned directly (accepted like an SSH host key).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Starts every certificate failure under the pin, so `enroll` can tell it from a network
/// failure (exit [`crate::EXIT_UNTRUSTED`]).
pub const UNTRUSTED: &str = "the cloud did not prove it holds the pinned CA";

/// Parses `sha256:HEX` (colons between bytes allowed).
pub fn parse_fingerprint(fp: &str) -> Result<[u8; 32]> {
    crate::config::validate_fingerprint(fp)?;
    let hex: Vec<u8> = fp["sha256:".len()..].bytes().filter(|c| *c != b':').collect();
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| Error::invalid("fingerprint is not hex"))?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| Error::invalid("fingerprint is not hex"))?;
    }
    Ok(out)
}

/// `sha256:` and the lowercase hex digest of a DER certificate.
pub fn fingerprint_of(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
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
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let matches = |c: &CertificateDer<'_>| Sha256::digest(c.as_ref()).as_slice() == self.pin;
        if matches(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(ca) = intermediates.iter().find(|c| matches(c)) else {
            return Err(rustls::Error::General(format!(
                "{UNTRUSTED}: its certificate chain does not contain it (check --ca-fingerprint)"
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // The CA certificate is public: a man in the middle can send it too, and then fails
        // here (signature, name, validity), which is the same verdict.
        verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map_err(|e| rustls::Error::General(format!("{UNTRUSTED}: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls (ring) client configuration that trusts only the pinned CA.
pub fn pinned_client_config(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>> {
    let pin = parse_fingerprint(fingerprint)?;
    let provider = wstunnel::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS configuration for `url`: `None` for `ws://`; for `wss://` the pinned CA, which must
/// be configured.
pub fn for_url(url: &str, fingerprint: Option<&str>) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if !url.starts_with("wss://") {
        return Ok(None);
    }
    match fingerprint {
        Some(fp) => pinned_client_config(fp).map(Some),
        None => Err(Error::invalid(format!(
            "{url}: wss needs the cloud's CA fingerprint (--ca-fingerprint sha256:HEX or cloud.ca_fingerprint)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        key: Vec<u8>,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        Pki { ca: ca.der().clone(), leaf: leaf.der().clone(), key: leaf_key.serialize_der() }
    }

    /// Runs one TLS handshake over loopback; returns the client's result.
    async fn handshake(
        chain: Vec<CertificateDer<'static>>,
        key: Vec<u8>,
        pin: &str,
        name: &str,
    ) -> std::io::Result<()> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::try_from(key).unwrap())
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let connector = tokio_rustls::TlsConnector::from(pinned_client_config(pin).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = connector.connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await.map(drop);
        let _ = srv.await;
        r
    }

    #[tokio::test]
    async fn only_the_pinned_ca_is_trusted() {
        let p = pki();
        let ca_pin = fingerprint_of(&p.ca);
        let chain = vec![p.leaf.clone(), p.ca.clone()];
        handshake(chain.clone(), p.key.clone(), &ca_pin, "localhost").await.unwrap();
        // Wrong pin, wrong host name, CA missing from the chain: refused.
        let other = fingerprint_of(b"another certificate");
        let e = handshake(chain.clone(), p.key.clone(), &other, "localhost").await.unwrap_err();
        assert!(e.to_string().contains("pinned"), "{e}");
        assert!(handshake(chain, p.key.clone(), &ca_pin, "cloud.example").await.is_err());
        assert!(handshake(vec![p.leaf.clone()], p.key.clone(), &ca_pin, "localhost").await.is_err());
        // A self-signed server certificate pinned directly.
        let leaf_pin = fingerprint_of(&p.leaf);
        handshake(vec![p.leaf.clone()], p.key, &leaf_pin, "anything").await.unwrap();
    }

    #[test]
    fn fingerprints_parse() {
        let fp = fingerprint_of(b"x");
        let bytes = parse_fingerprint(&fp).unwrap();
        assert_eq!(bytes.as_slice(), Sha256::digest(b"x").as_slice());
        let with_colons = format!("sha256:{}", bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"));
        assert_eq!(parse_fingerprint(&with_colons).unwrap(), bytes);
        assert!(parse_fingerprint("sha256:zz").is_err());
        assert!(for_url("wss://c/", None).unwrap_err().to_string().contains("fingerprint"));
        assert!(for_url("ws://c/", None).unwrap().is_none());
    }
}

//! TLS for `wss://` (WAMP and tunnels): the board trusts exactly the cloud's CA, named by the
//! SHA-256 fingerprint of its DER certificate (`--ca-fingerprint sha256:HEX`, printed by
//! `iotronic serve`). No system roots are involved, so a board needs no CA bundle. The
//! verifier is [`wstunnel::tls::pinned_client_config`], which the `s4t` command line shares.

use std::sync::Arc;

use crate::error::{Error, Result};

pub use wstunnel::tls::{UNTRUSTED, fingerprint_of};

/// Parses `sha256:HEX` (colons between bytes allowed).
pub fn parse_fingerprint(fp: &str) -> Result<[u8; 32]> {
    crate::config::validate_fingerprint(fp)?;
    wstunnel::tls::parse_fingerprint(fp).ok_or_else(|| Error::invalid("fingerprint is not hex"))
}

/// A rustls (ring) client configuration that trusts only the pinned CA.
pub fn pinned_client_config(fingerprint: &str) -> Result<Arc<rustls::ClientConfig>> {
    wstunnel::tls::pinned_client_config(parse_fingerprint(fingerprint)?)
        .map_err(|e| Error::invalid(format!("TLS: {e}")))
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
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use sha2::{Digest, Sha256};

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

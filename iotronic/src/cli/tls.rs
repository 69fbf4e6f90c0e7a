//! https to the cloud. With `--ca-fingerprint sha256:HEX` (the pin `iotronic serve` prints) the
//! CLI trusts exactly that CA, which the cloud must send in its chain (or a self-signed server
//! certificate pinned directly, like an SSH host key): the verifier the boards use,
//! [`wstunnel::tls::pinned_client_config`]. Without a pin, the public web roots, and a
//! certificate they do not vouch for fails with the way to pin (`client.rs`). There is no
//! option to skip verification. rustls with the ring provider only.

use super::error::{Failure, Result};

/// Parses `sha256:HEX` (64 hex digits, colons between bytes allowed).
pub fn parse_fingerprint(fp: &str) -> Result<[u8; 32]> {
    wstunnel::tls::parse_fingerprint(fp).ok_or_else(|| {
        Failure::usage(format!("CA fingerprint {fp:?} is not sha256:HEX"))
            .with_hint("copy it from `iotronic serve`'s output or DATA_DIR/ca.fingerprint")
    })
}

/// A client configuration trusting only the pinned CA.
pub fn pinned(fingerprint: &str) -> Result<rustls::ClientConfig> {
    let config = wstunnel::tls::pinned_client_config(parse_fingerprint(fingerprint)?)
        .map_err(|e| Failure::internal(format!("TLS set-up: {e}")))?;
    Ok(std::sync::Arc::unwrap_or_clone(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::Client;
    use crate::cli::error::Kind;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

    fn pin_of(der: &[u8]) -> String {
        wstunnel::tls::fingerprint_of(der)
    }

    /// An https server on 127.0.0.1 that answers every request with `{}`; returns its port.
    async fn https_server(chain: Vec<CertificateDer<'static>>, key: Vec<u8>) -> u16 {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::Pkcs8(key.into()))
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"id\":\"v1\"}";
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn https_trusts_exactly_the_pinned_ca() {
        let p = pki();
        let port = https_server(vec![p.leaf.clone(), p.ca.clone()], p.key.clone()).await;
        let url = format!("https://localhost:{port}");
        let ok = Client::new(&url, None, Some(&pin_of(&p.ca))).unwrap();
        assert_eq!(ok.get("/v1").await.unwrap()["id"], "v1");
        let other = pki();
        let wrong = Client::new(&url, None, Some(&pin_of(&other.ca))).unwrap();
        let e = wrong.get("/v1").await.unwrap_err();
        assert_eq!(e.kind, Kind::Unreachable, "{e}");
        assert!(e.message.contains("pinned CA"), "the error names the pin: {e}");
        // A leaf that does not name the host is refused even under the right CA.
        let by_ip = Client::new(&format!("https://127.0.0.1:{port}"), None, Some(&pin_of(&p.ca))).unwrap();
        assert!(by_ip.get("/v1").await.is_err(), "the host name is verified");
        // Without a pin, the cloud's own CA is not a public root.
        let unpinned = Client::new(&url, None, None).unwrap();
        let e = unpinned.get("/v1").await.unwrap_err();
        assert_eq!(e.kind, Kind::Unreachable, "{e}");
        assert!(e.hint.as_deref().unwrap_or_default().contains("--ca-fingerprint"), "the hint says how to pin: {e:?}");
    }

    #[test]
    fn fingerprints_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")).unwrap(), [0xab; 32]);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.join(":"))).unwrap(), [0xab; 32]);
        for bad in ["", "sha256:", "sha1:abcd", &format!("sha256:{}", "zz".repeat(32)), &format!("sha256:{hex}00")] {
            assert!(parse_fingerprint(bad).is_err(), "{bad}");
        }
    }
}

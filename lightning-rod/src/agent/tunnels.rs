//! The `wstunnel` client library behind the agent's [`TunnelOpener`] and [`PacketOpener`]
//! seams: one client (one channel) per tunnel server URL, shared by every exposure and packet
//! channel, reconnecting by itself and re-establishing them after each reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wstunnel::client::{ClientConfig, ClientHandle};

use crate::error::{Error, Result};
use crate::overlay::PacketPipe;
use crate::rpc::services::{BoxFuture, Tunnel, TunnelOpener, TunnelSpec};
use crate::rpc::vpn::PacketOpener;
use crate::secret::Secret;

/// How long `ServiceEnable`/`VpnJoin` wait for the tunnel server's answer.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts and keeps `wstunnel` clients; cheap to clone.
#[derive(Clone)]
pub struct WstunnelClients {
    inner: Arc<Inner>,
}

struct Inner {
    shutdown: CancellationToken,
    clients: Mutex<HashMap<String, ClientHandle>>,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    /// The cloud's CA for `wss://` tunnel servers.
    ca_fingerprint: Option<String>,
}

impl WstunnelClients {
    pub fn new(
        shutdown: CancellationToken,
        reconnect_initial: Duration,
        reconnect_max: Duration,
        ca_fingerprint: Option<String>,
    ) -> WstunnelClients {
        let inner =
            Inner { shutdown, clients: Mutex::new(HashMap::new()), reconnect_initial, reconnect_max, ca_fingerprint };
        WstunnelClients { inner: Arc::new(inner) }
    }

    fn client(&self, url: &str) -> Result<ClientHandle> {
        let mut clients = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let mut cfg = ClientConfig::new(url);
        cfg.tls = crate::tls::for_url(url, self.inner.ca_fingerprint.as_deref())
            .map_err(|e| Error::Tunnel(format!("{url}: {e}")))?;
        cfg.reconnect_initial = self.inner.reconnect_initial;
        cfg.reconnect_max = self.inner.reconnect_max;
        let c = wstunnel::client::start(cfg, self.inner.shutdown.child_token())
            .map_err(|e| Error::Tunnel(format!("{url}: {e}")))?;
        clients.insert(url.to_owned(), c.clone());
        Ok(c)
    }
}

fn token(t: Option<Secret>) -> String {
    t.map(|s| s.expose().to_owned()).unwrap_or_default()
}

/// An exposure; dropping it asks the server to close the public listener.
struct Exposure {
    client: ClientHandle,
    id: u32,
    port: u16,
}

impl Tunnel for Exposure {
    fn is_alive(&self) -> bool {
        // The client keeps an exposure across reconnects and forgets it on a refusal.
        self.client.state().borrow().exposures.iter().any(|e| e.id == self.id)
    }
    fn public_port(&self) -> u16 {
        self.port
    }
    fn renew(&self, token: &Secret) -> bool {
        self.client.renew_exposure_token(self.id, token.expose().to_owned())
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        self.client.unexpose(self.id);
    }
}

impl TunnelOpener for WstunnelClients {
    fn open(&self, spec: TunnelSpec) -> BoxFuture<'_, Result<Box<dyn Tunnel>>> {
        Box::pin(async move {
            let client = self.client(&spec.server_url)?;
            let target = format!("127.0.0.1:{}", spec.local_port);
            let fut = client.expose(token(spec.token), spec.public_port, target.clone());
            let exposed = match tokio::time::timeout(OPEN_TIMEOUT, fut).await {
                Ok(r) => r.map_err(|e| Error::Tunnel(format!("public port {}: {e}", spec.public_port)))?,
                Err(_) => {
                    // The client would keep asking for it after we gave up: withdraw it.
                    let pending: Vec<u32> = client
                        .state()
                        .borrow()
                        .exposures
                        .iter()
                        .filter(|e| e.port.is_none() && e.requested_port == spec.public_port && e.target == target)
                        .map(|e| e.id)
                        .collect();
                    for id in pending {
                        client.unexpose(id);
                    }
                    return Err(Error::Tunnel(format!("{} did not answer within {OPEN_TIMEOUT:?}", spec.server_url)));
                }
            };
            tracing::info!(public_port = exposed.port, local_port = spec.local_port, "reverse tunnel open");
            Ok(Box::new(Exposure { client, id: exposed.id, port: exposed.port }) as Box<dyn Tunnel>)
        })
    }
}

impl PacketOpener for WstunnelClients {
    fn open(&self, url: String, vpn: String, tok: Option<Secret>) -> BoxFuture<'_, Result<PacketPipe>> {
        Box::pin(async move {
            let client = self.client(&url)?;
            // Giving up drops the open, which withdraws it; dropping the returned pipe (both
            // halves: the overlay's pump holds them) closes the channel on both ends.
            let chan = tokio::time::timeout(OPEN_TIMEOUT, client.open_packet_channel(token(tok), vpn.clone()))
                .await
                .map_err(|_| Error::Tunnel(format!("{url} did not answer within {OPEN_TIMEOUT:?}")))?
                .map_err(|e| Error::Tunnel(format!("packet channel for vpn {vpn}: {e}")))?;
            Ok(chan)
        })
    }

    fn renew(&self, url: &str, vpn: &str, tok: &Secret) -> bool {
        let client = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner()).get(url).cloned();
        client.is_some_and(|c| c.renew_packet_token(vpn, tok.expose()) > 0)
    }
}

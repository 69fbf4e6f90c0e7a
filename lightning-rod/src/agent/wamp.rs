//! The `s4t_wamp` client behind the agent's [`Connector`]/[`Link`] seam.

use std::time::Duration;

use s4t_shared::wamp::session::{ClientAuth, HandshakeError};
use s4t_shared::wamp::{Payload, message::uri};
use s4t_wamp::{ClientConfig, Session, WampError};
use serde_json::{Map, Value};

use super::link::{Auth, ConnectOptions, Connector, Handler, Link};
use crate::error::{Error, Result};
use crate::rpc::services::BoxFuture;

/// Opens WAMP sessions with `s4t_wamp`.
#[derive(Debug, Clone, Default)]
pub struct WampConnector;

fn client_auth(auth: &Auth) -> ClientAuth {
    use s4t_shared::wamp::Secret as WampSecret;
    match auth {
        Auth::Anonymous => ClientAuth::Anonymous,
        Auth::Ticket { authid, ticket } => {
            ClientAuth::Ticket { authid: authid.clone(), ticket: WampSecret::new(ticket.expose()) }
        }
        Auth::WampCra { authid, secret } => {
            ClientAuth::WampCra { authid: authid.clone(), secret: WampSecret::new(secret.expose()) }
        }
    }
}

/// A refusal by the router (our credentials are not accepted) is permanent; anything else is
/// worth retrying.
fn classify(url: &str, e: s4t_wamp::Error) -> Error {
    if let s4t_wamp::Error::Handshake(HandshakeError::Aborted { reason, message }) = &e {
        let text = format!("{url}: {reason}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default());
        if reason == uri::NO_AUTH_METHOD {
            return Error::AuthMethod(text);
        }
        if [uri::AUTHENTICATION_FAILED, uri::NOT_AUTHORIZED].contains(&reason.as_str()) {
            return Error::Revoked(text);
        }
    }
    Error::Wamp(format!("{url}: {}", chain(&e)))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Connector for WampConnector {
    fn connect(&self, options: ConnectOptions) -> BoxFuture<'_, Result<Box<dyn Link>>> {
        Box::pin(async move {
            let mut cfg = ClientConfig::new(&options.url, &options.realm, client_auth(&options.auth));
            cfg.tls = crate::tls::for_url(&options.url, options.ca_fingerprint.as_deref())?;
            cfg.connect_timeout = options.timeout;
            let session = s4t_wamp::connect(&cfg).await.map_err(|e| classify(&options.url, e))?;
            Ok(Box::new(WampLink { session, call_timeout: options.timeout }) as Box<dyn Link>)
        })
    }
}

struct WampLink {
    session: Session,
    /// Upper bound passed to the router for calls; callers apply their own shorter timeouts.
    call_timeout: Duration,
}

impl Link for WampLink {
    fn session_id(&self) -> u64 {
        self.session.id()
    }

    fn call(&self, procedure: String, args: Vec<Value>, kwargs: Map<String, Value>) -> BoxFuture<'_, Result<Value>> {
        Box::pin(async move {
            let timeout = self.call_timeout.max(Duration::from_secs(30));
            let payload = self
                .session
                .call(&procedure, args, kwargs, timeout)
                .await
                .map_err(|e| Error::Wamp(format!("{procedure}: {}", chain(&e))))?;
            Ok(payload.args.into_iter().next().unwrap_or(Value::Null))
        })
    }

    fn register(&self, procedure: String, handler: Handler) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.session
                .register(&procedure, move |inv| {
                    let h = handler.clone();
                    async move {
                        match h(inv.args, inv.kwargs).await {
                            Ok(args) => Ok(Payload::new(args, Map::new())),
                            Err((error, message)) => Err(WampError::new(error, message)),
                        }
                    }
                })
                .await
                .map_err(|e| Error::Wamp(format!("registering {procedure}: {}", chain(&e))))?;
            Ok(())
        })
    }

    fn publish(&self, topic: String, args: Vec<Value>, kwargs: Map<String, Value>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.session
                .publish(&topic, args, kwargs)
                .await
                .map_err(|e| Error::Wamp(format!("publishing {topic}: {e}")))
        })
    }

    fn closed(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let reason = self.session.closed().await;
            tracing::info!(?reason, "WAMP session ended");
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.session.leave())
    }
}

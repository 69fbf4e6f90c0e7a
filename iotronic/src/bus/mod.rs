//! The message bus between the API, the conductor and the agents.
//!
//! In-process (bounded tokio channels) by default; RabbitMQ (lapin) with `--amqp-url`. The
//! same three flows either way:
//!
//! - **conductor queue** (`ConductorMsg`): work for the conductor: execute a request, a board's
//!   result, a board came online. Durable on RabbitMQ; a delivery is acked only after the
//!   conductor has recorded its effect in the database, so a conductor killed mid-way gets the
//!   message again (handlers are idempotent: request state moves by compare-and-set).
//! - **agent queues** (`AgentCall`), one per agent name: calls for the boards on that agent.
//!   Acked after the board's answer is on the conductor queue.
//! - **completions** (request uuids): fan-out to every API process, so a waiting REST call
//!   learns its request finished and reads the result from the database (reply correlation by
//!   request uuid).

mod amqp;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use amqp::AmqpUrl;

use crate::Error;

/// Capacity of every in-process queue and of the consumer side of RabbitMQ queues.
pub const QUEUE_CAPACITY: usize = 1024;
/// Completions buffered per listening API process.
pub const COMPLETIONS_CAPACITY: usize = 4096;

/// Work for the conductor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConductorMsg {
    /// A request was accepted (PENDING) and must be sent to its board, queued or failed.
    Execute { request: String },
    /// A board's answer (from the agent, or from `notify_result`).
    Result { request: String, board: String, result: String, message: Value },
    /// A board logged in: deliver what is queued for it.
    BoardOnline { board: String },
    /// The agent could not get an answer (board unreachable, agent restarted mid-call).
    Failed { request: String, board: String, reason: String },
}

/// A call for a board, addressed to the agent the board is connected to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentCall {
    pub request: String,
    pub board: String,
    /// The board's WAMP session when the call was dispatched.
    pub session: String,
    /// Procedure name after `iotronic.<session>.<board>.`, e.g. `DevicePing`.
    pub procedure: String,
    /// The project the request was made in (empty: the cloud's own, or an older conductor).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
    /// Positional arguments after the request dict.
    pub args: Vec<Value>,
    /// Call without the leading request dict: an original lightning-rod older than 0.4.9
    /// (S4T-REFERENCE §4). Absent in messages from older conductors: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub omit_req: bool,
}

/// A received message and how to acknowledge it.
pub struct Delivery<T> {
    pub msg: T,
    /// True when the broker delivered it before (the previous consumer died holding it).
    pub redelivered: bool,
    acker: Acker,
}

enum Acker {
    Local,
    Amqp(lapin::Acker),
}

impl<T> Delivery<T> {
    /// Acknowledges: the message's effect is recorded and it must not come back.
    pub async fn ack(self) -> Result<(), Error> {
        match self.acker {
            Acker::Local => Ok(()),
            Acker::Amqp(a) => a
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|source| Error::Amqp { context: "ack".into(), source }),
        }
    }
}

/// A handle to the bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

enum Inner {
    Local(LocalBus),
    Amqp(Box<amqp::AmqpBus>),
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &*self.inner {
            Inner::Local(_) => "in-process",
            Inner::Amqp(_) => "amqp",
        };
        f.debug_struct("Bus").field("kind", &kind).finish()
    }
}

type Queue<T> = (mpsc::Sender<Delivery<T>>, Option<mpsc::Receiver<Delivery<T>>>);

struct LocalBus {
    conductor: Mutex<Queue<ConductorMsg>>,
    agents: Mutex<HashMap<String, Queue<AgentCall>>>,
    completions: broadcast::Sender<String>,
}

fn local_queue<T>() -> Queue<T> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    (tx, Some(rx))
}

impl Bus {
    /// The embedded default: everything in this process.
    pub fn in_process() -> Bus {
        let (completions, _) = broadcast::channel(COMPLETIONS_CAPACITY);
        let local = LocalBus { conductor: Mutex::new(local_queue()), agents: Mutex::new(HashMap::new()), completions };
        Bus { inner: Arc::new(Inner::Local(local)) }
    }

    /// RabbitMQ. `prefix` names the queues and exchanges (`<prefix>.conductor`, …), so several
    /// clouds or tests can share a broker.
    pub async fn amqp(url: &AmqpUrl, prefix: &str) -> Result<Bus, Error> {
        let bus = amqp::AmqpBus::connect(url, prefix).await?;
        Ok(Bus { inner: Arc::new(Inner::Amqp(Box::new(bus))) })
    }

    pub fn is_in_process(&self) -> bool {
        matches!(&*self.inner, Inner::Local(_))
    }

    pub async fn to_conductor(&self, msg: &ConductorMsg) -> Result<(), Error> {
        match &*self.inner {
            Inner::Local(l) => {
                let tx = lock(&l.conductor).0.clone();
                let d = Delivery { msg: msg.clone(), redelivered: false, acker: Acker::Local };
                tx.send(d).await.map_err(|_| Error::Bus("the conductor has stopped".into()))
            }
            Inner::Amqp(a) => a.publish(&a.conductor_queue(), msg).await,
        }
    }

    /// The conductor's deliveries. In-process there is one consumer; a second call fails.
    pub async fn conductor_deliveries(&self) -> Result<mpsc::Receiver<Delivery<ConductorMsg>>, Error> {
        match &*self.inner {
            Inner::Local(l) => lock(&l.conductor)
                .1
                .take()
                .ok_or_else(|| Error::Bus("the conductor queue already has its consumer".into())),
            Inner::Amqp(a) => a.consume(&a.conductor_queue(), amqp::CONDUCTOR_PREFETCH).await,
        }
    }

    pub async fn to_agent(&self, agent: &str, call: &AgentCall) -> Result<(), Error> {
        match &*self.inner {
            Inner::Local(l) => {
                let tx = lock(&l.agents).entry(agent.to_owned()).or_insert_with(local_queue).0.clone();
                let d = Delivery { msg: call.clone(), redelivered: false, acker: Acker::Local };
                // Not waited for: the agent's calls report to the conductor, which may be the
                // one sending here, so both queues full would wait on each other for ever.
                tx.try_send(d).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        Error::Bus(format!("agent {agent} is overloaded ({QUEUE_CAPACITY} calls waiting)"))
                    }
                    mpsc::error::TrySendError::Closed(_) => Error::Bus(format!("agent {agent} has stopped")),
                })
            }
            Inner::Amqp(a) => a.publish(&a.agent_queue(agent), call).await,
        }
    }

    pub async fn agent_deliveries(&self, agent: &str) -> Result<mpsc::Receiver<Delivery<AgentCall>>, Error> {
        match &*self.inner {
            Inner::Local(l) => lock(&l.agents)
                .entry(agent.to_owned())
                .or_insert_with(local_queue)
                .1
                .take()
                .ok_or_else(|| Error::Bus(format!("agent {agent} already has its consumer"))),
            Inner::Amqp(a) => a.consume(&a.agent_queue(agent), amqp::AGENT_PREFETCH).await,
        }
    }

    /// Tells every API process that `request` reached a final state (or a new result).
    pub async fn completed(&self, request: &str) -> Result<(), Error> {
        match &*self.inner {
            Inner::Local(l) => {
                let _ = l.completions.send(request.to_owned());
                Ok(())
            }
            Inner::Amqp(a) => a.publish_completion(request).await,
        }
    }

    /// Subscribes to completions. Subscribe before submitting, so none is missed.
    pub async fn completions(&self) -> Result<broadcast::Receiver<String>, Error> {
        match &*self.inner {
            Inner::Local(l) => Ok(l.completions.subscribe()),
            Inner::Amqp(a) => a.completions().await,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent: recover the guard.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Failed attempts at handling one message that [`retry_transient`] makes before it gives up.
pub const RETRIES: u32 = 6;

/// Runs `attempt` again while it fails with a database or broker error (a database restart,
/// a broker blip), waiting 0.5 s, then twice as long each time ([`RETRIES`] times, some 30 s
/// in all), or until `shutdown`. Returns the last outcome; `None` on shutdown. Without it, a
/// message whose handling hit such an error was dropped unacknowledged: lost in-process, and
/// on RabbitMQ holding one of the consumer's prefetch slots until the process restarted.
pub async fn retry_transient<F, Fut>(shutdown: &CancellationToken, mut attempt: F) -> Option<Result<(), Error>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let mut wait = Duration::from_millis(500);
    for _ in 0..RETRIES {
        match attempt().await {
            Err(e @ (Error::Db(_) | Error::Amqp { .. })) => {
                tracing::warn!(cause = %e, retry_in = ?wait, "transient failure: trying again");
            }
            done => return Some(done),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait *= 2;
    }
    Some(attempt().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_bus_carries_each_flow() {
        let bus = Bus::in_process();
        let mut c = bus.conductor_deliveries().await.unwrap();
        assert!(bus.conductor_deliveries().await.is_err(), "a second conductor consumer in-process");
        let mut done = bus.completions().await.unwrap();
        bus.to_conductor(&ConductorMsg::Execute { request: "r1".into() }).await.unwrap();
        let d = c.recv().await.unwrap();
        assert_eq!(d.msg, ConductorMsg::Execute { request: "r1".into() });
        d.ack().await.unwrap();
        let call = AgentCall {
            request: "r1".into(),
            board: "b".into(),
            session: "1".into(),
            procedure: "DevicePing".into(),
            project: "p".into(),
            args: vec![],
            omit_req: false,
        };
        bus.to_agent("a1", &call).await.unwrap();
        let mut a = bus.agent_deliveries("a1").await.unwrap();
        assert_eq!(a.recv().await.unwrap().msg, call);
        bus.completed("r1").await.unwrap();
        assert_eq!(done.recv().await.unwrap(), "r1");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_then_given_up() {
        let stop = CancellationToken::new();
        let mut tries = 0;
        let r = retry_transient(&stop, || {
            tries += 1;
            let fail = tries < 3;
            async move { if fail { Err(Error::Db(sqlx::Error::PoolTimedOut)) } else { Ok(()) } }
        })
        .await;
        assert!(matches!(r, Some(Ok(()))), "{r:?}");
        assert_eq!(tries, 3);
        // A failure that is not transient is not retried; a lasting one is given up.
        tries = 0;
        let r = retry_transient(&stop, || {
            tries += 1;
            async { Err(Error::Invalid("bad".into())) }
        })
        .await;
        assert!(matches!(r, Some(Err(Error::Invalid(_)))), "{r:?}");
        assert_eq!(tries, 1);
        tries = 0;
        let r = retry_transient(&stop, || {
            tries += 1;
            async { Err(Error::Db(sqlx::Error::PoolTimedOut)) }
        })
        .await;
        assert!(matches!(r, Some(Err(Error::Db(_)))), "{r:?}");
        assert_eq!(tries, RETRIES + 1);
        stop.cancel();
        let r = retry_transient(&stop, || async { Err(Error::Db(sqlx::Error::PoolTimedOut)) }).await;
        assert!(r.is_none(), "{r:?}");
    }

    #[test]
    fn messages_have_a_stable_json_shape() {
        let m = ConductorMsg::Result {
            request: "r".into(),
            board: "b".into(),
            result: "SUCCESS".into(),
            message: "x".into(),
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["type"], "result");
        assert_eq!(serde_json::from_value::<ConductorMsg>(v).unwrap(), m);
        assert!(serde_json::from_str::<ConductorMsg>("{\"type\":\"nope\"}").is_err());
    }
}

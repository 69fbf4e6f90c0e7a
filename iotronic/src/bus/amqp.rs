//! The bus on RabbitMQ (lapin): durable queues, persistent messages, publisher confirms,
//! manual acks, a fan-out exchange for completions, automatic connection recovery.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, broadcast, mpsc};
use tracing::{error, warn};

use super::{Acker, COMPLETIONS_CAPACITY, Delivery, QUEUE_CAPACITY};
use crate::Error;
use crate::db::redact_url;

/// How many unacknowledged messages the conductor holds at once (it handles one at a time).
pub(super) const CONDUCTOR_PREFETCH: u16 = 32;
/// An agent acknowledges a call when the board has answered (up to a minute): it holds as
/// many as it runs at once, or 32 calls to hung boards would hold up every board on it.
pub(super) const AGENT_PREFETCH: u16 = crate::agent::MAX_CALLS_IN_FLIGHT as u16;

/// An AMQP URL whose `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    pub fn new(url: impl Into<String>) -> Self {
        AmqpUrl(url.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({})", redact_url(&self.0))
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

fn amqp_err(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    let context = context.into();
    move |source| Error::Amqp { context, source }
}

pub(super) struct AmqpBus {
    conn: Connection,
    /// Publishing channel, in confirm mode.
    publish: Channel,
    prefix: String,
    declared: Mutex<HashSet<String>>,
    completions: OnceCell<broadcast::Sender<String>>,
}

impl AmqpBus {
    pub(super) async fn connect(url: &AmqpUrl, prefix: &str) -> Result<AmqpBus, Error> {
        // Reconnects for as long as it takes, every 30 s at most: lapin's default of 16 tries
        // gives up after some 11 minutes of broker outage and leaves every consumer waiting
        // for a recovery that never comes (the process alive but deaf).
        let props = ConnectionProperties::default()
            .configure_backoff(|b| b.with_max_delay(std::time::Duration::from_secs(30)).without_max_times())
            .enable_auto_recover();
        let conn = Connection::connect(url.expose(), props).await.map_err(amqp_err(format!("connect to {url}")))?;
        let publish = conn.create_channel().await.map_err(amqp_err("open a channel"))?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp_err("enable publisher confirms"))?;
        let bus = AmqpBus {
            conn,
            publish,
            prefix: prefix.to_owned(),
            declared: Mutex::new(HashSet::new()),
            completions: OnceCell::new(),
        };
        bus.publish
            .exchange_declare(
                bus.completions_exchange().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err("declare the completions exchange"))?;
        bus.declare(&bus.conductor_queue()).await?;
        Ok(bus)
    }

    pub(super) fn conductor_queue(&self) -> String {
        format!("{}.conductor", self.prefix)
    }

    pub(super) fn agent_queue(&self, agent: &str) -> String {
        format!("{}.agent.{agent}", self.prefix)
    }

    fn completions_exchange(&self) -> String {
        format!("{}.completions", self.prefix)
    }

    /// A fresh name for this process's completions queue.
    fn completions_queue(&self) -> String {
        format!("{}.completions.{}", self.prefix, uuid::Uuid::new_v4().simple())
    }

    async fn declare(&self, queue: &str) -> Result<(), Error> {
        if self.declared.lock().unwrap_or_else(|e| e.into_inner()).contains(queue) {
            return Ok(());
        }
        self.publish
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(amqp_err(format!("declare queue {queue}")))?;
        self.declared.lock().unwrap_or_else(|e| e.into_inner()).insert(queue.to_owned());
        Ok(())
    }

    /// Publishes a persistent message and waits for the broker's confirm.
    pub(super) async fn publish<T: Serialize>(&self, queue: &str, msg: &T) -> Result<(), Error> {
        self.declare(queue).await?;
        let payload = serde_json::to_vec(msg).map_err(|e| Error::Bus(format!("cannot encode a message: {e}")))?;
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        let confirm = self
            .publish
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &payload, props)
            .await
            .map_err(amqp_err(format!("publish to {queue}")))?
            .await
            .map_err(amqp_err(format!("confirm of a message to {queue}")))?;
        if confirm.is_nack() {
            return Err(Error::Bus(format!("the broker refused a message to {queue}")));
        }
        Ok(())
    }

    /// Consumes a durable queue with manual acks; undecodable messages are logged and acked
    /// (dropped) so they cannot block the queue.
    pub(super) async fn consume<T: DeserializeOwned + Send + 'static>(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery<T>>, Error> {
        let channel = self.conn.create_channel().await.map_err(amqp_err("open a channel"))?;
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(amqp_err(format!("declare queue {queue}")))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp_err("set prefetch"))?;
        let tag = format!("{queue}.{}", uuid::Uuid::new_v4().simple());
        let mut consumer = channel
            .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(amqp_err(format!("consume {queue}")))?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let queue = queue.to_owned();
        tokio::spawn(async move {
            while let Some(next) = consumer.next().await {
                let d = match next {
                    Ok(d) => d,
                    Err(e) => match channel.wait_for_recovery(e).await {
                        Ok(()) => continue,
                        Err(e) => {
                            error!(%queue, cause = %e, "lost the RabbitMQ consumer");
                            break;
                        }
                    },
                };
                match serde_json::from_slice::<T>(&d.data) {
                    Ok(msg) => {
                        let delivery = Delivery { msg, redelivered: d.redelivered, acker: Acker::Amqp(d.acker) };
                        if tx.send(delivery).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(%queue, cause = %e, "dropping an undecodable message");
                        let _ = d.acker.ack(lapin::options::BasicAckOptions::default()).await;
                    }
                }
            }
        });
        Ok(rx)
    }

    pub(super) async fn publish_completion(&self, request: &str) -> Result<(), Error> {
        let exchange = self.completions_exchange();
        self.publish
            .basic_publish(
                exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                request.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .map_err(amqp_err("publish a completion"))?
            .await
            .map_err(amqp_err("confirm of a completion"))?;
        Ok(())
    }

    /// This process's subscription to completions: an exclusive, auto-deleted queue bound to
    /// the fan-out exchange, pumped into a broadcast channel. The queue is named here, not by
    /// the broker: after a reconnect lapin declares it again by name, and the broker refuses a
    /// name of its own kind (`amq.gen-…`), which left every synchronous REST call waiting out
    /// its timeout (202) until the process restarted.
    pub(super) async fn completions(&self) -> Result<broadcast::Receiver<String>, Error> {
        let tx = self.completions.get_or_try_init(|| self.subscribe_completions()).await?;
        Ok(tx.subscribe())
    }

    async fn subscribe_completions(&self) -> Result<broadcast::Sender<String>, Error> {
        let channel = self.conn.create_channel().await.map_err(amqp_err("open a channel"))?;
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = channel
            .queue_declare(self.completions_queue().as_str().into(), opts, FieldTable::default())
            .await
            .map_err(amqp_err("declare a reply queue"))?;
        let exchange = self.completions_exchange();
        channel
            .queue_bind(
                q.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err("bind the reply queue"))?;
        let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut consumer = channel
            .basic_consume(q.name().clone(), "".into(), opts, FieldTable::default())
            .await
            .map_err(amqp_err("consume the reply queue"))?;
        let (tx, _) = broadcast::channel(COMPLETIONS_CAPACITY);
        let sender = tx.clone();
        tokio::spawn(async move {
            while let Some(next) = consumer.next().await {
                match next {
                    Ok(d) => {
                        if let Ok(s) = String::from_utf8(d.data) {
                            let _ = sender.send(s);
                        }
                    }
                    Err(e) => {
                        if channel.wait_for_recovery(e).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(tx)
    }
}

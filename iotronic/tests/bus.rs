//! The RabbitMQ bus against the real broker (127.0.0.1:5672), reached through a relay the
//! test can cut: what a process consumes keeps arriving after its connection breaks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use iotronic::agent::{BoardCaller, BoxFuture, run_worker};
use iotronic::bus::{AgentCall, AmqpUrl, Bus, ConductorMsg};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BROKER: &str = "127.0.0.1:5672";

/// A TCP relay to the broker; bumping the sender's value cuts every connection open then
/// (later ones go through).
async fn relay() -> (SocketAddr, watch::Sender<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (cut, _) = watch::channel(0u64);
    let cuts = cut.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let mut cutting = cuts.subscribe();
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(BROKER).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = cutting.changed() => {}
                }
            });
        }
    });
    (addr, cut)
}

async fn bus(addr: &str, prefix: &str) -> Bus {
    Bus::amqp(&AmqpUrl::new(format!("amqp://guest:guest@{addr}/%2f")), prefix).await.unwrap()
}

/// After the connection of an API process and a conductor breaks, completions and conductor
/// messages reach them again once the bus has reconnected (the completions queue was named
/// by the broker and could not be declared again: its subscription stayed dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_come_back_after_the_connection_breaks() {
    let prefix = format!("bus-test-{}", uuid::Uuid::new_v4().simple());
    let (addr, cut) = relay().await;
    let cut_off = bus(&addr.to_string(), &prefix).await;
    let direct = bus(BROKER, &prefix).await;
    let mut done = cut_off.completions().await.unwrap();
    let mut work = cut_off.conductor_deliveries().await.unwrap();
    direct.completed("before").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), done.recv()).await.unwrap().unwrap();
    assert_eq!(got, "before");

    cut.send_modify(|g| *g += 1);
    // Sent until one arrives: the bus reconnects after a back-off of its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        direct.completed(&format!("after-{n}")).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), done.recv()).await {
            Ok(Ok(s)) if s.starts_with("after-") => break,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => panic!("the subscription ended"),
            _ => assert!(tokio::time::Instant::now() < deadline, "no completion after the reconnect"),
        }
    }
    direct.to_conductor(&ConductorMsg::Execute { request: "r-after".into() }).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(60), work.recv()).await.expect("no conductor message").unwrap();
    assert_eq!(d.msg, ConductorMsg::Execute { request: "r-after".into() });
    d.ack().await.unwrap();
}

/// Answers `Quick` at once and holds every other call until the test ends.
struct Hanging(tokio::sync::Notify);

impl BoardCaller for Hanging {
    fn call<'a>(&'a self, procedure: &'a str, _args: Vec<Value>) -> BoxFuture<'a, Result<Value, iotronic::Error>> {
        Box::pin(async move {
            if !procedure.ends_with(".Quick") {
                self.0.notified().await;
            }
            Ok(json!("done"))
        })
    }
}

/// An agent on RabbitMQ takes as many calls as it runs at once: 40 calls to boards that do
/// not answer do not hold up a call to one that does (the broker handed an agent 32 calls
/// at a time, acknowledged only when the boards had answered, up to a minute later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_hung_boards_do_not_hold_up_the_others() {
    let prefix = format!("bus-test-{}", uuid::Uuid::new_v4().simple());
    let bus = bus(BROKER, &prefix).await;
    let mut results = bus.conductor_deliveries().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let caller = Arc::new(Hanging(tokio::sync::Notify::new()));
    let worker = tokio::spawn(run_worker("a1".into(), bus.clone(), caller, stop.clone()));
    let call = |request: String, procedure: &str| AgentCall {
        request,
        board: "b".into(),
        session: "1".into(),
        procedure: procedure.into(),
        args: vec![],
        omit_req: false,
    };
    for i in 0..40 {
        bus.to_agent("a1", &call(format!("hang-{i}"), "Hang")).await.unwrap();
    }
    bus.to_agent("a1", &call("quick".into(), "Quick")).await.unwrap();
    let d =
        tokio::time::timeout(Duration::from_secs(20), results.recv()).await.expect("the quick call waited").unwrap();
    assert!(matches!(&d.msg, ConductorMsg::Result { request, .. } if request == "quick"), "{:?}", d.msg);
    d.ack().await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
}

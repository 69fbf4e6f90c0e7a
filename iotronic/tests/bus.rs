//! The RabbitMQ bus against the real broker (127.0.0.1:5672), reached through a relay the
//! test can cut: what a process consumes keeps arriving after its connection breaks.

use std::net::SocketAddr;
use std::time::Duration;

use iotronic::bus::{AmqpUrl, Bus, ConductorMsg};
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

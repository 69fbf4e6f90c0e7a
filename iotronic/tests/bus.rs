//! The RabbitMQ bus against the real broker (127.0.0.1:5672), reached through a relay the
//! test can cut: what a process consumes keeps arriving after its connection breaks. And the
//! agent worker's limits, in-process where no broker is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use iotronic::agent::{
    BoardCaller, BoxFuture, MAX_CALLS_PER_BOARD, MAX_CALLS_PER_PROJECT, ReportRetry, run_worker, run_worker_with,
};
use iotronic::bus::{AgentCall, AmqpUrl, Bus, ConductorMsg};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

const BROKER: &str = "127.0.0.1:5672";

/// The state of a [`relay`]: bumping `cuts` cuts every connection open then; while `down`,
/// new connections are closed at once (the broker is unreachable), and counted in `refused`.
#[derive(Default)]
struct Link {
    cuts: u64,
    down: bool,
    refused: u64,
}

/// A TCP relay to the broker, controlled through the sender's [`Link`].
async fn relay() -> (SocketAddr, watch::Sender<Link>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (link, _) = watch::channel(Link::default());
    let links = link.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let mut cutting = links.subscribe();
            let (down, cuts) = {
                let l = cutting.borrow_and_update();
                (l.down, l.cuts)
            };
            if down {
                links.send_modify(|l| l.refused += 1);
                continue;
            }
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(BROKER).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = cutting.wait_for(|l| l.cuts > cuts) => {}
                }
            });
        }
    });
    (addr, link)
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

    cut.send_modify(|l| l.cuts += 1);
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
struct Hanging(Notify);

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

fn agent_call(board: &str, request: &str, procedure: &str) -> AgentCall {
    AgentCall {
        request: request.into(),
        board: board.into(),
        session: "1".into(),
        procedure: procedure.into(),
        project: "p".into(),
        args: vec![],
        omit_req: false,
    }
}

/// One project's hung boards take at most `MAX_CALLS_PER_PROJECT` of its agent's calls, however
/// many boards they are: 8 boards at their share each held all 256, and another project's
/// call waited behind them.
#[tokio::test]
async fn a_projects_hung_boards_do_not_take_every_call_of_its_agent() {
    let bus = Bus::in_process();
    let mut results = bus.conductor_deliveries().await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run_worker("a1".into(), bus.clone(), Arc::new(Hanging(Notify::new())), stop.clone()));
    const BOARDS: usize = 8;
    for b in 0..BOARDS {
        for i in 0..MAX_CALLS_PER_BOARD {
            bus.to_agent("a1", &agent_call(&format!("hung-{b}"), &format!("hang-{b}-{i}"), "Hang")).await.unwrap();
        }
    }
    let quick = AgentCall { project: "q".into(), ..agent_call("c", "quick", "Quick") };
    bus.to_agent("a1", &quick).await.unwrap();
    let (mut answered, mut refused) = (false, 0);
    while !answered || refused < BOARDS * MAX_CALLS_PER_BOARD - MAX_CALLS_PER_PROJECT {
        let d = tokio::time::timeout(Duration::from_secs(20), results.recv())
            .await
            .expect("the other project's call waited")
            .unwrap();
        match &d.msg {
            ConductorMsg::Result { request, .. } if request == "quick" => answered = true,
            ConductorMsg::Failed { reason, .. } => {
                assert!(
                    reason.contains(&format!("the project has {MAX_CALLS_PER_PROJECT} calls in flight")),
                    "{reason}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// An agent on RabbitMQ takes as many calls as it runs at once: 40 calls to boards that do
/// not answer do not hold up a call to one that does (the broker handed an agent 32 calls
/// at a time, acknowledged only when the boards had answered, up to a minute later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_hung_boards_do_not_hold_up_the_others() {
    let prefix = format!("bus-test-{}", uuid::Uuid::new_v4().simple());
    let bus = bus(BROKER, &prefix).await;
    let mut results = bus.conductor_deliveries().await.unwrap();
    let stop = CancellationToken::new();
    let caller = Arc::new(Hanging(Notify::new()));
    let worker = tokio::spawn(run_worker("a1".into(), bus.clone(), caller, stop.clone()));
    // Four hung boards, each within its share of the agent's calls.
    for i in 0..40 {
        bus.to_agent("a1", &agent_call(&format!("hung-{}", i % 4), &format!("hang-{i}"), "Hang")).await.unwrap();
    }
    bus.to_agent("a1", &agent_call("c", "quick", "Quick")).await.unwrap();
    let d =
        tokio::time::timeout(Duration::from_secs(20), results.recv()).await.expect("the quick call waited").unwrap();
    assert!(matches!(&d.msg, ConductorMsg::Result { request, .. } if request == "quick"), "{:?}", d.msg);
    d.ack().await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// One hung board takes at most `MAX_CALLS_PER_BOARD` of its agent's calls; the rest fail at
/// once, saying why. 300 calls to a board that never answers (a project's `?async=true`
/// calls) held all 256 and every other board's call waited behind them.
#[tokio::test]
async fn a_hung_board_does_not_take_every_call_of_its_agent() {
    let bus = Bus::in_process();
    let mut results = bus.conductor_deliveries().await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run_worker("a1".into(), bus.clone(), Arc::new(Hanging(Notify::new())), stop.clone()));
    const CALLS: usize = 300;
    for i in 0..CALLS {
        bus.to_agent("a1", &agent_call("b", &format!("hang-{i}"), "Hang")).await.unwrap();
    }
    bus.to_agent("a1", &agent_call("c", "quick", "Quick")).await.unwrap();
    let (mut quick, mut refused) = (false, 0);
    while !quick || refused < CALLS - MAX_CALLS_PER_BOARD {
        let d = tokio::time::timeout(Duration::from_secs(20), results.recv())
            .await
            .expect("the quick call waited")
            .unwrap();
        match &d.msg {
            ConductorMsg::Result { request, .. } if request == "quick" => quick = true,
            ConductorMsg::Failed { board, reason, .. } if board == "b" => {
                assert_eq!(reason, &format!("board b has {MAX_CALLS_PER_BOARD} calls in flight; try again later"));
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// Answers each call when told to, after saying that it arrived.
struct OnCue {
    arrived: mpsc::UnboundedSender<()>,
    go: Notify,
}

impl BoardCaller for OnCue {
    fn call<'a>(&'a self, _procedure: &'a str, _args: Vec<Value>) -> BoxFuture<'a, Result<Value, iotronic::Error>> {
        Box::pin(async move {
            let _ = self.arrived.send(());
            self.go.notified().await;
            Ok(json!("done"))
        })
    }
}

/// A board's answer that the agent cannot report during a broker outage reaches the
/// conductor when the broker is back, however long the outage. It was given up after some
/// 30 s, and the broker's redelivery of the call came back to the same agent, which took it
/// for a duplicate and acked it: the board had acted, and its request stayed RUNNING for 2 h.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_held_up_by_a_broker_outage_is_reported_after_it() {
    let prefix = format!("bus-test-{}", uuid::Uuid::new_v4().simple());
    let (addr, link) = relay().await;
    let agent_bus = bus(&addr.to_string(), &prefix).await;
    let direct = bus(BROKER, &prefix).await;
    let mut results = direct.conductor_deliveries().await.unwrap();
    let (arrived, mut arrivals) = mpsc::unbounded_channel();
    let board = Arc::new(OnCue { arrived, go: Notify::new() });
    let stop = CancellationToken::new();
    // Reports retried from 10 ms on, so that the outage below lasts longer than the 0.63 s
    // (10 ms doubled six times) after which they were given up.
    let retry = ReportRetry { first: Duration::from_millis(10), max: Duration::from_millis(100) };
    let worker = tokio::spawn(run_worker_with("a1".into(), agent_bus, board.clone(), stop.clone(), retry));
    direct.to_agent("a1", &agent_call("b", "r1", "DeviceReboot")).await.unwrap();
    arrivals.recv().await.unwrap();

    link.send_modify(|l| {
        l.cuts += 1;
        l.down = true;
    });
    // The board answers once the agent knows its connection is down (it is trying to connect
    // again): a report sent before waits for the reconnection, within one attempt.
    link.subscribe().wait_for(|l| l.refused > 0).await.unwrap();
    board.go.notify_one();
    // The outage's length is what is tested, not a wait for something to happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    link.send_modify(|l| l.down = false);

    let d = tokio::time::timeout(Duration::from_secs(60), results.recv())
        .await
        .expect("no answer after the outage")
        .unwrap();
    assert!(matches!(&d.msg, ConductorMsg::Result { request, .. } if request == "r1"), "{:?}", d.msg);
    d.ack().await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
}

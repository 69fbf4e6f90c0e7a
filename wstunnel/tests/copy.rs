//! The copying data path of a plain-TCP channel (`S4T_TUNNEL_SPLICE=0`: payload read into
//! memory and written out, as over TLS; by default it is spliced, as in every other test
//! over ws://) end to end: a real server and client on 127.0.0.1, a real echo target. Its own
//! test binary, because the switch is read once per process.

mod common;

use common::*;

#[test]
fn copying_tunnels_carry_large_transfers_intact_both_ways() {
    // SAFETY: set before the runtime (or any other thread) starts; read once, below.
    unsafe { std::env::set_var("S4T_TUNNEL_SPLICE", "0") };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let srv = start_server().await;
        let echo = echo_server().await;
        let (client, _stop) = start_client(&srv.url());
        let port = within("expose", client.expose(token("b", 0), 0, echo.to_string())).await.unwrap().port;
        echo_checksummed(port, 48 * 1024 * 1024).await;
        // And small exchanges on the same tunnel.
        let mut s = connect(port).await;
        assert_eq!(echo_once(&mut s, b"ping").await, b"ping");
    });
}

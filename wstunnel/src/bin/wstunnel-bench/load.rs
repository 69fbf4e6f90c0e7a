//! The board-side services (an echo server, a throughput target) and the user-side load.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 256 * 1024;

/// Echoes every connection until EOF.
pub async fn echo_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// The throughput target: the first byte says the direction. `F`: read and discard until EOF.
/// `R` + 8-byte duration in ms: write as fast as possible for that long, then close.
pub async fn bulk_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                let mut buf = vec![0x5au8; BUF];
                if mode[0] == b'R' {
                    let mut ms = [0u8; 8];
                    if s.read_exact(&mut ms).await.is_err() {
                        return;
                    }
                    let end = Instant::now() + Duration::from_millis(u64::from_be_bytes(ms));
                    while Instant::now() < end {
                        if s.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.shutdown().await;
                } else {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Moves bytes for `secs` seconds over `streams` connections to `port`, user → board (`fwd`)
/// or board → user; returns MB/s (10^6 bytes) and the bytes moved.
pub async fn throughput(port: u16, streams: usize, secs: f64, fwd: bool) -> Result<(f64, u64)> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = vec![0xa5u8; BUF];
            let mut moved = 0u64;
            if fwd {
                s.write_all(b"F").await?;
                let end = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < end {
                    s.write_all(&buf).await?;
                    moved += buf.len() as u64;
                }
                s.shutdown().await?;
                // Wait for the board side to close: everything has then arrived.
                while s.read(&mut buf).await? != 0 {}
            } else {
                s.write_all(b"R").await?;
                s.write_all(&((secs * 1000.0) as u64).to_be_bytes()).await?;
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    moved += n as u64;
                }
            }
            Ok::<u64, anyhow::Error>(moved)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let el = start.elapsed().as_secs_f64();
    Ok((total as f64 / el / 1e6, total))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// New connection → 1-byte echo, `n` times: (p50, p99) in ms.
pub async fn connect_latency(port: u16, n: usize) -> Result<(f64, f64)> {
    blocking_p50_p99(move || {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_nodelay(true)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(v)
    })
    .await
}

/// 64-byte round trips on one open connection, `m` times: (p50, p99) in µs.
pub async fn rtt(port: u16, m: usize) -> Result<(f64, f64)> {
    blocking_p50_p99(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        let msg = [b'p'; 64];
        let mut back = [0u8; 64];
        let mut v = Vec::with_capacity(m);
        for _ in 0..m {
            let t = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })
    .await
}

/// Runs a latency measurement (`measure` returns its samples) on a blocking socket in a thread
/// of its own, so the figure is the tunnel's and not the bench's: a tokio client adds two
/// thread hand-offs (its I/O driver waking the waiting task's thread) per exchange, the same
/// for every case, which on the 2026-12-04 VM was ~20 µs of a direct connect. (p50, p99).
async fn blocking_p50_p99(measure: impl FnOnce() -> Result<Vec<f64>> + Send + 'static) -> Result<(f64, f64)> {
    let mut v = tokio::task::spawn_blocking(measure).await??;
    Ok((pct(&mut v, 50.0), pct(&mut v, 99.0)))
}

/// Connections held from one source address: under our server's bound of public connections
/// per source (256), so `hold` opens them from several loopback addresses.
const HELD_PER_SOURCE: usize = 200;

/// Opens `k` connections, each proven with a 1-byte echo; returns them (held open). They come
/// from 127.0.0.1, 127.0.0.2, … ([`HELD_PER_SOURCE`] each), as a thousand users would.
pub async fn hold(port: u16, k: usize) -> Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(k);
    for i in 0..k {
        let from = std::net::Ipv4Addr::new(127, 0, 0, (1 + i / HELD_PER_SOURCE).min(254) as u8);
        let connect = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((from, 0).into())?;
            socket.connect(([127, 0, 0, 1], port).into()).await
        };
        let mut s = match connect.await {
            Ok(s) => s,
            Err(e) => bail!("connection {i} of {k} failed: {e}"),
        };
        s.write_all(b"h").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        held.push(s);
    }
    Ok(held)
}

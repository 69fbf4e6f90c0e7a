//! The reference relay (`wstunnel-bench relay LISTEN TO [--splice]`): the least a tunnel end
//! can do per byte. It accepts on `LISTEN`, opens one TCP connection to `TO` per connection,
//! and moves bytes both ways with a blocking thread per direction: no framing, no
//! multiplexing, no flow control, no encryption, no event loop. Two of them in a chain (user →
//! relay → relay → service, the bench cases `relay-copy` and `relay-splice`) cross the same
//! three TCP connections as a reverse tunnel does, so their figures bound what any tunnel of
//! that shape can reach on this machine.
//!
//! `--splice` moves the bytes socket → pipe → socket with splice(2) instead of copying them
//! through a buffer.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::thread;

use anyhow::{Context, Result, bail};
use rustix::pipe::{PipeFlags, SpliceFlags};

/// Bytes per read (the bench's own buffer size), or the pipe's size when splicing.
const CHUNK: usize = 256 * 1024;
/// Two threads per relayed connection; a small stack keeps 1,000 held connections cheap.
const STACK: usize = 64 * 1024;

pub fn run(args: &[String]) -> Result<()> {
    let (listen, to, splice) = match args {
        [l, t] => (l, t.clone(), false),
        [l, t, s] if s == "--splice" => (l, t.clone(), true),
        _ => bail!("usage: wstunnel-bench relay LISTEN TO [--splice]"),
    };
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening on {}", l.local_addr()?);
    io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(user) = conn else { continue };
        let to = to.clone();
        spawn(move || {
            let Ok(next) = TcpStream::connect(&to) else { return };
            let _ = (user.set_nodelay(true), next.set_nodelay(true));
            let (Ok(user2), Ok(next2)) = (user.try_clone(), next.try_clone()) else { return };
            let up = spawn(move || pump(user2, next2, splice));
            pump(next, user, splice);
            if let Some(t) = up {
                let _ = t.join();
            }
        });
    }
    Ok(())
}

fn spawn(f: impl FnOnce() + Send + 'static) -> Option<thread::JoinHandle<()>> {
    thread::Builder::new().stack_size(STACK).spawn(f).ok()
}

/// `from` → `to` until end of stream, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream, splice: bool) {
    let _ = if splice { splice_all(&from, &to) } else { copy_all(&mut from, &mut to) };
    let _ = to.shutdown(Shutdown::Write);
}

fn copy_all(from: &mut TcpStream, to: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf)? {
            0 => return Ok(()),
            n => to.write_all(&buf[..n])?,
        }
    }
}

fn splice_all(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (r, w): (OwnedFd, OwnedFd) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    let _ = rustix::pipe::fcntl_setpipe_size(&w, CHUNK);
    loop {
        let mut n = rustix::pipe::splice(from, None, &w, None, CHUNK, SpliceFlags::MOVE)?;
        if n == 0 {
            return Ok(());
        }
        while n > 0 {
            n -= rustix::pipe::splice(&r, None, to, None, n, SpliceFlags::MOVE)?;
        }
    }
}

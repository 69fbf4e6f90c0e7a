//! Zero-copy payload on the receiving end of plain-TCP channels (on unless turned off, see
//! [`enabled`]): a large data frame's payload moves from the channel's socket into a pipe and
//! from the pipe into its stream's socket with splice(2), waiting in its pipe while the
//! stream's socket is full. It never passes through user space, which saves the two copies
//! (socket → buffer → socket) per byte received.
//!
//! The sending end copies ([`crate::io`]'s `send_from`): it reads several frames' worth in
//! one call and writes them in one more, fewer calls than splicing each frame in and out
//! behind its headers; measured, splicing there cost throughput (docs/benchmarks.md).
//!
//! Only unmasked frames over plain TCP are spliced; TLS and masked frames take the buffered
//! path. A kernel that refuses splice for a socket makes the channel read instead, for good.

use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Splicing is on unless `S4T_TUNNEL_SPLICE=0` (read once per process), for a host where
/// it does not pay or a sandbox that refuses it politely (one that fails it with `EINVAL`,
/// `ENOSYS`, `EOPNOTSUPP` or `EPERM` turns it off by itself). Unit tests always exercise it.
pub(crate) fn enabled() -> bool {
    if cfg!(test) {
        return true;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("S4T_TUNNEL_SPLICE").is_none_or(|v| v != "0"))
}

/// A pipe that carries one frame's payload at a time.
pub(crate) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

impl Pipe {
    /// A non-blocking pipe, enlarged to `size` bytes when the system allows (a smaller pipe
    /// only means shorter frames).
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let _ = rustix::pipe::fcntl_setpipe_size(&w, size);
        Ok(Pipe { r, w })
    }

    #[cfg(test)]
    pub(crate) fn inode(&self) -> u64 {
        rustix::fs::fstat(&self.r).expect("fstat of a pipe").st_ino
    }

    /// Moves up to `max` bytes that `tcp` has ready into the (empty) pipe: `Ok(0)` at end of
    /// stream, `WouldBlock` when nothing is ready (which clears the socket's readiness).
    pub(crate) fn fill_from(&self, tcp: &TcpStream, max: usize) -> io::Result<usize> {
        tcp.try_io(Interest::READABLE, || Ok(rustix::pipe::splice(tcp, None, &self.w, None, max, FLAGS)?))
    }

    /// Moves up to `len` bytes from the pipe into `sock`, waiting for room.
    pub(crate) async fn drain_into(&self, sock: &TcpStream, len: usize) -> io::Result<usize> {
        loop {
            sock.writable().await?;
            match self.try_drain_into(sock, len) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Moves up to `len` bytes from the pipe into `sock` if it has room now.
    pub(crate) fn try_drain_into(&self, sock: &TcpStream, len: usize) -> io::Result<usize> {
        sock.try_io(Interest::WRITABLE, || Ok(rustix::pipe::splice(&self.r, None, sock, None, len, FLAGS)?))
    }
}

/// The pipe in `slot`, made (of `size` bytes) if there is none yet; `None`, with `on` turned
/// off for good, when no pipe can be made (out of descriptors, say): the caller copies.
pub(crate) fn pipe_or_off<'a>(slot: &'a mut Option<Pipe>, on: &mut bool, size: usize) -> Option<&'a Pipe> {
    if slot.is_none() {
        match Pipe::new(size) {
            Ok(p) => *slot = Some(p),
            Err(e) => {
                tracing::debug!(cause = %e, "no pipe for splicing: copying instead");
                *on = false;
                return None;
            }
        }
    }
    slot.as_ref()
}

/// The kernel (or a sandbox) does not splice between these descriptors: use buffers.
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM))
}

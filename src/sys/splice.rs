//! `splice(2)` through a pipe: bytes go socket → pipe → socket inside the kernel, never
//! through a user-space buffer. The relay's zero-copy path (src/proxy/relay.rs).
//!
//! No `unsafe` here: rustix wraps `pipe2` and `splice` safely. Pipes are pooled: a tunnel
//! holds one only while data moves in its direction and gives it back empty, so an idle
//! tunnel holds no pipe (and no buffer) at all.
//!
//! Must not: return a pipe to the pool that still holds bytes (they would leak into
//! another tunnel), or block: every call is non-blocking and reports `WouldBlock`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use rustix::pipe::{PipeFlags, SpliceFlags};

/// Bytes one pipe carries at once. The kernel's default pipe is 64 KiB (16 pages); we ask
/// for 256 KiB (fewer splice calls per megabyte in bulk transfers; within the unprivileged
/// `fs.pipe-max-size` of 1 MiB) and fall back to what we got. Pages are only used while
/// bytes sit in the pipe, and pooled pipes are empty.
pub const PIPE_CHUNK: usize = 256 * 1024;
/// The kernel's default pipe size, assumed if it cannot be read.
const DEFAULT_PIPE: usize = 64 * 1024;
/// Empty pipes kept for reuse; beyond it they are closed. Two fds each.
const POOL_MAX: usize = 256;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A non-blocking pipe and how many bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    pending: usize,
    /// The pipe's size: never ask to hold more.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Best effort: a smaller pipe only means more splice calls.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_CHUNK)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .unwrap_or(DEFAULT_PIPE);
        Ok(Self {
            read,
            write,
            pending: 0,
            capacity: capacity.min(PIPE_CHUNK),
        })
    }

    /// A pipe from the pool, or a new one.
    pub fn take() -> io::Result<Self> {
        let pooled = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match pooled {
            Some(p) => Ok(p),
            None => Self::new(),
        }
    }

    /// Give the pipe back for reuse if it is empty (true); close it otherwise.
    pub fn give_back(self) -> bool {
        if self.pending != 0 {
            return false; // dropped: never hand stale bytes to another tunnel
        }
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL_MAX {
            pool.push(self);
            return true;
        }
        false
    }

    /// Bytes in the pipe, waiting for [`Pipe::drain_into`].
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Move up to `len` bytes from the socket `from` into the pipe. `Ok(0)` is EOF;
    /// `WouldBlock` when the socket has nothing to read.
    pub fn fill_from(&mut self, from: impl AsFd, len: usize) -> io::Result<usize> {
        let room = self.capacity.saturating_sub(self.pending).min(len);
        if room == 0 {
            return Err(io::Error::other("pipe full"));
        }
        let n = rustix::pipe::splice(
            from,
            None,
            &self.write,
            None,
            room,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?;
        self.pending += n;
        Ok(n)
    }

    /// Move up to `len` of the pending bytes into the socket `to`; `WouldBlock` when the
    /// socket's send buffer is full.
    pub fn drain_into(&mut self, to: impl AsFd, len: usize) -> io::Result<usize> {
        let want = self.pending.min(len);
        if want == 0 {
            return Ok(0);
        }
        let n = rustix::pipe::splice(
            &self.read,
            None,
            to,
            None,
            want,
            SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
        )?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "splice wrote nothing",
            ));
        }
        self.pending -= n;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_cross_socket_to_socket_and_the_pipe_returns_empty() {
        let (mut src_w, src_r) = pair();
        let (dst_w, mut dst_r) = pair();
        src_r.set_nonblocking(true).unwrap();
        let mut pipe = Pipe::take().unwrap();
        // Nothing to read yet: WouldBlock, not EOF.
        let e = pipe.fill_from(&src_r, PIPE_CHUNK).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        src_w.write_all(b"hello, splice").unwrap();
        let mut moved = 0;
        for _ in 0..100 {
            match pipe.fill_from(&src_r, PIPE_CHUNK) {
                Ok(n) => {
                    moved += n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(moved, 13);
        assert_eq!(pipe.pending(), 13);
        assert_eq!(pipe.drain_into(&dst_w, 5).unwrap(), 5);
        assert_eq!(pipe.drain_into(&dst_w, 100).unwrap(), 8);
        assert_eq!(pipe.pending(), 0);
        let mut got = [0u8; 13];
        dst_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello, splice");
        // EOF reads as 0.
        drop(src_w);
        let mut eof = None;
        for _ in 0..100 {
            match pipe.fill_from(&src_r, PIPE_CHUNK) {
                Ok(n) => {
                    eof = Some(n);
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        assert_eq!(eof, Some(0));
        assert!(pipe.give_back(), "an empty pipe goes back to the pool");
    }

    #[test]
    fn a_pipe_with_bytes_left_is_not_pooled() {
        let (mut src_w, src_r) = pair();
        let mut pipe = Pipe::new().unwrap();
        src_w.write_all(b"stale").unwrap();
        // Blocking socket: waits for the bytes.
        assert_eq!(pipe.fill_from(&src_r, PIPE_CHUNK).unwrap(), 5);
        assert!(!pipe.give_back(), "a non-empty pipe was pooled");
    }
}

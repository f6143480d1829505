//! `splice(2)` through a pipe: bytes go socket → pipe → socket inside the kernel, never
//! through a user-space buffer. The relay's zero-copy path (src/proxy/relay.rs). Also the
//! `recv`/`send` into a stack buffer that the relay uses for small reads, and the way their
//! unsent rest joins the pipe.
//!
//! No `unsafe` here: rustix wraps `pipe2`, `splice`, `recv` (into uninitialised memory,
//! returning only the bytes it wrote) and `send` safely. Pipes are pooled: a tunnel
//! holds one only while data moves in its direction and gives it back empty, so an idle
//! tunnel holds no pipe (and no buffer) at all.
//!
//! Must not: return a pipe to the pool that still holds bytes (they would leak into
//! another tunnel), or block: every call is non-blocking and reports `WouldBlock`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, PoisonError};

use rustix::net::{RecvFlags, SendFlags};
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

    /// Bytes the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Put `bytes` (read into user space, not sent yet) into the pipe, behind what is
    /// pending, to go out with [`Pipe::drain_into`]. All of them or an error: the caller
    /// checks they fit ([`Pipe::capacity`]), and a pipe with room takes a write whole.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.capacity.saturating_sub(self.pending) {
            return Err(io::Error::other("pipe too small"));
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rustix::io::write(&self.write, rest)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pipe took nothing",
                ));
            }
            self.pending += n;
            rest = rest.get(n..).unwrap_or_default();
        }
        Ok(())
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

/// One `recv` from the socket `from` into `buf` (not zeroed first): the bytes read, empty
/// at EOF, `WouldBlock` when there are none. For small reads, where splice's pipe work
/// costs more than copying the bytes.
pub fn recv_into(from: impl AsFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<&[u8]> {
    let ((read, _), _) = rustix::net::recv(from, buf, RecvFlags::DONTWAIT)?;
    Ok(read)
}

/// One non-blocking `send` of `bytes` to the socket `to`: how many it took.
pub fn send_from(to: impl AsFd, bytes: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        to,
        bytes,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// `op` until it stops saying `WouldBlock` (at most 100 tries, 5 ms apart).
    fn when_ready<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        for _ in 0..100 {
            match op() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                done => return done,
            }
        }
        op()
    }

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
        let moved = when_ready(|| pipe.fill_from(&src_r, PIPE_CHUNK)).unwrap();
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
        let eof = when_ready(|| pipe.fill_from(&src_r, PIPE_CHUNK)).unwrap();
        assert_eq!(eof, 0);
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

    /// Bytes pushed from user space queue behind the spliced ones and leave in order; a
    /// push the pipe cannot hold whole is refused, not cut.
    #[test]
    fn pushed_bytes_follow_spliced_ones_and_an_oversized_push_is_refused() {
        let (mut src_w, src_r) = pair();
        let (dst_w, mut dst_r) = pair();
        let mut pipe = Pipe::new().unwrap();
        src_w.write_all(b"spliced,").unwrap();
        assert_eq!(pipe.fill_from(&src_r, PIPE_CHUNK).unwrap(), 8); // blocking socket
        pipe.push(b" then pushed").unwrap();
        assert_eq!(pipe.pending(), 20);
        let too_big = vec![0u8; pipe.capacity()];
        assert!(pipe.push(&too_big).is_err());
        assert_eq!(pipe.pending(), 20, "a refused push leaves nothing behind");
        let mut out = 0;
        while pipe.pending() > 0 {
            out += pipe.drain_into(&dst_w, 100).unwrap();
        }
        assert_eq!(out, 20);
        let mut got = [0u8; 20];
        dst_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"spliced, then pushed");
    }

    #[test]
    fn recv_into_reads_what_is_there_and_send_from_sends_it() {
        let (mut a, b) = pair();
        b.set_nonblocking(true).unwrap();
        let mut buf = [MaybeUninit::<u8>::uninit(); 64];
        let e = recv_into(&b, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        a.write_all(b"ping").unwrap();
        let got = when_ready(|| recv_into(&b, &mut buf).map(<[u8]>::to_vec)).unwrap();
        assert_eq!(got, b"ping");
        assert_eq!(send_from(&b, b"pong").unwrap(), 4);
        let mut back = [0u8; 4];
        a.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"pong");
        drop(a);
        let eof = when_ready(|| recv_into(&b, &mut buf).map(<[u8]>::len)).unwrap();
        assert_eq!(eof, 0, "EOF reads as no bytes");
    }
}

//! `loadgen relay --listen ADDR --to ADDR [--copy]`: the smallest TCP relay that can be
//! written, as a reference for the bulk tests. No policy, no parsing, no event loop: one
//! blocking thread per direction, moving bytes by `splice(2)` through a 256 KiB pipe (the
//! size portcullis asks for) or, with `--copy`, by `read`/`write` through a 256 KiB buffer.
//! What it reaches is the ceiling any relay has on this machine's loopback path; the
//! benchmark reports portcullis against it beside direct.
//!
//! A thread per direction costs a stack per tunnel: use it for the bulk tests only.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

use rustix::pipe::SpliceFlags;

const CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy)]
pub enum Mode {
    Splice,
    Copy,
}

pub fn run(listen: SocketAddr, to: SocketAddr, mode: Mode) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    loop {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
        };
        std::thread::spawn(move || {
            let _ = tunnel(client, to, mode);
        });
    }
}

fn tunnel(client: TcpStream, to: SocketAddr, mode: Mode) -> io::Result<()> {
    let upstream = TcpStream::connect(to)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (c2, u2) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || pump(&c2, &u2, mode));
    let down = pump(&upstream, &client, mode);
    let _ = up.join();
    down.map(drop)
}

/// `from` → `to` until EOF (then half-close `to`) or an error (then close both ways, so
/// the other direction's thread ends too).
fn pump(from: &TcpStream, to: &TcpStream, mode: Mode) -> io::Result<u64> {
    let moved = match mode {
        Mode::Splice => pump_splice(from, to),
        Mode::Copy => pump_copy(from, to),
    };
    match moved {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
    moved
}

fn pump_splice(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (r, w): (OwnedFd, OwnedFd) = rustix::pipe::pipe()?;
    let cap = rustix::pipe::fcntl_setpipe_size(&w, CHUNK).unwrap_or(64 * 1024);
    let mut total = 0u64;
    loop {
        let n = rustix::pipe::splice(from, None, &w, None, cap, SpliceFlags::MOVE)?;
        if n == 0 {
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = rustix::pipe::splice(&r, None, to, None, left, SpliceFlags::MOVE)?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
        }
        total += n as u64;
    }
}

fn pump_copy(mut from: &TcpStream, mut to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

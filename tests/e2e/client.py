#!/usr/bin/env python3
"""Raw agent-side client for the namespace tests: things curl cannot do.

  send HOST PORT HEX MODE   send the bytes (hex) whole or one byte per segment; print how
                            many bytes came back within 3 s
  exchange HOST PORT HEX     send the bytes (hex) whole; print in hex what came back
                            before the close (at most 3 s, 64 KiB)
  hold HOST PORT N SECS     open N connections, send one byte on each, hold them SECS
                            seconds (bounded), then close; print how many connected
  udp HOST PORT             send one datagram
  dns HOST PORT udp|tcp NAME
                            ask one A question; print the response code and the A
                            addresses (`NOERROR 203.0.113.10`), or `timeout` after 2 s
"""
import random
import socket
import struct
import sys
import time


def send(host, port, hexbytes, mode):
    data = bytes.fromhex(hexbytes)
    s = socket.create_connection((host, int(port)), timeout=3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "bytewise":
        for i in range(len(data)):
            s.send(data[i:i + 1])
            time.sleep(0.0005)
    else:
        s.sendall(data)
    got = 0
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    print(got)


def exchange(host, port, hexbytes):
    s = socket.create_connection((host, int(port)), timeout=3)
    s.sendall(bytes.fromhex(hexbytes))
    got = b""
    deadline = time.monotonic() + 3
    try:
        while len(got) < 65536 and time.monotonic() < deadline:
            s.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    print(got.hex())


def hold(host, port, n, secs):
    socks = []
    for _ in range(int(n)):
        try:
            s = socket.create_connection((host, int(port)), timeout=3)
            s.send(b"\x16")
            socks.append(s)
        except OSError:
            break
    print(len(socks), flush=True)
    time.sleep(min(float(secs), 30.0))
    for s in socks:
        s.close()


def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"quic-initial-lookalike", (host, int(port)))


RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def skip_name(msg, i):
    while True:
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def dns(host, port, transport, name):
    qid = random.randrange(1 << 16)
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.strip(".").split(".")) + b"\0"
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    try:
        if transport == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(query, (host, int(port)))
            msg = s.recv(65535)
        else:
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(struct.pack(">H", len(query)) + query)
            msg = b""
            while len(msg) < 2 or len(msg) < 2 + struct.unpack(">H", msg[:2])[0]:
                chunk = s.recv(65535)
                if not chunk:
                    raise socket.timeout("closed")
                msg += chunk
            msg = msg[2:]
    except (socket.timeout, ConnectionError, OSError):
        print("timeout")
        return
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    if rid != qid or not flags & 0x8000:
        print("bad-reply")
        return
    i = 12
    for _ in range(qd):
        i = skip_name(msg, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(msg, i)
        rtype, _, _, rdlen = struct.unpack(">HHIH", msg[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(msg[i:i + 4]))
        i += rdlen
    print(" ".join([RCODES.get(flags & 0xF, str(flags & 0xF))] + addrs))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"send": send, "exchange": exchange, "hold": hold, "udp": udp, "dns": dns}[cmd](*args)

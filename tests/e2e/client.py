#!/usr/bin/env python3
"""Raw agent-side client for the namespace tests: things curl cannot do.

  send HOST PORT HEX MODE   send the bytes (hex) whole or one byte per segment; print how
                            many bytes came back within 3 s
  hold HOST PORT N SECS     open N connections, send one byte on each, hold them SECS
                            seconds (bounded), then close; print how many connected
  udp HOST PORT             send one datagram
"""
import socket
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


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"send": send, "hold": hold, "udp": udp}[cmd](*args)

#!/usr/bin/env python3
"""Writes the small seed corpora checked in under fuzz/corpus/<target>/ (client_hello's
came from real clients and is not generated here). Re-run after changing a format:
    python3 fuzz/make_seeds.py
"""
import base64
import hashlib
import hmac
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- dns_message: queries as an agent sends them, answers as an upstream sends them ---
def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def header(id_, flags, qd=0, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def question(n, qtype, qclass=1):
    return name(n) + struct.pack(">HH", qtype, qclass)


def rr(n, rtype, rdata, ttl=300, rclass=1):
    return name(n) + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


OPT = b"\x00" + struct.pack(">HHIH", 41, 1232, 0, 0)
A, AAAA, CNAME, TXT, HTTPS, ANY = 1, 28, 5, 16, 65, 255


def svc_param(key, value):
    return struct.pack(">HH", key, len(value)) + value


def https_rdata(params):
    return struct.pack(">H", 1) + name(".") + b"".join(params)


RD = 0x0100
RESPONSE = 0x8180
write("dns_message", "query_a_allowed", header(0x1234, RD, qd=1) + question("www.allowed.test", A))
write("dns_message", "query_aaaa_edns", header(0x2345, RD, qd=1, ar=1) + question("exact.test", AAAA) + OPT)
write("dns_message", "query_https_wild", header(0x3456, RD, qd=1) + question("a.b.wild.test", HTTPS))
write("dns_message", "query_denied_name", header(0x4567, RD, qd=1) + question("no.allowed.test", A))
write("dns_message", "query_txt_exfil", header(0x5678, RD, qd=1) + question("aGVsbG8gd29ybGQ.evil.test", TXT))
write("dns_message", "query_any", header(0x6789, RD, qd=1) + question("allowed.test", ANY))
write("dns_message", "query_two_questions", header(0x789A, RD, qd=2) + question("allowed.test", A) + question("x.allowed.test", A))
write("dns_message", "query_notify_opcode", header(0x89AB, 0x2000, qd=1) + question("allowed.test", A))
ech_https = https_rdata([
    svc_param(0, struct.pack(">H", 5)),                      # mandatory: ech
    svc_param(1, b"\x02h2"),                                  # alpn h2
    svc_param(4, bytes([127, 0, 0, 1, 93, 184, 216, 34])),    # ipv4hint: loopback, public
    svc_param(5, b"\xfe\x0d\x00\x01\x02"),                     # ech
    svc_param(6, bytes(15) + b"\x01"),                         # ipv6hint ::1
])
write("dns_message", "answer_https_ech_hints",
      header(0x1234, RESPONSE, qd=1, an=1) + question("ech.allowed.test", HTTPS) + rr("ech.allowed.test", HTTPS, ech_https))
write("dns_message", "answer_rebinding",
      header(0x1234, RESPONSE, qd=1, an=5) + question("rebind.allowed.test", A)
      + rr("rebind.allowed.test", CNAME, name("edge.cdn.test"))
      + rr("edge.cdn.test", A, bytes([127, 0, 0, 1]))
      + rr("edge.cdn.test", A, bytes([169, 254, 169, 254]))
      + rr("edge.cdn.test", A, bytes([10, 9, 9, 9]))
      + rr("edge.cdn.test", A, bytes([93, 184, 216, 34])))
write("dns_message", "answer_aaaa_mapped",
      header(0x1234, RESPONSE, qd=1, an=2, ar=1) + question("exact.test", AAAA)
      + rr("exact.test", AAAA, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]))
      + rr("exact.test", AAAA, bytes.fromhex("26062800022000010248189325c81946")) + OPT)

# --- http_head ---
write("http_head", "get_absolute", "GET http://www.allowed.test/path?q=1 HTTP/1.1\r\nHost: www.allowed.test\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n")
write("http_head", "connect", "CONNECT api.allowed.test:443 HTTP/1.1\r\nHost: api.allowed.test:443\r\nProxy-Authorization: Basic Y29kZXItMTpwYXNz\r\n\r\n")
write("http_head", "get_origin_form", "GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\nConnection: keep-alive\r\n\r\n")
write("http_head", "duplicate_host", "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: evil.test\r\n\r\n")
write("http_head", "post_body", "POST http://a.test:80/upload HTTP/1.0\r\nHost: a.test:80\r\nContent-Length: 4\r\n\r\nabcd")

# --- rules_file / config_file: the shipped files ---
for sub in ("agents", "lists"):
    for f in sorted(os.listdir(os.path.join(ROOT, "rules", sub))):
        with open(os.path.join(ROOT, "rules", sub, f)) as fh:
            write("rules_file", f"{sub}_{f}", fh.read())
write("rules_file", "credentials_limits", '''name = "coder-1"
sources = ["10.66.0.11/32", "fd66::11/128"]
include = ["github"]
allow = ["api.anthropic.com", ".huggingface.co", "*.s3.amazonaws.com", "ci.example.org:8443"]
deny = ["gist.github.com"]
allow_cidrs = ["192.0.2.10/32:443"]
deny_ech = true
[credentials]
username = "coder-1"
password_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
[limits]
new_connections_per_second = 20
max_concurrent = 256
bandwidth = "50 MiB/s"
daily_bytes = "20 GiB"
''')
write("rules_file", "bound_sources", '''name = "coder-2"
sources = [
  "10.66.1.0/28",
  { net = "10.66.0.12/32", interface = "vlan66", mac = "02:00:00:00:00:12" },
  { net = "fd66::12/128", mac = "02:00:00:00:00:12" },
  { net = "10.66.2.0/24", interface = "wg0" },
]
allow = ["api.anthropic.com"]
''')
for src, dst in (("deploy/portcullis.toml", "reference"), ("deploy/debian/portcullis.toml", "appliance")):
    with open(os.path.join(ROOT, src)) as fh:
        write("config_file", dst, fh.read())
write("config_file", "empty", "")

# --- webhook: id 0xff timestamp 0xff signature-header 0xff body, signed with the target's
# secret at the target's clock, so the accept path is reachable ---
SECRET = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
NOW = 1_614_265_330


def signed(id_, ts, body, extra=""):
    mac = hmac.new(SECRET, f"{id_}.{ts}.".encode() + body, hashlib.sha256).digest()
    sig = "v1," + base64.b64encode(mac).decode()
    return id_.encode() + b"\xff" + str(ts).encode() + b"\xff" + (extra + sig).encode() + b"\xff" + body


write("webhook", "kill_all_valid", signed("msg_1", NOW, b'{"scope":"all","reason":"test"}'))
write("webhook", "kill_agent_valid", signed("msg_2", NOW - 60, b'{"scope":"agent","agent":"coder-1","reason":"x"}', extra="v1,bm90IGl0 "))
write("webhook", "revive_valid", signed("msg_3", NOW, b'{"scope":"all","totp":"123456"}'))
write("webhook", "expired", signed("msg_4", NOW - 3600, b'{"scope":"all"}'))
write("webhook", "bad_signature", b"msg_5\xff1614265330\xffv1,AAAA\xff{\"scope\":\"all\"}")

#!/usr/bin/env python3
"""The "internet" side of tests/clients_e2e.rs: one origin that real package clients can use.

  fixtures ROOT HTTPS_BASE   build, under ROOT: a static file (hello.txt), a PyPI simple
                             index with one wheel (simple/, files/), an npm registry with one
                             package (npm/), a git repository (git/repo.git) and a flat apt
                             repository with one package (apt/); HTTPS_BASE (e.g.
                             https://allowed.test) is where the npm metadata points its tarball
  serve ADDR PORT ROOT LOG [CERT KEY]
                             serve ROOT over HTTP (or HTTPS with CERT/KEY) until killed; paths
                             under /git/ go to `git http-backend` (smart HTTP); every request's
                             Host and path is appended to LOG, one line each, so the test can
                             prove what never arrived
"""
import email.utils
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

FILE_BODY = "hello from the origin\n"


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def tar_gz(members):
    """A .tar.gz of (name, bytes) pairs, reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar(members):
    """An ar(1) archive, the container of a .deb."""
    out = b"!<arch>\n"
    for name, data in members:
        out += b"%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name.encode(), 0, 0, 0, b"100644", len(data))
        out += data + (b"\n" if len(data) % 2 else b"")
    return out


def pip_index(root):
    files = os.path.join(root, "files")
    os.makedirs(files, exist_ok=True)
    wheel = "demo_pkg-1.0-py3-none-any.whl"
    meta = "demo_pkg-1.0.dist-info"
    body = {
        "demo_pkg/__init__.py": b"VALUE = 1\n",
        f"{meta}/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        f"{meta}/WHEEL": b"Wheel-Version: 1.0\nGenerator: origin.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},sha256={sha256(d)},{len(d)}\n" for n, d in body.items())
    record += f"{meta}/RECORD,,\n"
    path = os.path.join(files, wheel)
    with zipfile.ZipFile(path, "w") as z:
        for n, d in body.items():
            z.writestr(n, d)
        z.writestr(f"{meta}/RECORD", record)
    digest = sha256(open(path, "rb").read())
    page = os.path.join(root, "simple", "demo-pkg")
    os.makedirs(page, exist_ok=True)
    with open(os.path.join(page, "index.html"), "w") as f:
        f.write(f'<!DOCTYPE html><html><body><a href="../../files/{wheel}#sha256={digest}">{wheel}</a></body></html>\n')


def npm_registry(root, base):
    pkg = json.dumps({"name": "demo-pkg", "version": "1.0.0", "main": "index.js"}).encode()
    tgz = tar_gz([("package/package.json", pkg), ("package/index.js", b"module.exports = 1;\n")])
    d = os.path.join(root, "npm", "demo-pkg", "-")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "demo-pkg-1.0.0.tgz"), "wb") as f:
        f.write(tgz)
    import base64
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    meta = {
        "name": "demo-pkg",
        "dist-tags": {"latest": "1.0.0"},
        "versions": {
            "1.0.0": {
                "name": "demo-pkg",
                "version": "1.0.0",
                "main": "index.js",
                "dist": {
                    "tarball": f"{base}/npm/demo-pkg/-/demo-pkg-1.0.0.tgz",
                    "shasum": hashlib.sha1(tgz).hexdigest(),
                    "integrity": integrity,
                },
            }
        },
    }
    # npm asks for /npm/demo-pkg: a file can't share its name with the directory, so the
    # server maps a directory request to its index.json.
    with open(os.path.join(root, "npm", "demo-pkg", "index.json"), "w") as f:
        json.dump(meta, f)


def git_repo(root):
    bare = os.path.join(root, "git", "repo.git")
    work = os.path.join(root, "git-work")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", HOME=root)
    run = lambda *a, cwd=None: subprocess.run(a, cwd=cwd, env=env, check=True, capture_output=True)
    run("git", "init", "-q", "--bare", "-b", "main", bare)
    run("git", "init", "-q", "-b", "main", work)
    with open(os.path.join(work, "README"), "w") as f:
        f.write("cloned through portcullis\n")
    run("git", "add", "README", cwd=work)
    run("git", "commit", "-q", "-m", "first", cwd=work)
    run("git", "push", "-q", bare, "main", cwd=work)
    shutil.rmtree(work)


def apt_repo(root):
    d = os.path.join(root, "apt")
    os.makedirs(d, exist_ok=True)
    control = (b"Package: demo-pkg\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
               b"Description: a package served to apt through portcullis\n")
    deb = ar([("debian-binary", b"2.0\n"),
              ("control.tar.gz", tar_gz([("./control", control)])),
              ("data.tar.gz", tar_gz([("./usr/share/doc/demo-pkg/README", b"demo\n")]))])
    name = "demo-pkg_1.0_all.deb"
    with open(os.path.join(d, name), "wb") as f:
        f.write(deb)
    packages = control + f"Filename: ./{name}\nSize: {len(deb)}\nSHA256: {sha256(deb)}\n\n".encode()
    with open(os.path.join(d, "Packages"), "wb") as f:
        f.write(packages)
    with open(os.path.join(d, "Release"), "w") as f:
        f.write(f"Date: {email.utils.formatdate(usegmt=True)}\nSHA256:\n"
                f" {sha256(packages)} {len(packages)} Packages\n")


def fixtures(root, base):
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "hello.txt"), "w") as f:
        f.write(FILE_BODY)
    pip_index(root)
    npm_registry(root, base)
    git_repo(root)
    apt_repo(root)


class Origin(http.server.BaseHTTPRequestHandler):
    root = "."
    log = None
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def record(self):
        with self.lock, open(self.log, "a") as f:
            f.write(f"{self.headers.get('Host', '')} {self.command} {self.path}\n")

    def do_GET(self):
        self.record()
        if self.path.startswith("/git/"):
            return self.git()
        path = os.path.normpath(os.path.join(self.root, self.path.split("?")[0].lstrip("/")))
        if not path.startswith(os.path.abspath(self.root)):
            return self.send_error(404)
        if os.path.isdir(path):
            for index in ("index.html", "index.json"):
                if os.path.isfile(os.path.join(path, index)):
                    path = os.path.join(path, index)
                    break
        if not os.path.isfile(path):
            return self.send_error(404)
        body = open(path, "rb").read()
        self.send_response(200)
        kind = "application/json" if path.endswith(".json") else "text/html" if path.endswith(".html") else "application/octet-stream"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self):
        self.record()
        if self.path.startswith("/git/"):
            return self.git()
        self.send_error(405)

    def git(self):
        path, _, query = self.path[len("/git"):].partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        env = dict(os.environ, GIT_PROJECT_ROOT=os.path.join(self.root, "git"), GIT_HTTP_EXPORT_ALL="1",
                   PATH_INFO=path, QUERY_STRING=query, REQUEST_METHOD=self.command,
                   CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(len(body)),
                   REMOTE_ADDR=self.client_address[0])
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=30).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def serve(addr, port, root, log, cert=None, key=None):
    Origin.root = os.path.abspath(root)
    Origin.log = log
    server = http.server.ThreadingHTTPServer((addr, int(port)), Origin)
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "fixtures":
        fixtures(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    else:
        sys.exit(__doc__)

"""A client that opens connections and keeps them open and idle until told to send: what an
old keep-alive connection (or a hostile client holding one across a policy change) does.

held_client.py DIR SPEC...   SPEC = NAME=KIND:HOST:PORT[:SERVER_NAME:CA_FILE] (HOST may be [IPv6])
KIND: h1 (HTTP/1.1 keep-alive, written by hand on a socket), h2 (HTTP/2 prior knowledge, the
`h2` library), h1tls (HTTP/1.1 over TLS, verified against CA_FILE as SERVER_NAME).

It connects every SPEC, writes DIR/ready (JSON: NAME -> local port), then for each DIR/cmd-N
(a path; `quit` ends) sends GET PATH on every connection and writes DIR/res-N, a JSON object
NAME -> {status, body, conn, port, issuer}: status is the HTTP status, or `closed` when the
connection turned out closed (nothing is retried on it: the next command reconnects, and conn
says `new`); conn is `same` while the connection opened first is used.
"""
import json
import os
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

d = sys.argv[1]


class Conn:
    def __init__(self, spec):
        self.name, rest = spec.split("=", 1)
        self.kind, rest = rest.split(":", 1)
        if rest.startswith("["):  # an IPv6 literal
            self.host, rest = rest[1:].split("]:", 1)
        else:
            self.host, rest = rest.split(":", 1)
        parts = rest.split(":")
        self.port = int(parts[0])
        self.server_name = parts[1] if len(parts) > 1 else None
        self.ca = parts[2] if len(parts) > 2 else None
        self.sock = None
        self.first = None
        self.issuer = None
        self.connect()
        self.first = self.sock.getsockname()

    def connect(self):
        s = socket.create_connection((self.host, self.port), timeout=10)
        self.issuer = None
        if self.kind == "h1tls":
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.set_alpn_protocols(["http/1.1"])
            s = ctx.wrap_socket(s, server_hostname=self.server_name)
            issuer = dict(x[0] for x in s.getpeercert().get("issuer", ()))
            self.issuer = issuer.get("commonName")
        self.sock = s
        self.buf = b""
        if self.kind == "h2":
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            self.h2.initiate_connection()
            s.sendall(self.h2.data_to_send())

    def get(self, path):
        if self.sock is None:
            try:
                self.connect()
            except Exception as e:
                return {"status": "connect:" + type(e).__name__, "conn": "new"}
        try:
            status, body = self.h2_get(path) if self.kind == "h2" else self.h1_get(path)
        except (OSError, ssl.SSLError, ConnectionError, EOFError) as e:
            status, body = "closed", type(e).__name__
        port = self.sock.getsockname()[1]
        same = self.sock.getsockname() == self.first
        if status == "closed":
            self.sock.close()
            self.sock = None
        return {"status": status, "body": body, "conn": "same" if same else "new", "port": port, "issuer": self.issuer}

    def recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed by the peer")
        return data

    def h1_get(self, path):
        host = self.server_name or (f"[{self.host}]" if ":" in self.host else self.host)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: held-client\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")[1]
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        while len(self.buf) < length:
            self.buf += self.recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body.decode("latin-1").strip()

    def h2_get(self, path):
        c = self.h2
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", f"127.0.0.1:{self.port}")],
            end_stream=True,
        )
        self.sock.sendall(c.data_to_send())
        status, body = None, b""
        while True:
            for ev in c.receive_data(self.recv()):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = dict(ev.headers)[b":status"].decode()
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.sock.sendall(c.data_to_send())
                    return status, body.decode("latin-1").strip()
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise EOFError("reset")
            self.sock.sendall(c.data_to_send())


conns = [Conn(spec) for spec in sys.argv[2:]]
with open(os.path.join(d, "ready.tmp"), "w") as f:
    json.dump({c.name: c.first[1] for c in conns}, f)
os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))
n = 0
while True:
    cmd = os.path.join(d, f"cmd-{n}")
    while not os.path.exists(cmd):
        time.sleep(0.002)
    path = open(cmd).read().strip()
    if path == "quit":
        break
    res = {c.name: c.get(path) for c in conns}
    tmp = os.path.join(d, f"res-{n}.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.rename(tmp, os.path.join(d, f"res-{n}"))
    n += 1

#!/usr/bin/env python3
"""Steady client traffic for the fault tests, recording what each request saw, in time.

  fault_load.py echo-server PORT
      An echo server on 127.0.0.1:PORT that first sends each client "peer HOST PORT\\n" (the
      address it sees the connection from).
  fault_load.py DIR SPEC...
      One thread per SPEC, until DIR/stop exists; DIR/ready once each has succeeded once, then
      DIR/result.json. SPEC is NAME=h1:HOST:PORT:ALLOWED:DENIED (HTTP/1.1 keep-alive,
      alternating GET ALLOWED and GET DENIED, reconnecting after any error),
      NAME=tls:HOST:PORT:ALLOWED:DENIED:SNI:CAFILE (the same over TLS, verified against CAFILE
      for SNI), or NAME=l4:HOST:PORT (one connection to the echo server for the whole run, a
      line echoed every 50 ms; never reopened).
Each HTTP result is [wall time, path kind (allowed|denied), outcome]; outcome is the status
code, or refused, reset (reset, broken pipe, closed without a response or mid-handshake),
timeout, tls:<reason>, or other:<exception>. Only changes of outcome are kept, with counts."""
import http.client
import json
import os
import socket
import ssl
import sys
import threading
import time


def echo_server(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)

    def serve(c, peer):
        try:
            c.sendall(f"peer {peer[0]} {peer[1]}\n".encode())
            while True:
                b = c.recv(4096)
                if not b:
                    return
                c.sendall(b)
        except OSError:
            return

    while True:
        c, peer = srv.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()


def classify(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                      http.client.IncompleteRead, ConnectionAbortedError)):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    # A connection dropped mid-handshake is a reset too; other TLS errors (a certificate that
    # does not verify, say) are their own outcome.
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
            isinstance(e, ssl.SSLError) and "EOF" in str(e)):
        return "reset"
    if isinstance(e, ssl.SSLError):
        return "tls:" + str(getattr(e, "reason", None) or e)
    if isinstance(e, http.client.BadStatusLine):
        return "reset"
    return "other:" + type(e).__name__


class Log:
    """Runs of equal outcomes: [first time, last time, kind, outcome, count]."""

    def __init__(self):
        self.runs, self.ok_once = [], False

    def add(self, kind, outcome):
        now = time.time()
        for r in reversed(self.runs):
            if r[2] == kind:
                if r[3] == outcome:
                    r[1], r[4] = now, r[4] + 1
                    return
                break
        self.runs.append([now, now, kind, outcome, 1])


def http_stream(log, stop, host, port, allowed, denied, tls=None):
    conn = None
    i = 0
    while not stop.is_set():
        kind, path = ("allowed", allowed) if i % 2 == 0 else ("denied", denied)
        i += 1
        try:
            if conn is None:
                if tls:
                    sni, ca = tls
                    ctx = ssl.create_default_context(cafile=ca)
                    raw = socket.create_connection((host, port), timeout=5)
                    sock = ctx.wrap_socket(raw, server_hostname=sni)
                    conn = http.client.HTTPConnection(sni, port, timeout=5)
                    conn.sock = sock
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=5)
                    conn.connect()
            conn.request("GET", path, headers={"Host": tls[0] if tls else f"{host}:{port}"})
            resp = conn.getresponse()
            resp.read()
            outcome = str(resp.status)
            if resp.will_close:
                conn.close()
                conn = None
        except Exception as e:  # noqa: BLE001 - every failure is an outcome
            outcome = classify(e)
            if conn is not None:
                conn.close()
            conn = None
        log.add(kind, outcome)
        if kind == "allowed" and outcome == "200":
            log.ok_once = True
        time.sleep(0.02)


def l4_stream(log, stop, host, port, state):
    try:
        s = socket.create_connection((host, port), timeout=5)
        f = s.makefile("rb")
        state["peer"] = f.readline().decode().split()[1:]
        state["local_port"] = s.getsockname()[1]
    except Exception as e:  # noqa: BLE001
        log.add("l4", classify(e))
        return
    n = 0
    while not stop.is_set():
        msg = f"ping {n}\n".encode()
        try:
            s.sendall(msg)
            back = f.readline()
            outcome = "ok" if back == msg else "wrong"
        except Exception as e:  # noqa: BLE001
            outcome = classify(e)
        log.add("l4", outcome)
        if outcome != "ok":
            return
        log.ok_once = True
        n += 1
        time.sleep(0.05)
    state["pings"] = n
    s.close()


def main(argv):
    if argv[1] == "echo-server":
        echo_server(int(argv[2]))
        return 0
    d = argv[1]
    stop = threading.Event()
    logs, states, threads = {}, {}, []
    for spec in argv[2:]:
        name, rest = spec.split("=", 1)
        parts = rest.split(":")
        log, state = Log(), {}
        logs[name], states[name] = log, state
        if parts[0] == "h1":
            args = (log, stop, parts[1], int(parts[2]), parts[3], parts[4])
            t = threading.Thread(target=http_stream, args=args, daemon=True)
        elif parts[0] == "tls":
            args = (log, stop, parts[1], int(parts[2]), parts[3], parts[4], (parts[5], parts[6]))
            t = threading.Thread(target=http_stream, args=args, daemon=True)
        else:
            t = threading.Thread(target=l4_stream, args=(log, stop, parts[1], int(parts[2]), state), daemon=True)
        t.start()
        threads.append(t)
    deadline = time.time() + 30
    while not all(l.ok_once for l in logs.values()) and time.time() < deadline:
        time.sleep(0.05)
    with open(os.path.join(d, "ready.tmp"), "w") as f:
        json.dump({n: l.ok_once for n, l in logs.items()}, f)
    os.rename(os.path.join(d, "ready.tmp"), os.path.join(d, "ready"))
    while not os.path.exists(os.path.join(d, "stop")):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    out = {n: {"runs": l.runs, **states[n]} for n, l in logs.items()}
    with open(os.path.join(d, "result.tmp"), "w") as f:
        json.dump(out, f)
    os.rename(os.path.join(d, "result.tmp"), os.path.join(d, "result.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

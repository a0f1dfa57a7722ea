#!/usr/bin/env python3
"""Hostile Kafka peers and a steady client for the proxy's bounds tests; one line out.

  kafka_hostile.py broker PORT          a "broker" on 0.0.0.0:PORT that misbehaves as each request's
                                        client id says:
                                          huge   answers with a 0x7fffffff length prefix, then sends
                                                 bytes as fast as it can (512 MiB) and holds on for 20 s
                                          drip   claims a 60 MiB answer and sends it 4 KiB per 10 ms
                                                 for 10 s, then closes
                                          flood  answers ApiVersions v0 properly, then sends 10,000
                                                 frames no request asked for
                                          silent reads every request, answers none
                                        anything else: a proper ApiVersions v0 answer
  kafka_hostile.py ask ADDR MODE SECS CLOSE_SECS
                                        one ApiVersions v0 request with client id MODE; waits up to SECS
                                        for the answer, then up to CLOSE_SECS for a close: "CLOSED",
                                        "OPEN", "ANSWERED CLOSED" or "ANSWERED OPEN"
  kafka_hostile.py pipeline ADDR KIND N SECS
                                        N requests written without reading any answer, for at most SECS:
                                        KIND allowed = ApiVersions (client id "silent": forwarded, never
                                        answered); denied = one such ApiVersions, then Heartbeats the policy
                                        denies (answered by the proxy, behind the first); "sent=K"
  kafka_hostile.py spray ADDR N         Produce v7 (acks=1) and Metadata v4 (auto-creation on) requests
                                        naming N random topic names, 50 per request, and one Metadata
                                        naming `orders`; reads every answer; "requests=R topics=N"
  kafka_hostile.py amplify ADDR KIND N  one request naming N empty topic entries (a few bytes each on the
                                        wire, far more decoded): KIND produce (v3), metadata (v4) or
                                        fetch (v4), or produce-named (topics
                                        t0, t1, ...); waits up to 20 s: "CLOSED", "ANSWERED" or "OPEN"
  kafka_hostile.py slowloris ADDR MODE SECS
                                        a request frame begun and not finished: its length (100), then
                                        MODE stall = 10 bytes and nothing more, drip = one byte every
                                        0.5 s, big = a length of 5,000,000 and 1 MB of it;
                                        waits up to SECS for a close: "CLOSED after=S" or "OPEN"
  kafka_hostile.py bigs ADDR SECS       two connections at once, each a 5,000,000-byte request frame begun
                                        with 1 MB of it, then stalled: "CLOSED after=S1,S2" (or OPEN)
  kafka_hostile.py idle ADDR SECS       ApiVersions v0, answered; idle SECS; ApiVersions again:
                                        "ANSWERED TWICE", or where it stopped
  kafka_hostile.py reset ADDR           ApiVersions v0, answered, then a reset (SO_LINGER 0): "RESET"
  kafka_hostile.py steady ADDR TOPIC SECS
                                        confluent-kafka produces one message per 100 ms on one producer
                                        for SECS: "sent=N ok=M max_ms=X" (delivery latency)
"""
import os
import random
import socket
import string as strings
import struct
import sys
import threading
import time


def kstring(x):
    return struct.pack(">h", len(x)) + x


def request(api_key, version, corr, client_id, body):
    msg = struct.pack(">hhi", api_key, version, corr) + kstring(client_id) + body
    return struct.pack(">i", len(msg)) + msg


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def api_versions_v0_answer(corr):
    body = struct.pack(">hi", 0, 1) + struct.pack(">hhh", 18, 0, 3)
    msg = struct.pack(">i", corr) + body
    return struct.pack(">i", len(msg)) + msg


def serve(conn):
    try:
        while True:
            n = struct.unpack(">i", recv_exact(conn, 4))[0]
            frame = recv_exact(conn, n)
            corr = struct.unpack(">i", frame[4:8])[0]
            cid_len = struct.unpack(">h", frame[8:10])[0]
            mode = frame[10:10 + max(cid_len, 0)].decode(errors="replace")
            if mode == "huge":
                conn.sendall(struct.pack(">ii", 0x7FFFFFFF, corr))
                chunk = b"\0" * (1 << 20)
                for _ in range(512):
                    conn.sendall(chunk)
                # Hold on to it: a proxy that buffered all this keeps holding it.
                time.sleep(20)
                return
            if mode == "drip":
                conn.sendall(struct.pack(">ii", 60 << 20, corr))
                end = time.time() + 10
                while time.time() < end:
                    conn.sendall(b"\1" * 4096)
                    time.sleep(0.01)
                return
            if mode == "silent":
                continue
            conn.sendall(api_versions_v0_answer(corr))
            if mode == "flood":
                junk = b"".join(api_versions_v0_answer(corr + 1 + i) for i in range(10_000))
                conn.sendall(junk)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def broker(port):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def connect(addr, timeout):
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def closed_within(s, deadline):
    """True when the peer closes (EOF or reset) before `deadline`; answers are read and dropped."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return False
        s.settimeout(left)
        try:
            if not s.recv(1 << 16):
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True


def ask(addr, mode, secs, close_wait):
    s = connect(addr, 10)
    s.sendall(request(18, 0, 1, mode.encode(), b""))
    s.settimeout(secs)
    try:
        head = recv_exact(s, 4)
        n = struct.unpack(">i", head)[0]
        body = recv_exact(s, n)
        assert struct.unpack(">i", body[:4])[0] == 1, "correlation id"
    except (EOFError, ConnectionResetError):
        print("CLOSED")
        return
    except socket.timeout:
        print("OPEN")
        return
    print("ANSWERED " + ("CLOSED" if closed_within(s, time.time() + close_wait) else "OPEN"))


def heartbeat(corr):
    return request(12, 0, corr, b"hostile", kstring(b"g") + struct.pack(">i", 1) + kstring(b"m"))


def pipeline(addr, kind, n, secs):
    s = connect(addr, 10)
    s.setblocking(False)
    deadline = time.time() + secs
    sent = 0
    pending = b""
    corr = 0
    while sent < n and time.time() < deadline:
        if not pending:
            corr += 1
            allowed = kind == "allowed" or corr == 1
            pending = request(18, 0, corr, b"silent", b"") if allowed else heartbeat(corr)
        try:
            k = s.send(pending)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError:
            break
        pending = pending[k:]
        if not pending:
            sent += 1
    print(f"sent={sent}", flush=True)
    s.close()


def spray(addr, n):
    s = connect(addr, 20)
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    names = ["".join(rng.choice(strings.ascii_lowercase) for _ in range(16)) for _ in range(n)]
    corr = 0
    requests = 0

    def answer():
        m = struct.unpack(">i", recv_exact(s, 4))[0]
        body = recv_exact(s, m)
        assert struct.unpack(">i", body[:4])[0] == corr, "correlation id"

    def produce(topics):
        data = b"".join(kstring(t.encode()) + struct.pack(">i", 1) + struct.pack(">ii", 0, -1) for t in topics)
        return struct.pack(">hhii", -1, 1, 5000, len(topics)) + data

    def metadata(topics):
        return struct.pack(">i", len(topics)) + b"".join(kstring(t.encode()) for t in topics) + b"\1"

    batches = [names[i:i + 50] for i in range(0, len(names), 50)]
    for i, batch in enumerate(batches):
        corr += 1
        if i % 2 == 0:
            s.sendall(request(0, 7, corr, b"spray", produce(batch)))
        else:
            s.sendall(request(3, 4, corr, b"spray", metadata(batch)))
        answer()
        requests += 1
    corr += 1
    s.sendall(request(3, 4, corr, b"spray", metadata(["orders"])))
    answer()
    print(f"requests={requests + 1} topics={len(set(names))}")


def amplify(addr, kind, n):
    if kind == "produce":
        # v3: no transactional id, acks=1, timeout; N topics of an empty name and no partitions.
        body = struct.pack(">hhii", -1, 1, 5000, n) + b"\0\0\0\0\0\0" * n
        frame = request(0, 3, 1, b"amplify", body)
    elif kind == "produce-named":
        # v3: N topics named t0, t1, ... with no partitions (each judged on its own).
        names = b"".join(kstring(f"t{i}".encode()) + b"\0\0\0\0" for i in range(n))
        frame = request(0, 3, 1, b"amplify", struct.pack(">hhii", -1, 1, 5000, n) + names)
    elif kind == "metadata":
        # v4: N topics of an empty name, auto-creation off.
        frame = request(3, 4, 1, b"amplify", struct.pack(">i", n) + b"\0\0" * n + b"\0")
    elif kind == "fetch":
        # v4: replica -1, max wait, min bytes, max bytes, isolation; N topics, no partitions.
        body = struct.pack(">iiiib", -1, 500, 1, 1 << 20, 0) + struct.pack(">i", n) + b"\0\0\0\0\0\0" * n
        frame = request(1, 4, 1, b"amplify", body)
    else:
        sys.exit(f"unknown kind {kind}")
    s = connect(addr, 20)
    try:
        s.sendall(frame)
    except OSError:
        print("CLOSED")
        return
    s.settimeout(20)
    try:
        head = recv_exact(s, 4)
        recv_exact(s, struct.unpack(">i", head)[0])
        print("ANSWERED")
    except (EOFError, ConnectionResetError):
        print("CLOSED")
    except socket.timeout:
        print("OPEN")


def slowloris(addr, mode, secs):
    s = connect(addr, 10)
    start = time.time()
    s.sendall(struct.pack(">i", 5_000_000 if mode == "big" else 100))
    if mode == "stall":
        s.sendall(b"\0" * 10)
    elif mode == "big":
        s.sendall(b"\0" * 1_000_000)
    deadline = start + secs
    while time.time() < deadline:
        if mode == "drip":
            try:
                s.sendall(b"\0")
            except OSError:
                print(f"CLOSED after={time.time() - start:.1f}")
                return
        if closed_within(s, min(deadline, time.time() + 0.5)):
            print(f"CLOSED after={time.time() - start:.1f}")
            return
    print("OPEN")


def bigs(addr, secs):
    """Two connections at once, each a 5,000,000-byte frame begun with 1 MB of it, then stalled."""
    socks = []
    start = time.time()
    for _ in range(2):
        s = connect(addr, 10)
        s.sendall(struct.pack(">i", 5_000_000))
        socks.append(s)
    for s in socks:
        s.setblocking(False)
    sent = [0, 0]
    while min(sent) < 1_000_000 and time.time() < start + secs:
        for i, s in enumerate(socks):
            try:
                sent[i] += s.send(b"\0" * min(65536, 1_000_000 - sent[i])) if sent[i] < 1_000_000 else 0
            except BlockingIOError:
                pass
            except OSError:
                sent[i] = 1_000_000
        time.sleep(0.001)
    for s in socks:
        s.setblocking(True)
    afters = []
    for s in socks:
        afters.append(f"{time.time() - start:.1f}" if closed_within(s, start + secs) else "OPEN")
    print("CLOSED after=" + ",".join(afters))


def idle(addr, secs):
    s = connect(addr, 10)
    for i in range(2):
        if i:
            time.sleep(secs)
        try:
            s.sendall(request(18, 0, i + 1, b"polite", b""))
            s.settimeout(10)
            n = struct.unpack(">i", recv_exact(s, 4))[0]
            recv_exact(s, n)
        except (EOFError, OSError):
            print("CLOSED" if i else "CLOSED FIRST")
            return
    print("ANSWERED TWICE")


def reset(addr):
    s = connect(addr, 10)
    s.sendall(request(18, 0, 1, b"polite", b""))
    n = struct.unpack(">i", recv_exact(s, 4))[0]
    recv_exact(s, n)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("RESET")


def steady(addr, topic, secs):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": addr, "message.timeout.ms": 5000, "client.id": "steady", "linger.ms": 0})
    results = []

    def report(sent_at):
        return lambda err, msg: results.append((err, time.time() - sent_at))

    end = time.time() + secs
    sent = 0
    while time.time() < end:
        tick = time.time()
        p.produce(topic, b"tick", callback=report(tick))
        sent += 1
        # poll() returns as soon as a report is served: pace the ticks by the clock.
        while time.time() < tick + 0.1:
            p.poll(max(0.0, tick + 0.1 - time.time()))
    p.flush(10)
    ok = sum(1 for err, _ in results if err is None)
    worst = max((lat for _, lat in results), default=0)
    errors = sorted({str(err) for err, _ in results if err is not None})
    print(f"sent={sent} ok={ok} max_ms={int(worst * 1000)}" + (f" errors={errors}" if errors else ""), flush=True)


cmd = sys.argv[1]
if cmd == "broker":
    broker(int(sys.argv[2]))
elif cmd == "ask":
    ask(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
elif cmd == "pipeline":
    pipeline(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
elif cmd == "spray":
    spray(sys.argv[2], int(sys.argv[3]))
elif cmd == "amplify":
    amplify(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif cmd == "slowloris":
    slowloris(sys.argv[2], sys.argv[3], float(sys.argv[4]))
elif cmd == "bigs":
    bigs(sys.argv[2], float(sys.argv[3]))
elif cmd == "idle":
    idle(sys.argv[2], float(sys.argv[3]))
elif cmd == "reset":
    reset(sys.argv[1 + 1])
elif cmd == "steady":
    steady(sys.argv[2], sys.argv[3], float(sys.argv[4]))
else:
    sys.exit(f"unknown command {cmd}")

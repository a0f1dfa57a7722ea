"""Steady allowed clients for the workload-churn test; one line out each.

  churn_clients.py kafka ADDR TOPIC SECS   one connection; Metadata v4 naming TOPIC every 5 ms for
                                           SECS: "requests=N denied=M other=K empty=E" (denied: the
                                           topic's error is TOPIC_AUTHORIZATION_FAILED, 29; empty:
                                           an answer without the topic)
  churn_clients.py http HOST PORT SECS     one keep-alive HTTP/1.1 connection (reopened if closed),
                                           GET / every 5 ms for SECS: "requests=N ok=O denied=M
                                           other=K" (requests answered; ok: a 200; denied: a 403;
                                           other: another status or a connection error)
"""
import http.client
import socket
import struct
import sys
import time


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def string_at(b, i):
    n = struct.unpack_from(">h", b, i)[0]
    return i + 2 + max(n, 0)


def metadata_topic_error(body):
    """The first topic's error code of a Metadata v4 response body (after the correlation id)."""
    i = 4  # throttle_time_ms
    (brokers,) = struct.unpack_from(">i", body, i)
    i += 4
    for _ in range(brokers):
        i += 4  # node_id
        i = string_at(body, i)  # host
        i += 4  # port
        i = string_at(body, i)  # rack
    i = string_at(body, i)  # cluster_id
    i += 4  # controller_id
    (topics,) = struct.unpack_from(">i", body, i)
    i += 4
    if topics < 1:
        return None
    return struct.unpack_from(">h", body, i)[0]


def kafka(addr, topic, secs):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    name = topic.encode()
    body = struct.pack(">i", 1) + struct.pack(">h", len(name)) + name + b"\0"
    client = b"steady-meta"
    header = struct.pack(">h", len(client)) + client
    end = time.time() + secs
    corr = requests = denied = other = empty = 0
    while time.time() < end:
        corr += 1
        msg = struct.pack(">hhi", 3, 4, corr) + header + body
        s.sendall(struct.pack(">i", len(msg)) + msg)
        n = struct.unpack(">i", recv_exact(s, 4))[0]
        answer = recv_exact(s, n)
        assert struct.unpack_from(">i", answer, 0)[0] == corr, "correlation id"
        err = metadata_topic_error(answer[4:])
        requests += 1
        if err == 29:
            denied += 1
        elif err is None:
            empty += 1
        elif err != 0:
            other += 1
        time.sleep(0.005)
    print(f"requests={requests} denied={denied} other={other} empty={empty}", flush=True)


def web(host, port, secs):
    end = time.time() + secs
    requests = ok = denied = other = 0
    conn = None
    while time.time() < end:
        if conn is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            requests += 1
            if r.status == 200:
                ok += 1
            elif r.status == 403:
                denied += 1
            elif r.status != 200:
                other += 1
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            other += 1
            conn.close()
            conn = None
        time.sleep(0.005)
    print(f"requests={requests} ok={ok} denied={denied} other={other}", flush=True)


cmd = sys.argv[1]
if cmd == "kafka":
    kafka(sys.argv[2], sys.argv[3], float(sys.argv[4]))
elif cmd == "http":
    web(sys.argv[2], sys.argv[3], float(sys.argv[4]))
else:
    sys.exit(f"unknown mode {cmd}")

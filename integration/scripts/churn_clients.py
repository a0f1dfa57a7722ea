"""Steady allowed clients for the workload-churn test; one line out each.

  churn_clients.py kafka ADDR TOPIC SECS   one connection; Metadata v4 naming TOPIC every 5 ms for
                                           SECS: "requests=N denied=M other=K empty=E" (denied: the
                                           topic's error is TOPIC_AUTHORIZATION_FAILED, 29; empty:
                                           an answer without the topic)
  churn_clients.py http HOST PORT SECS     one keep-alive HTTP/1.1 connection (reopened if closed),
                                           GET / every 5 ms for SECS: "requests=N ok=O denied=M
                                           other=K" (requests answered; ok: a 200; denied: a 403;
                                           other: another status or a connection error)
  churn_clients.py h2 HOST PORT SECS       the same over one HTTP/2 connection (prior knowledge)
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


def web2(host, port, secs):
    import h2.config
    import h2.connection
    import h2.events

    s = socket.create_connection((host, int(port)), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    end = time.time() + secs
    requests = ok = denied = other = 0
    while time.time() < end:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", host)], end_stream=True
        )
        s.sendall(conn.data_to_send())
        status, done = None, False
        while not done:
            data = s.recv(65536)
            if not data:
                print(f"requests={requests} ok={ok} denied={denied} other={other + 1} closed", flush=True)
                return
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                    status = dict(e.headers).get(b":status")
                elif isinstance(e, h2.events.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid:
                    done = True
            s.sendall(conn.data_to_send())
        requests += 1
        if status == b"200":
            ok += 1
        elif status == b"403":
            denied += 1
        else:
            other += 1
        time.sleep(0.005)
    print(f"requests={requests} ok={ok} denied={denied} other={other}", flush=True)


cmd = sys.argv[1]
if cmd == "kafka":
    kafka(sys.argv[2], sys.argv[3], float(sys.argv[4]))
elif cmd == "http":
    web(sys.argv[2], sys.argv[3], float(sys.argv[4]))
elif cmd == "h2":
    web2(sys.argv[2], sys.argv[3], float(sys.argv[4]))
else:
    sys.exit(f"unknown mode {cmd}")

"""A workload that holds one HTTP/1.1 keep-alive connection (to 127.0.0.1:8444) and one HTTP/2
connection (prior knowledge, to 127.0.0.1:8443) open, and sends GET PATH on both each time the
test writes DIR/cmd-N (containing PATH; `quit` ends). It answers in DIR/res-N:
"<h1 status> <h2 status> <same|new>" (same: the HTTP/1.1 request went on the first connection)."""
import http.client
import os
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events

d = sys.argv[1]
h1 = http.client.HTTPConnection("127.0.0.1", 8444, timeout=10)
h1.connect()
h1_name = h1.sock.getsockname()
s = socket.create_connection(("127.0.0.1", 8443), timeout=10)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
s.sendall(conn.data_to_send())


def h2_get(path):
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1:8443")],
        end_stream=True,
    )
    s.sendall(conn.data_to_send())
    status = None
    while True:
        data = s.recv(65536)
        if not data:
            return "closed"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                status = dict(ev.headers)[b":status"].decode()
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                s.sendall(conn.data_to_send())
                return status
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                return "reset"
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return "goaway"
        s.sendall(conn.data_to_send())


def h1_get(path):
    try:
        h1.request("GET", path)
        r = h1.getresponse()
        r.read()
        return str(r.status)
    except Exception as e:  # a closed connection is an answer too
        return "error:" + type(e).__name__


open(os.path.join(d, "ready"), "w").close()
n = 0
while True:
    cmd = os.path.join(d, f"cmd-{n}")
    while not os.path.exists(cmd):
        time.sleep(0.005)
    path = open(cmd).read().strip()
    if path == "quit":
        break
    a = h1_get(path)
    b = h2_get(path)
    same = h1.sock is not None and h1.sock.getsockname() == h1_name
    tmp = os.path.join(d, f"res-{n}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{a} {b} {'same' if same else 'new'}")
    os.rename(tmp, os.path.join(d, f"res-{n}"))
    n += 1

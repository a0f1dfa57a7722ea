#!/usr/bin/env python3
"""An HTTP/2 (prior knowledge) upstream that records every request it receives complete (its
END_STREAM seen) as one JSON line in LOG: headers, body and trailers; it answers only complete
requests, with 200 and "ok <path>". Usage: h2_recorder.py PORT LOG"""
import json
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events

port, log = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()


def serve(sock):
    config = h2.config.H2Configuration(client_side=False, validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams = {}
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        try:
            events = conn.receive_data(data)
        except Exception:
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                streams[event.stream_id] = {"headers": [[k.decode(), v.decode()] for k, v in event.headers], "body": "", "trailers": None}
            elif isinstance(event, h2.events.DataReceived):
                streams[event.stream_id]["body"] += event.data.decode(errors="replace")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                streams[event.stream_id]["trailers"] = [[k.decode(), v.decode()] for k, v in event.headers]
            elif isinstance(event, h2.events.StreamEnded):
                req = streams.pop(event.stream_id)
                with lock, open(log, "a") as f:
                    f.write(json.dumps(req) + "\n")
                path = dict(req["headers"]).get(":path", "")
                conn.send_headers(event.stream_id, [(":status", "200")])
                conn.send_data(event.stream_id, f"ok {path}\n".encode(), end_stream=True)
            elif isinstance(event, h2.events.StreamReset):
                streams.pop(event.stream_id, None)
        sock.sendall(conn.data_to_send())


listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
print("serving", flush=True)
while True:
    client, _ = listener.accept()
    threading.Thread(target=serve, args=(client,), daemon=True).start()

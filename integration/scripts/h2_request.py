#!/usr/bin/env python3
"""Sends one HTTP/2 request (prior knowledge) with exactly the given header fields, an optional
body and optional trailers, with no client-side validation, and prints what came back:
"RESET <error code>", "RESPONSE <status> <body>" or "GOAWAY <error code>".
Usage: h2_request.py HOST PORT HEADERS_JSON [BODY [TRAILERS_JSON]]
HEADERS_JSON is a list of [name, value] pairs, pseudo-headers included."""
import json
import socket
import sys

import h2.config
import h2.connection
import h2.events

host, port = sys.argv[1], int(sys.argv[2])
headers = [tuple(h) for h in json.loads(sys.argv[3])]
body = sys.argv[4].encode() if len(sys.argv) > 4 else None
trailers = [tuple(h) for h in json.loads(sys.argv[5])] if len(sys.argv) > 5 else None
s = socket.create_connection((host, port), timeout=5)
config = h2.config.H2Configuration(
    client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False, validate_inbound_headers=False
)
conn = h2.connection.H2Connection(config)
conn.initiate_connection()
s.sendall(conn.data_to_send())
conn.send_headers(1, headers, end_stream=body is None and trailers is None)
if body is not None:
    conn.send_data(1, body, end_stream=trailers is None)
if trailers is not None:
    conn.send_headers(1, trailers, end_stream=True)
s.sendall(conn.data_to_send())
status, received = None, b""
while True:
    try:
        data = s.recv(65536)
    except socket.timeout:
        print("TIMEOUT")
        sys.exit(0)
    if not data:
        print("CLOSED")
        break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.StreamReset):
            print(f"RESET {event.error_code.name}")
            sys.exit(0)
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers)[b":status"].decode()
        if isinstance(event, h2.events.DataReceived):
            received += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if isinstance(event, h2.events.StreamEnded):
            print(f"RESPONSE {status} {received.decode(errors='replace').strip()}")
            sys.exit(0)
        if isinstance(event, h2.events.ConnectionTerminated):
            print(f"GOAWAY {event.error_code.name}")
            sys.exit(0)
    s.sendall(conn.data_to_send())

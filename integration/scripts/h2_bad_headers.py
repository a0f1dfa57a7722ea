#!/usr/bin/env python3
"""Sends one HTTP/2 request carrying a connection-specific header (forbidden in HTTP/2,
RFC 9113 §8.2.2) and prints what came back: "RESET <error code>", "RESPONSE <status>" or
"GOAWAY <error code>".  Usage: h2_bad_headers.py HOST PORT HEADER VALUE"""
import socket
import sys

import h2.config
import h2.connection
import h2.events

host, port, name, value = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=5)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
conn.initiate_connection()
s.sendall(conn.data_to_send())
headers = [(":method", "GET"), (":path", "/public/x"), (":scheme", "http"), (":authority", host), ("x-team", "empire"), (name, value)]
conn.send_headers(1, headers, end_stream=True)
s.sendall(conn.data_to_send())
while True:
    data = s.recv(65536)
    if not data:
        print("CLOSED")
        break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.StreamReset):
            print(f"RESET {event.error_code.name}")
            sys.exit(0)
        if isinstance(event, h2.events.ResponseReceived):
            print("RESPONSE " + dict(event.headers)[b":status"].decode())
            sys.exit(0)
        if isinstance(event, h2.events.ConnectionTerminated):
            print(f"GOAWAY {event.error_code.name}")
            sys.exit(0)
    s.sendall(conn.data_to_send())

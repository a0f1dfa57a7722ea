#!/usr/bin/env python3
"""Sends one request exactly as given (Python string escapes allowed: \\r\\n, \\x00) and prints
the response's status line and body, or CLOSED if the connection closed without an answer.
Usage: raw_http.py HOST PORT REQUEST"""
import socket
import sys

host, port, request = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = request.encode("latin-1").decode("unicode_escape").encode("latin-1")
s = socket.create_connection((host, port), timeout=5)
s.sendall(data)
got = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        head, sep, body = got.partition(b"\r\n\r\n")
        if sep:
            length = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
            if length and len(body) >= int(length[0]):
                break
except socket.timeout:
    pass
if not got:
    print("CLOSED")
else:
    head, _, body = got.partition(b"\r\n\r\n")
    print(head.split(b"\r\n")[0].decode() + " | " + body.decode(errors="replace").strip())

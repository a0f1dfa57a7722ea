#!/usr/bin/env python3
"""Sends one JSON request line to a broker socket and prints the reply line, or the error
(e.g. PermissionError) when the socket cannot be used.  Usage: broker_client.py SOCKET JSON"""
import socket
import sys

try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    try:
        s.sendall(sys.argv[2].encode() + b"\n")
    except BrokenPipeError:
        pass  # the broker refused and closed: its reply is still there to read
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print(data.decode().strip())
except OSError as e:
    print(type(e).__name__)

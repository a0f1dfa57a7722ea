#!/usr/bin/env python3
"""A TCP server that reads an optional PROXY protocol v2 header (haproxy.org's
proxy-protocol.txt, section 2.2), decoded here independently of l7proxy, then the client's
first line. Each connection prints one line and is answered with it:

  proxy src=IP:PORT dst=IP:PORT data=LINE     a v2 PROXY header, then LINE
  plain peer=IP:PORT data=LINE                no header (the first bytes are the client's)
  bad REASON                                  a header that does not decode

Usage: proxy_v2_server.py BIND PORT
"""
import ipaddress
import socket
import struct
import sys
import threading

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_line(conn, head):
    buf = head
    while b"\n" not in buf and len(buf) < 4096:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")


def peek_head(conn):
    """The first bytes, until they are the signature or cannot become it."""
    while True:
        head = conn.recv(len(SIGNATURE), socket.MSG_PEEK)
        if not head or len(head) == len(SIGNATURE) or not SIGNATURE.startswith(head):
            return head
        threading.Event().wait(0.01)


def decode(conn):
    head = peek_head(conn)
    if head != SIGNATURE:
        peer = conn.getpeername()
        return f"plain peer={peer[0]}:{peer[1]} data={read_line(conn, b'')}"
    fixed = read_exact(conn, 16)
    ver_cmd, fam, length = fixed[12], fixed[13], struct.unpack("!H", fixed[14:16])[0]
    if ver_cmd != 0x21:
        return f"bad version/command {ver_cmd:#x}"
    body = read_exact(conn, length)
    if fam == 0x11 and length >= 12:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return f"proxy src={src}:{sport} dst={dst}:{dport} data={read_line(conn, b'')}"
    if fam == 0x21 and length >= 36:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        return f"proxy src=[{src}]:{sport} dst=[{dst}]:{dport} data={read_line(conn, b'')}"
    return f"bad family {fam:#x} length {length}"


def serve(conn):
    with conn:
        try:
            line = decode(conn)
        except (EOFError, OSError) as e:
            line = f"bad {e}"
        print(line, flush=True)
        try:
            conn.sendall((line + "\n").encode())
        except OSError:
            pass


def main():
    bind, port = sys.argv[1], int(sys.argv[2])
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, port))
    s.listen(64)
    print(f"serving {bind}:{port}", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Socket probes for the integration tests: a real client whose result is one line on stdout.

  tcp-connect HOST PORT         "ok" or the errno name (EPERM, ECONNREFUSED, ...)
  getpeername HOST PORT         the peer address the app sees after connect(), as HOST PORT
  udp-connect HOST PORT         "ok" or the errno name
  udp-sendto HOST PORT          "ok" or the errno name (unconnected sendto)
  wait-tcp HOST PORT SECONDS    exit 0 once something accepts on HOST:PORT
  listen HOST PORT SECONDS      binds and listens for SECONDS, then exits (closing the socket)
HOST may be IPv4, IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d: an AF_INET6 socket).
"""
import errno
import socket
import sys
import time


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def err_name(e):
    return errno.errorcode.get(e.errno, str(e.errno))


def main(argv):
    cmd, host, port = argv[1], argv[2], int(argv[3])
    fam = family(host)
    if cmd == "wait-tcp":
        deadline = time.time() + float(argv[4])
        while time.time() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return 0
            except OSError:
                time.sleep(0.05)
        print(f"nothing accepts on {host}:{port}")
        return 1
    if cmd == "listen":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(16)
        print("listening", flush=True)
        time.sleep(float(argv[4]))
        s.close()
        return 0
    if cmd in ("tcp-connect", "getpeername"):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((host, port))
        except OSError as e:
            print(err_name(e))
            return 0
        if cmd == "tcp-connect":
            print("ok")
        else:
            peer = s.getpeername()
            print(peer[0], peer[1])
        s.close()
        return 0
    if cmd in ("udp-connect", "udp-sendto"):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if cmd == "udp-connect":
                s.connect((host, port))
                s.send(b"x")
            else:
                s.sendto(b"x", (host, port))
            print("ok")
        except OSError as e:
            print(err_name(e))
        return 0
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

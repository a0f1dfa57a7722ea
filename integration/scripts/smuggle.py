#!/usr/bin/env python3
"""Request-smuggling corpus over raw sockets, a lenient upstream, and h11 as the strict reference.

  smuggle.py upstream PORT LOG     a lenient HTTP/1.1 server: logs every byte it receives and
                                   answers every request line it sees with 200
  smuggle.py send HOST PORT CASE   sends one case, prints the response status code, or CLOSED
  smuggle.py reference CASE        prints REJECT or ACCEPT: what h11 makes of the case
  smuggle.py cases                 prints the case names
"""
import re
import socket
import sys
import threading

CASES = {
    "cl_and_te": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_and_cl": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate_cl": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "conflicting_cl": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 41\r\n\r\nhelloGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    "cl_list": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl_plus_sign": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obs_fold": b"GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "space_before_colon": b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
    "te_gzip_chunked": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_twice": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te_http10": b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad_chunk_size": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n",
    "nul_in_header": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space_in_name": b"GET /a HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
}

# Cases that are well-formed: the proxy must pass them (each request judged on its own).
VALID = {
    "pipelined": b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    "chunked_ok": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


def upstream(port, log):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("upstream listening", flush=True)
    lock = threading.Lock()

    def conn(c):
        c.settimeout(2)
        data = b""
        try:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
                n = chunk.count(b" HTTP/1.")
                for _ in range(n):
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass
        with lock, open(log, "ab") as f:
            f.write(b"=== connection\n" + data + b"\n")
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()


def send(host, port, case):
    data = CASES.get(case) or VALID[case]
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    # Status lines (a body may run straight into the next response's status line).
    codes = [m.decode() for m in re.findall(rb"HTTP/1\.[01] (\d{3})", got)]
    print(" ".join(codes) if codes else "CLOSED")


def reference(case):
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(CASES.get(case) or VALID[case])
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError:
        print("REJECT")
        return
    print("ACCEPT")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "upstream":
        upstream(int(sys.argv[2]), sys.argv[3])
    elif cmd == "send":
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif cmd == "reference":
        reference(sys.argv[2])
    else:
        print(" ".join(CASES))

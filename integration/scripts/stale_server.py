"""An HTTP/1.1 server whose keep-alive connections go stale: it answers the first request of
each connection (keep-alive, no `Connection: close`), then, when the next request arrives on
that connection, reads it and closes without answering (as a server whose idle timeout fires
just as a request comes in). Logs `served METHOD PATH` / `dropped METHOD PATH`.

usage: stale_server.py PORT"""
import socket
import sys
import threading


def read_request(f):
    line = f.readline()
    if not line:
        return None
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        if name.strip().lower() == "transfer-encoding":
            # chunked: read to the last chunk
            while True:
                size = int(f.readline().split(b";")[0], 16)
                f.read(size + 2)
                if size == 0:
                    break
    if length:
        f.read(length)
    method, path, _ = line.decode().split(" ", 2)
    return method, path


def serve(conn):
    f = conn.makefile("rb")
    req = read_request(f)
    if req:
        body = f"served {req[0]} {req[1]}\n".encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        conn.sendall(head if req[0] == "HEAD" else head + body)
        print(f"served {req[0]} {req[1]}", flush=True)
    req = read_request(f)
    if req:
        print(f"dropped {req[0]} {req[1]}", flush=True)
    conn.close()


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(64)
print("serving", flush=True)
while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()

"""TLS handshakes through the proxy, verified against the mesh CA, all at once.

usage: tls_burst.py CAFILE HOST PORT COUNT NAME
NAME may hold `{}`, replaced by 0..COUNT-1 (COUNT distinct server names); else COUNT handshakes
for NAME. Prints JSON: {"ok": N, "errors": [...], "not_after": [distinct notAfter], "seconds": S}."""
import json
import socket
import ssl
import sys
import threading
import time

cafile, host, port, count, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=cafile)
barrier = threading.Barrier(count)
lock = threading.Lock()
result = {"ok": 0, "errors": [], "not_after": set()}


def one(i):
    sni = name.format(i)
    barrier.wait()
    try:
        with socket.create_connection((host, port), timeout=15) as s:
            with ctx.wrap_socket(s, server_hostname=sni) as t:
                after = t.getpeercert()["notAfter"]
        with lock:
            result["ok"] += 1
            result["not_after"].add(after)
    except Exception as e:  # noqa: BLE001 - reported to the test
        with lock:
            result["errors"].append(f"{sni}: {e}")


threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
started = time.monotonic()
for t in threads:
    t.join()
result["seconds"] = time.monotonic() - started
result["not_after"] = sorted(result["not_after"])
print(json.dumps(result))

"""Many HTTP/1.1 requests at once, each on a connection of its own (a hostile workload that
opens many upstream destinations, or Host values, concurrently).

usage: pool_flood.py TARGET...
TARGET is URL or URL@HOST (HOST sent as the Host header). Prints JSON:
{"status": {"200": N, "503": M, "error": E}, "bodies": [distinct non-200 bodies], "seconds": S}."""
import http.client
import json
import sys
import threading
import time
import urllib.parse

targets = sys.argv[1:]
barrier = threading.Barrier(len(targets))
lock = threading.Lock()
result = {"status": {}, "bodies": set()}


def one(target):
    url, _, host = target.partition("@")
    u = urllib.parse.urlsplit(url)
    barrier.wait()
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.putrequest("GET", u.path or "/", skip_host=True)
        c.putheader("Host", host or u.netloc)
        c.endheaders()
        r = c.getresponse()
        body = r.read()
        status = str(r.status)
        c.close()
    except Exception as e:  # noqa: BLE001 - reported to the test
        status, body = "error", str(e).encode()
    with lock:
        result["status"][status] = result["status"].get(status, 0) + 1
        if status != "200":
            result["bodies"].add(body.decode(errors="replace")[:80])


threads = [threading.Thread(target=one, args=(t,)) for t in targets]
started = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
result["seconds"] = time.monotonic() - started
result["bodies"] = sorted(result["bodies"])
print(json.dumps(result))

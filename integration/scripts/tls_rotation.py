"""TLS connections to a terminating proxy: the first stays open across a certificate refresh
(a pause) and is used again; the second is new (it finds the certificate due: served the cached
one while the proxy refreshes in the background); the third, a second later, gets the refreshed
one. Prints what each saw as JSON.

usage: tls_rotation.py CA_FILE HOST PORT SERVER_NAME PAUSE_SECONDS
"""
import http.client
import json
import socket
import ssl
import sys
import time

ca_file, host, port, server_name, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
ctx = ssl.create_default_context(cafile=ca_file)


def connect():
    return ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=server_name)


def get(tls):
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
    resp = http.client.HTTPResponse(tls)
    resp.begin()
    return resp.status, resp.read().decode()


first = connect()
before = get(first)
time.sleep(pause)
after_refresh = get(first)
second = connect()
time.sleep(1)
third = connect()
print(json.dumps({
    "first_serial": first.getpeercert()["serialNumber"],
    "second_serial": second.getpeercert()["serialNumber"],
    "third_serial": third.getpeercert()["serialNumber"],
    "before": before,
    "same_connection_after_refresh": after_refresh,
    "new_connection": get(second),
}))

#!/usr/bin/env python3
"""The deathstar of Cilium's getting-started demo, as a tiny real HTTP server.

  POST /v1/request-landing  -> 200 "Ship landed"
  PUT  /v1/exhaust-port     -> 503 "Panic: deathstar exploded" (the request policy should stop)
  GET  /v1/                 -> 200 the API list
Usage: deathstar.py PORT
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Deathstar(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/v1"):
            self.reply(200, "GET /v1/, POST /v1/request-landing, PUT /v1/exhaust-port\n")
        else:
            self.reply(404, "Not found\n")

    def do_POST(self):
        self.reply(200, "Ship landed\n") if self.path == "/v1/request-landing" else self.reply(404, "Not found\n")

    def do_PUT(self):
        self.reply(503, "Panic: deathstar exploded\n") if self.path == "/v1/exhaust-port" else self.reply(404, "Not found\n")


if __name__ == "__main__":
    server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Deathstar)
    print(f"deathstar serving on {server.server_address}", flush=True)
    server.serve_forever()

#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the proxy tests, without generated code: the
service `helloworld.Greeter` of helloworld.proto (messages encoded by hand: one string field),
so grpcurl can call it too.

  greeter.py serve PORT
  greeter.py call HOST:PORT METHOD [N]   METHOD: SayHello (unary), SayGoodbye (unary),
                                          SayHelloStream (server streaming, N replies),
                                          Chat (bidirectional, N messages)
The client prints one line: "OK <replies joined by |>" or "ERROR <StatusCode name> <details>".
"""
import sys
from concurrent import futures

import grpc

SERVICE = "helloworld.Greeter"
ident = lambda b: b


def encode(text):
    """A message whose field 1 is the string `text` (HelloRequest.name / HelloReply.message)."""
    data = text.encode()
    n, varint = len(data), b""
    while True:
        byte = n & 0x7F
        n >>= 7
        varint += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x0a" + varint + data


def decode(msg):
    """Field 1 of a message with one string field (empty message: "")."""
    if not msg:
        return ""
    i, n, shift = 1, 0, 0
    while True:
        byte = msg[i]
        n |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            break
    return msg[i:i + n].decode()


def serve(port):
    def say_hello(request, context):
        return encode("hello " + decode(request))

    def say_goodbye(request, context):
        return encode("goodbye " + decode(request))

    def say_hello_stream(request, context):
        n = int(decode(request) or "3")
        for i in range(n):
            yield encode(f"hello #{i}")

    def chat(request_iterator, context):
        for msg in request_iterator:
            yield encode("echo " + decode(msg))

    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello, ident, ident),
        "SayGoodbye": grpc.unary_unary_rpc_method_handler(say_goodbye, ident, ident),
        "SayHelloStream": grpc.unary_stream_rpc_method_handler(say_hello_stream, ident, ident),
        "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"greeter serving on {port}", flush=True)
    server.wait_for_termination()


def call(target, method, n):
    channel = grpc.insecure_channel(target)
    path = f"/{SERVICE}/{method}"
    try:
        if method in ("SayHello", "SayGoodbye"):
            replies = [channel.unary_unary(path, ident, ident)(encode("tiefighter"), timeout=10)]
        elif method == "SayHelloStream":
            replies = list(channel.unary_stream(path, ident, ident)(encode(str(n)), timeout=10))
        else:
            msgs = iter([encode(f"m{i}") for i in range(n)])
            replies = list(channel.stream_stream(path, ident, ident)(msgs, timeout=10))
        print("OK " + "|".join(decode(r) for r in replies))
    except grpc.RpcError as e:
        print(f"ERROR {e.code().name} {e.details()}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 3)

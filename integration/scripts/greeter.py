#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the proxy tests, without generated code: the
service `helloworld.Greeter` with raw-bytes messages.

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


def serve(port):
    def say_hello(request, context):
        return b"hello " + request

    def say_goodbye(request, context):
        return b"goodbye " + request

    def say_hello_stream(request, context):
        n = int(request.decode() or "3")
        for i in range(n):
            yield f"hello #{i}".encode()

    def chat(request_iterator, context):
        for msg in request_iterator:
            yield b"echo " + msg

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
            replies = [channel.unary_unary(path, ident, ident)(b"tiefighter", timeout=10)]
        elif method == "SayHelloStream":
            replies = list(channel.unary_stream(path, ident, ident)(str(n).encode(), timeout=10))
        else:
            msgs = iter([f"m{i}".encode() for i in range(n)])
            replies = list(channel.stream_stream(path, ident, ident)(msgs, timeout=10))
        print("OK " + "|".join(r.decode() for r in replies))
    except grpc.RpcError as e:
        print(f"ERROR {e.code().name} {e.details()}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 3)

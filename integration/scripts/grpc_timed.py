"""One unary helloworld.Greeter/SayHello call with grpcio, timed from the call to its answer
(the interpreter's start and grpcio's import are not counted: on a loaded machine they take
seconds). Needs greeter.py beside it (examples/workloads).

usage: grpc_timed.py HOST:PORT
prints "OK <reply> <seconds>" or "ERROR <StatusCode name> <seconds>"."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc  # noqa: E402
import greeter  # noqa: E402

channel = grpc.insecure_channel(sys.argv[1])
call = channel.unary_unary("/helloworld.Greeter/SayHello", greeter.ident, greeter.ident)
started = time.monotonic()
try:
    reply = greeter.decode(call(greeter.encode("tiefighter"), timeout=30))
    print(f"OK {reply} {time.monotonic() - started}")
except grpc.RpcError as e:
    print(f"ERROR {e.code().name} {time.monotonic() - started}")

"""A destination whose SYNs are dropped: a listener that never accepts, its accept queue
filled, so the kernel drops every further SYN (no RST) and a connect to it hangs until the
connecting side gives up. Checks that it really does before saying `black-holed`.

usage: blackhole.py HOST PORT"""
import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(0)  # an accept queue of one
fillers = []
for _ in range(3):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    fillers.append(s)
time.sleep(0.5)
check = socket.socket()
check.settimeout(1.5)
try:
    check.connect((host, port))
    sys.exit("the accept queue is not full: connect succeeded")
except socket.timeout:
    print("black-holed", flush=True)
while True:
    time.sleep(3600)

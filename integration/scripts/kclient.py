#!/usr/bin/env python3
"""A real Kafka client (confluent-kafka, librdkafka 2.x) for the proxy tests; one line out.

  kclient.py produce BOOTSTRAP TOPIC VALUE   "OK" or "ERROR <librdkafka error name>"
  kclient.py consume BOOTSTRAP TOPIC         the value at offset 0 of partition 0, or "ERROR <name>"
  kclient.py raw BOOTSTRAP HEX               sends raw bytes and half-closes; "CLOSED" when the peer
                                             closes without answering
"""
import socket
import sys

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

cmd, bootstrap = sys.argv[1], sys.argv[2]
if cmd == "produce":
    topic, value = sys.argv[3], sys.argv[4]
    p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000, "client.id": "kclient"})
    result = []
    p.produce(topic, value.encode(), callback=lambda err, msg: result.append(err))
    p.flush(15)
    err = result[0] if result else "no delivery report"
    print("OK" if err is None else f"ERROR {err.name() if hasattr(err, 'name') else err}")
elif cmd == "consume":
    topic = sys.argv[3]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "kclient", "enable.auto.commit": False, "client.id": "kclient"})
    c.assign([TopicPartition(topic, 0, 0)])
    out = "TIMEOUT"
    for _ in range(20):
        m = c.poll(1)
        if m is None:
            continue
        out = f"ERROR {m.error().name()}" if m.error() else m.value().decode()
        break
    print(out)
    c.close()
elif cmd == "raw":
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(bytes.fromhex(sys.argv[3]))
    # Half-close: a frame cut short is then known to be truncated.
    s.shutdown(socket.SHUT_WR)
    try:
        print("CLOSED" if not s.recv(100) else "ANSWERED")
    except (ConnectionResetError, socket.timeout) as e:
        print("CLOSED" if isinstance(e, ConnectionResetError) else "OPEN")

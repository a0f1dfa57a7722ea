#!/usr/bin/env python3
"""A real Kafka client (confluent-kafka, librdkafka 2.x) for the proxy tests; one line out.

  kclient.py produce BOOTSTRAP TOPIC VALUE   "OK" or "ERROR <librdkafka error name>"
  kclient.py consume BOOTSTRAP TOPIC         the value at offset 0 of partition 0, or "ERROR <name>"
  kclient.py heartbeat BOOTSTRAP              a Heartbeat v0 by hand, then ApiVersions v0 on the same
                                             connection: "heartbeat=<error code> apiversions=<error code>"
  kclient.py admin BOOTSTRAP OP[:T1,T2] ...  librdkafka's AdminClient, one line per operation on one
                                             client: "OP T1=OK T2=<error name>"; ops: delete, create,
                                             partitions, delete-records, describe-configs, alter-configs,
                                             commit (group kclient), list (the topic names)
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
elif cmd == "heartbeat":
    import struct

    def string(x):
        return struct.pack(">h", len(x)) + x

    def request(api_key, version, corr, body):
        msg = struct.pack(">hhi", api_key, version, corr) + string(b"kclient") + body
        return struct.pack(">i", len(msg)) + msg

    def response(s):
        n = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        data = s.recv(n, socket.MSG_WAITALL)
        return struct.unpack(">ih", data[:6])

    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(request(12, 0, 7, string(b"outposts") + struct.pack(">i", 1) + string(b"member-1")))
    corr, hb = response(s)
    assert corr == 7, corr
    s.sendall(request(18, 0, 8, b""))
    corr, av = response(s)
    assert corr == 8, corr
    print(f"heartbeat={hb} apiversions={av}")
elif cmd == "admin":
    from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewPartitions,
                                       NewTopic)
    from confluent_kafka import ConsumerGroupTopicPartitions

    a = AdminClient({"bootstrap.servers": bootstrap, "client.id": "kclient-admin"})

    def outcome(f):
        try:
            r = f.result()
        except KafkaException as e:
            return e.args[0].name()
        # Per-partition errors (offset commits) come back inside the result.
        for tp in getattr(r, "topic_partitions", None) or []:
            if tp.error is not None:
                return tp.error.name()
        return "OK"

    def key(k):
        return k if isinstance(k, str) else getattr(k, "topic", None) or getattr(k, "name", None) or str(k)

    for op in sys.argv[3:]:
        name, _, arg = op.partition(":")
        topics = arg.split(",") if arg else []
        t = dict(request_timeout=15)
        if name == "list":
            print("list " + ",".join(sorted(x for x in a.list_topics(timeout=15).topics if not x.startswith("__"))))
            continue
        if name == "delete":
            fs = a.delete_topics(topics, operation_timeout=10, **t)
        elif name == "create":
            fs = a.create_topics([NewTopic(x, 1, 1) for x in topics], **t)
        elif name == "partitions":
            fs = a.create_partitions([NewPartitions(x, 2) for x in topics], **t)
        elif name == "delete-records":
            fs = a.delete_records([TopicPartition(x, 0, 1) for x in topics], **t)
        elif name == "describe-configs":
            fs = a.describe_configs([ConfigResource("topic", x) for x in topics], **t)
        elif name == "alter-configs":
            fs = a.incremental_alter_configs([ConfigResource("topic", x, incremental_configs=[
                ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)]) for x in topics], **t)
        elif name == "commit":
            fs = a.alter_consumer_group_offsets([ConsumerGroupTopicPartitions("kclient", [TopicPartition(x, 0, 1) for x in topics])], **t)
            print(name + "".join(f" {x}={outcome(f)}" for x, f in zip(topics, fs.values())))
            continue
        else:
            print(name + " unknown op")
            continue
        print(name + "".join(f" {key(k)}={outcome(f)}" for k, f in sorted(fs.items(), key=lambda kv: key(kv[0]))))
        sys.stdout.flush()
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

#!/usr/bin/env python3
"""A real Kafka client (confluent-kafka, librdkafka 2.x) for the proxy tests; one line out.

  kclient.py produce BOOTSTRAP TOPIC VALUE   "OK" or "ERROR <librdkafka error name>"
  kclient.py consume BOOTSTRAP TOPIC         the value at offset 0 of partition 0, or "ERROR <name>"
  kclient.py heartbeat BOOTSTRAP              a Heartbeat v0 by hand, then ApiVersions v0 on the same
                                             connection: "heartbeat=<error code> apiversions=<error code>"
  kclient.py admin BOOTSTRAP OP[:T1,T2] ...  librdkafka's AdminClient, one line per operation on one
                                             client: "OP T1=OK T2=<error name>"; ops: delete, create,
                                             partitions, delete-records, describe-configs, alter-configs,
                                             commit (group kclient), fetch-offsets:GROUP/T (partition 0's
                                             committed offset or the error), list (the topic names)
  kclient.py rawdelete BOOTSTRAP VERSION NAME ...  a DeleteTopics request built by hand at VERSION (1-6;
                                             NAME may be empty, repeated, or id:HEX32 for a topic ID at
                                             v6), then ApiVersions on the same connection:
                                             "NAME=<error code> ... apiversions=<error code>"
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
        elif name == "fetch-offsets":
            group, topic = arg.split("/", 1)
            f = list(a.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])], **t).values())[0]
            try:
                tps = f.result().topic_partitions
                r = tps[0].error.name() if tps[0].error is not None else f"offset{tps[0].offset}"
            except KafkaException as e:
                r = e.args[0].name()
            print(f"{name} {topic}={r}")
            continue
        elif name == "commit":
            fs = a.alter_consumer_group_offsets([ConsumerGroupTopicPartitions("kclient", [TopicPartition(x, 0, 1) for x in topics])], **t)
            print(name + "".join(f" {x}={outcome(f)}" for x, f in zip(topics, fs.values())))
            continue
        else:
            print(name + " unknown op")
            continue
        print(name + "".join(f" {key(k)}={outcome(f)}" for k, f in sorted(fs.items(), key=lambda kv: key(kv[0]))))
        sys.stdout.flush()
elif cmd == "rawdelete":
    import struct

    version, names = int(sys.argv[3]), sys.argv[4:]
    flexible = version >= 4

    def uvarint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def string(x):
        x = x.encode()
        return uvarint(len(x) + 1) + x if flexible else struct.pack(">h", len(x)) + x

    def array(items):
        return (uvarint(len(items) + 1) if flexible else struct.pack(">i", len(items))) + b"".join(items)

    if version >= 6:
        items = []
        for n in names:
            if n.startswith("id:"):
                items.append(b"\x00" + bytes.fromhex(n[3:]) + b"\x00")  # null name, the ID, no tags
            else:
                items.append(string(n) + bytes(16) + b"\x00")
        body = array(items)
    else:
        body = array([string(n) for n in names])
    body += struct.pack(">i", 10000) + (b"\x00" if flexible else b"")
    header = struct.pack(">hhi", 20, version, 7) + struct.pack(">h", 7) + b"kclient" + (b"\x00" if flexible else b"")
    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=15)
    s.sendall(struct.pack(">i", len(header + body)) + header + body)
    n = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
    data, pos = s.recv(n, socket.MSG_WAITALL), 0

    def take(k):
        global pos
        pos += k
        return data[pos - k:pos]

    def read_uvarint():
        shift = result = 0
        while True:
            b = take(1)[0]
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def read_string(nullable=False):
        if flexible:
            n = read_uvarint() - 1
        else:
            n = struct.unpack(">h", take(2))[0]
        return None if n < 0 else take(n).decode()

    assert struct.unpack(">i", take(4))[0] == 7
    if flexible:
        read_uvarint()  # response header tags
    take(4)  # throttle
    count = read_uvarint() - 1 if flexible else struct.unpack(">i", take(4))[0]
    out = []
    for _ in range(count):
        name = read_string()
        topic_id = take(16).hex() if version >= 6 else None
        code = struct.unpack(">h", take(2))[0]
        if version >= 5:
            read_string()
        if flexible:
            read_uvarint()
        out.append(f"{name if name is not None else 'id:' + topic_id}={code}")
    s.sendall(struct.pack(">i", 14) + struct.pack(">hhi", 18, 0, 8) + struct.pack(">h", 4) + b"kcli")
    n = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
    av = s.recv(n, socket.MSG_WAITALL)
    print(" ".join(sorted(out)) + f" apiversions={struct.unpack('>ih', av[:6])[1]}")
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

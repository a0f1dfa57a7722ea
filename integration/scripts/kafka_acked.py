#!/usr/bin/env python3
"""Sustained Kafka produce (acks=all) with a tailing consumer, then a check that every produce
that got its ack is readable: a fresh consumer reads the partition from the start.

Usage: kafka_acked.py BOOTSTRAP TOPIC RATE SECONDS [STOP_FILE]
Produces RATE messages/s (value = sequence number) for SECONDS, or until STOP_FILE exists;
prints one JSON line: sent, acked, failed (delivery errors), consumed_live (tail consumer),
read_back (distinct acked sequence numbers the fresh consumer found), missing (acked but not
read back; must be 0), first_missing, ack p50/p99 (ms), errors (the first few delivery errors),
read_errors (why the read-back fell short, if it did).
by_second: per second of sending, [second, acked, median ack ms, max ack ms].
Uses confluent-kafka (librdkafka), which retries through reconnects on its own."""
import json
import os
import sys
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

bootstrap, topic, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
stop_file = sys.argv[5] if len(sys.argv) > 5 else None

acked, failed, errors, latencies, sent_at, by_second = set(), [], [], [], {}, {}
start = time.monotonic()


def on_delivery(err, msg):
    seq = int(msg.value())
    if err is not None:
        failed.append(seq)
        if len(errors) < 5:
            errors.append(str(err))
        return
    acked.add(seq)
    t = sent_at.pop(seq, time.monotonic())
    latencies.append((time.monotonic() - t) * 1000)
    by_second.setdefault(int(t - start), []).append(latencies[-1])


conf = {"bootstrap.servers": bootstrap, "group.id": "kafka-acked", "enable.auto.commit": False,
        "fetch.wait.max.ms": 100, "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 500}

live = [0]
stop_tail = threading.Event()


def tail():
    c = Consumer(conf)
    c.assign([TopicPartition(topic, 0, 0)])
    while not stop_tail.is_set():
        for m in c.consume(1000, timeout=0.5):
            if not m.error():
                live[0] += 1
    c.close()


tailer = threading.Thread(target=tail, daemon=True)
tailer.start()

p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "message.timeout.ms": 120000,
              "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 500})
start = time.monotonic()
seq = 0
while True:
    now = time.monotonic()
    if now - start >= seconds or (stop_file and os.path.exists(stop_file)):
        break
    due = start + seq / rate
    if due > now:
        p.poll(min(due - now, 0.05))
        continue
    sent_at[seq] = time.monotonic()
    while True:
        try:
            p.produce(topic, str(seq).encode(), callback=on_delivery)
            break
        except BufferError:
            p.poll(0.01)
    seq += 1
    p.poll(0)
left = p.flush(150)
stop_tail.set()
tailer.join(10)

# Read back: a fresh consumer, from offset 0 to the high watermark.
# Time to read: two minutes plus a millisecond per acknowledged message (a long soak's
# partition holds about a million).
c = Consumer(dict(conf, **{"group.id": "kafka-acked-check"}))
found = set()
deadline = time.monotonic() + 120 + len(acked) / 1000
high, read_errors = -1, []
while time.monotonic() < deadline:
    try:
        _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
        break
    except Exception as e:  # noqa: BLE001 - recorded; retried until the deadline
        if len(read_errors) < 5:
            read_errors.append("watermark: " + str(e))
        time.sleep(0.5)
c.assign([TopicPartition(topic, 0, 0)])
pos = 0
while pos < high and time.monotonic() < deadline:
    for m in c.consume(10000, timeout=1):
        if m.error():
            if len(read_errors) < 5:
                read_errors.append("consume: " + str(m.error()))
        else:
            found.add(int(m.value()))
            pos = m.offset() + 1
if pos < high:
    read_errors.append(f"read back to offset {pos} of {high} before the deadline")
c.close()
latencies.sort()
missing = sorted(acked - found)


def pct(q):
    return latencies[int((len(latencies) - 1) * q)] if latencies else 0.0


print(json.dumps({"sent": seq, "acked": len(acked), "failed": len(failed), "unflushed": left,
                  "consumed_live": live[0], "high_watermark": high, "read_back": len(acked & found),
                  "missing": len(missing), "first_missing": missing[:10],
                  "ack_p50_ms": pct(0.5), "ack_p99_ms": pct(0.99), "ack_max_ms": pct(1.0), "errors": errors, "read_errors": read_errors,
                  # Per second of sending: [second, acked, median ack ms, max ack ms].
                  "by_second": [[k, len(v), sorted(v)[len(v) // 2], max(v)] for k, v in sorted(by_second.items())]}))

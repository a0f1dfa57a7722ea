#!/usr/bin/env python3
"""Kafka produce/fetch throughput and produce latency with confluent-kafka (librdkafka); prints
one JSON line.  Usage: kafka_perf.py BOOTSTRAP TOPIC MESSAGES SIZE LATENCY_SAMPLES"""
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition

bootstrap, topic, n, size, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
payload = b"x" * size

# Throughput: batched, acks=1.
p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": 1, "queue.buffering.max.messages": 1000000})
failed = []
start = time.perf_counter()
for _ in range(n):
    while True:
        try:
            p.produce(topic, payload, callback=lambda err, msg: err and failed.append(err))
            break
        except BufferError:
            p.poll(0.01)
    p.poll(0)
p.flush(60)
produce_s = time.perf_counter() - start

# Latency: one message at a time, acks=1, each waited for.
lat = []
for _ in range(samples):
    t = time.perf_counter()
    p.produce(topic, payload, callback=lambda err, msg: err and failed.append(err))
    p.flush(10)
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()

# Fetch throughput: the first n messages of partition 0.
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "perf", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
c.assign([TopicPartition(topic, 0, 0)])
got = 0
start = time.perf_counter()
while got < n:
    batch = c.consume(10000, timeout=5)
    if not batch:
        break
    got += sum(1 for m in batch if not m.error())
fetch_s = time.perf_counter() - start
c.close()
print(json.dumps({
    "produce_msgs_per_s": n / produce_s,
    "produce_mib_per_s": n * size / produce_s / (1 << 20),
    "produce_p50_ms": lat[len(lat) // 2],
    "produce_p99_ms": lat[int(len(lat) * 0.99)],
    "fetch_msgs_per_s": got / fetch_s if fetch_s else 0.0,
    "fetched": got,
    "failed": len(failed),
}))

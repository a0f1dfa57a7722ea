#!/usr/bin/env python3
"""aiokafka clients for the proxy tests; one line out.

  aioclient.py produce2 BOOTSTRAP TOPIC_A TOPIC_B   sends one message to each topic in the same
                                                   batch window (aiokafka puts both topics in one
                                                   Produce request); prints "<A result> <B result>"
                                                   with OK or the error class name
  aioclient.py group BOOTSTRAP TOPIC GROUP          joins GROUP, consumes the first message of TOPIC,
                                                   commits, prints "<value> committed=<offset>"
"""
import asyncio
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def produce2(bootstrap, a, b):
    # A long linger: on a loaded machine the two sends can be more than a short one apart.
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2000, request_timeout_ms=10000)
    await p.start()
    try:
        # Learn both topics' metadata first, so both messages share one batch window.
        await p.client._wait_on_metadata(a)
        try:
            await p.client._wait_on_metadata(b)
        except Exception:
            pass
        fa = await p.send(a, b"to " + a.encode())
        fb = await p.send(b, b"to " + b.encode())
        out = []
        for f in (fa, fb):
            try:
                await f
                out.append("OK")
            except Exception as e:
                out.append(type(e).__name__)
        print(" ".join(out))
    finally:
        await p.stop()


async def group(bootstrap, topic, group_id):
    c = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=10000,
        heartbeat_interval_ms=1000,
    )
    await c.start()
    try:
        msg = await asyncio.wait_for(c.getone(), timeout=60)
        await c.commit()
        tp = next(iter(c.assignment()))
        print(f"{msg.value.decode()} committed={await c.committed(tp)}")
    finally:
        await c.stop()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "produce2":
        asyncio.run(produce2(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        asyncio.run(group(sys.argv[2], sys.argv[3], sys.argv[4]))

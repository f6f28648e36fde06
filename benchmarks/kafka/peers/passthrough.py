"""Raw aiokafka consume -> produce passthrough: the ceiling for a Python Kafka-to-Kafka worker.

Consumer group, no decoding, no state: every record is re-sent (same key, same partition number)
to the output topic; after each fetched batch the producer is flushed and the batch's offsets
committed (at-least-once). Configured by BENCH_* environment variables (see ../throughput.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

E = os.environ


async def main() -> None:
    consumer = AIOKafkaConsumer(
        E["BENCH_IN"], bootstrap_servers=E["BENCH_BROKERS"], group_id=E["BENCH_GROUP"],
        enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
        rebalance_timeout_ms=6000, heartbeat_interval_ms=1000, fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 << 20)
    producer = AIOKafkaProducer(bootstrap_servers=E["BENCH_BROKERS"], acks="all", linger_ms=5,
                                max_batch_size=1 << 20)
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out = E["BENCH_OUT"]
    first = True
    try:
        while not stop.is_set():
            data = await consumer.getmany(timeout_ms=200, max_records=5000)
            if not data:
                continue
            if first:
                first = False
                print(f"BENCH first-event {time.time():.6f}", flush=True)
            offsets = {}
            for tp, msgs in data.items():
                p = tp.partition
                for m in msgs:
                    await producer.send(out, value=m.value, key=m.key, partition=p)
                offsets[TopicPartition(tp.topic, p)] = msgs[-1].offset + 1
            await producer.flush()
            await consumer.commit(offsets)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())

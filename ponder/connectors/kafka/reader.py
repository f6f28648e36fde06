"""Read one partition from an offset to its current end.

Tansu's ListOffsets reports a wrong end offset (see shared/KAFKA_TESTING.md), so the end is
taken from the high watermark that fetch responses carry, and an empty fetch at the current
position also counts as the end. This is correct on Apache Kafka too.
"""

from __future__ import annotations

from typing import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

__all__ = ["read_to_end"]


async def read_to_end(brokers: str, topic: str, partition: int, start: int, *,
                      max_records: int = 5000, empty_fetches: int = 2) -> AsyncIterator[list[ConsumerRecord]]:
    """Yield batches of records of one partition from `start` until its high watermark."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False,
                                auto_offset_reset="none", fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        empties = 0
        while True:
            try:
                batch = (await consumer.getmany(tp, timeout_ms=200, max_records=max_records)).get(tp, [])
            except OffsetOutOfRangeError:
                # the log is shorter than `start` (a memory-only broker restarted): nothing newer
                return
            if batch:
                empties = 0
                yield batch
            else:
                empties += 1
            high = consumer.highwater(tp)
            pos = await consumer.position(tp)
            if high is not None and pos >= high:
                return
            if empties >= empty_fetches and high is None:
                return
            if empties >= empty_fetches * 10:
                # a high watermark we never reach: trust the fetches, not the number
                return
    finally:
        await consumer.stop()

"""Read partitions of a topic from given offsets to their current ends, with one consumer.

Tansu's ListOffsets reports a wrong end offset (see shared/KAFKA_TESTING.md), so a partition's
end is the high watermark that fetch responses carry; an empty fetch with no watermark also
counts as the end. This is correct on Apache Kafka too.
"""

from __future__ import annotations

from typing import AsyncIterator, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

__all__ = ["read_to_end"]


async def read_to_end(brokers: str, topic: str, starts: Mapping[int, int], *, max_records: int = 5000,
                      patience: int = 20) -> AsyncIterator[tuple[int, list[ConsumerRecord]]]:
    """Yield (partition, records) batches from each partition's start until its high watermark.

    `patience` bounds the empty fetches tolerated for a partition whose watermark we never
    reach, so a lying broker cannot hang a restore.
    """
    if not starts:
        return
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False,
                                auto_offset_reset="none", fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        left = {TopicPartition(topic, p): 0 for p in starts}
        consumer.assign(list(left))
        for tp in left:
            consumer.seek(tp, starts[tp.partition])
        while left:
            try:
                data = await consumer.getmany(*left, timeout_ms=200, max_records=max_records)
            except OffsetOutOfRangeError as e:
                # the log is shorter than the start (a memory-only broker restarted): nothing newer
                for tp in e.args[0] if e.args and isinstance(e.args[0], dict) else list(left):
                    left.pop(tp, None)
                consumer.assign(list(left))
                continue
            for tp, batch in data.items():
                if batch:
                    left[tp] = 0
                    yield tp.partition, batch
            for tp in list(left):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    del left[tp]
                elif tp not in data:
                    left[tp] += 1
                    if left[tp] >= (2 if high is None else patience):
                        del left[tp]
    finally:
        await consumer.stop()

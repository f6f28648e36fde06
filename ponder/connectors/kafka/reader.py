"""Read partitions of a topic from given offsets to their current ends, with one consumer.

Tansu's ListOffsets reports a wrong end offset (see docs/kafka-testing.md), so a partition's
end is the high watermark that fetch responses carry. A partition is finished only once its
position has reached that watermark; a fetch round returns only some partitions, so silence
from one partition proves nothing. Only a run of completely empty rounds ends the read early,
so a lying broker cannot hang a restore. This is correct on Apache Kafka too.
"""

from __future__ import annotations

from typing import AsyncIterator, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord

from ponder.connectors.base import BEFORE_START, BEYOND_END

__all__ = ["read_to_end", "read_at"]


async def _positioned(brokers: str, topic: str, offsets: Mapping[int, int], **opts) -> AIOKafkaConsumer:
    """A started consumer outside any group, on `topic`'s given partitions at the given offsets;
    out-of-range offsets raise rather than reset, so callers can tell a log that is too short."""
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False,
                                auto_offset_reset="none", fetch_max_wait_ms=50, **opts)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in offsets]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, offsets[tp.partition])
    return consumer


async def read_to_end(brokers: str, topic: str, starts: Mapping[int, int], *, max_records: int = 5000,
                      patience: int = 10) -> AsyncIterator[tuple[int, list[ConsumerRecord]]]:
    """Yield (partition, records) batches from each partition's start until its high watermark.

    `patience` is the number of consecutive empty fetch rounds after which the partitions still
    open are taken as finished.
    """
    if not starts:
        return
    consumer = await _positioned(brokers, topic, starts, max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        left = set(consumer.assignment())
        empty_rounds = 0
        while left:
            try:
                data = await consumer.getmany(*left, timeout_ms=200, max_records=max_records)
            except OffsetOutOfRangeError as e:
                # the log is shorter than the start (a memory-only broker restarted): nothing newer
                gone = e.args[0] if e.args and isinstance(e.args[0], dict) else set(left)
                left.difference_update(gone)
                if left:
                    consumer.assign(list(left))
                continue
            got = False
            for tp, batch in data.items():
                if batch:
                    got = True
                    yield tp.partition, batch
            empty_rounds = 0 if got else empty_rounds + 1
            for tp in list(left):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    left.discard(tp)
            if empty_rounds >= patience:
                return
    finally:
        await consumer.stop()


async def read_at(brokers: str, topic: str, offsets: Mapping[int, int], *, patience: int = 10
                  ) -> dict[int, ConsumerRecord | int]:
    """The record at each partition's offset, or BEFORE_START (the log was trimmed past it) or
    BEYOND_END (the log does not reach it). A record later than asked for (compaction left a
    hole there) counts as BEFORE_START: the log is older than the offset, not a new one."""
    out: dict[int, ConsumerRecord | int] = {}
    if not offsets:
        return out
    consumer = await _positioned(brokers, topic, offsets)
    try:
        left = set(consumer.assignment())
        empty_rounds = 0
        while left and empty_rounds < patience:
            try:
                data = await consumer.getmany(*left, timeout_ms=200, max_records=1)
            except OffsetOutOfRangeError as e:
                gone = e.args[0] if e.args and isinstance(e.args[0], dict) else {tp: None for tp in left}
                starts = await consumer.beginning_offsets(list(gone))
                for tp in gone:
                    out[tp.partition] = BEFORE_START if offsets[tp.partition] < starts[tp] else BEYOND_END
                left.difference_update(gone)
                if left:
                    consumer.assign(list(left))
                continue
            empty_rounds += 1
            for tp, batch in data.items():
                if batch:
                    empty_rounds = 0
                    rec = batch[0]
                    out[tp.partition] = rec if rec.offset == offsets[tp.partition] else BEFORE_START
                    left.discard(tp)
            for tp in list(left):
                high = consumer.highwater(tp)
                if high is not None and high <= offsets[tp.partition]:
                    out[tp.partition] = BEYOND_END
                    left.discard(tp)
        for tp in left:  # nothing came back at all: the log holds nothing there
            out[tp.partition] = BEYOND_END
    finally:
        await consumer.stop()
    return out

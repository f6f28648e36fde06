"""State changelog on Kafka: one compacted topic, partitioned like the input.

Each checkpoint publishes the changed key states of a partition (a tombstone for a deleted key)
plus one meta record, and waits until the broker has them, before the store batch is written
and offsets are committed. A worker that gets a partition without local state, or with local
state older than the changelog, replays the changelog from the offset its store reflects.
"""

from __future__ import annotations

import logging
from typing import Mapping

import msgspec
from aiokafka import AIOKafkaProducer

from ponder.connectors.kafka.reader import read_to_end
from ponder.state.base import Store

__all__ = ["KafkaChangelog"]

logger = logging.getLogger(__name__)

_META_HEADER = "ponder-meta"
_meta_codec = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(dict[str, int])


class KafkaChangelog:
    """Publish and restore the states of one store per input partition."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.brokers = brokers
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        self.restored_records = 0

    async def start(self) -> None:
        if self._producer is None:
            # no idempotence: Tansu grants aiokafka no producer id; order per partition holds
            # because aiokafka keeps one request in flight per partition
            self._producer = AIOKafkaProducer(bootstrap_servers=self.brokers, acks="all",
                                              linger_ms=2, max_batch_size=1 << 20,
                                              max_request_size=8 << 20)
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, partition: int, states: Mapping[str, bytes | None],
                      meta: Mapping[str, int]) -> int:
        """Send the states and the meta record of one partition; return the next changelog
        offset once the broker has acknowledged all of them."""
        assert self._producer is not None, "KafkaChangelog.start() was not called"
        send = self._producer.send
        for key, value in states.items():
            await send(self.topic, value=value, key=key.encode(), partition=partition)
        fut = await send(self.topic, value=_meta_codec.encode(dict(meta)), key=b"\0meta",
                         partition=partition, headers=[(_META_HEADER, b"1")])
        await self._producer.flush()
        md = await fut
        return md.offset + 1

    async def restore(self, partition: int, store: Store) -> dict[str, int]:
        """Bring `store` up to the changelog's end; return the meta it now reflects."""
        meta = store.meta()
        start = meta.get("changelog", 0)
        latest: dict[str, int] = {}
        end = start
        pending: dict[str, bytes | None] = {}
        async for batch in read_to_end(self.brokers, self.topic, partition, start):
            for rec in batch:
                end = rec.offset + 1
                if rec.headers and any(k == _META_HEADER for k, _ in rec.headers):
                    latest = _meta_dec.decode(rec.value)
                    continue
                pending[rec.key.decode()] = rec.value
            self.restored_records += len(batch)
            if len(pending) >= 10_000:
                store.write(pending, {}, {"changelog": end})
                pending = {}
        if end > start or pending:
            latest.pop("changelog", None)
            store.write(pending, {}, {**latest, "changelog": end})
            logger.info("restored %s[%d] from changelog offsets %d..%d", self.topic, partition, start, end)
        return store.meta()

"""State changelog on Kafka: one compacted topic, partitioned like the input.

Each checkpoint publishes the changed key states of a partition (a tombstone for a deleted key)
plus one meta record, and waits until the broker has them, before the store batch is written
and offsets are committed. A worker that gets a partition without local state, or with local
state older than the changelog, replays the changelog from the offset its store reflects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Mapping

import msgspec
from aiokafka import AIOKafkaProducer

from ponder.connectors.kafka.reader import read_to_end
from ponder.connectors.base import MembershipUnsure
from ponder.connectors.kafka.fence import reset_connections, watch_lease
from ponder.state.base import ChangelogError, Store

__all__ = ["KafkaChangelog"]

logger = logging.getLogger(__name__)

_META_HEADER = "ponder-meta"
_meta_codec = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(dict[str, int])


class KafkaChangelog:
    """Publish and restore the states of one store per input partition."""

    def __init__(self, brokers: str, topic: str, *, request_timeout_ms: int = 40_000,
                 may_send: Callable[[], bool] | None = None) -> None:
        """:param may_send: the consumer's membership lease, as for KafkaSink: states are sent
            only within it, and a producer with states unacknowledged as it lapses is fenced."""
        self.brokers = brokers
        self.topic = topic
        self._request_timeout_ms = request_timeout_ms
        self._may_send = may_send
        self._producer: AIOKafkaProducer | None = None
        self._pending: list[asyncio.Future] = []
        self._watch: asyncio.Task[None] | None = None
        self.fenced = False
        self.restored_records = 0

    async def start(self) -> None:
        if self._producer is None:
            # no idempotence: Tansu grants aiokafka no producer id; order per partition holds
            # because aiokafka keeps one request in flight per partition
            self._producer = AIOKafkaProducer(bootstrap_servers=self.brokers, acks="all",
                                              linger_ms=2, max_batch_size=1 << 20,
                                              max_request_size=8 << 20,
                                              request_timeout_ms=self._request_timeout_ms)
            await self._producer.start()
            if self._may_send is not None and self._watch is None:
                self._watch = asyncio.get_running_loop().create_task(watch_lease(
                    self._may_send, lambda: any(not f.done() for f in self._pending), self._fence))

    def _fence(self) -> None:
        """States unacknowledged as the lease lapsed must never land (see fence.py): a late
        one would roll back the state the partition's new owner publishes."""
        if self._producer is not None:
            reset_connections(self._producer)
        self.fenced = True
        logger.error("group membership lapsed with changelog records unacknowledged: connections reset")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            if self.fenced:  # never again: stopping would send what it still holds
                reset_connections(producer)
                return
            await producer.stop()

    async def publish(self, batches: Mapping[int, tuple[Mapping[str, bytes | None], Mapping[str, int]]]
                      ) -> dict[int, int]:
        try:
            return await self._publish(batches)
        except ChangelogError as e:
            if self.fenced or (self._may_send is not None and not self._may_send()):
                raise
            # a producer connected before a broker lost its topics can be refused for good on
            # the re-created ones (seen with Tansu: UnknownError) while a new one is accepted.
            # Publishing again is harmless: the records are whole states, the newest read last.
            logger.warning("%s; publishing again with a new producer", e)
            self._watch, watch = None, self._watch
            if watch is not None:
                watch.cancel()
            await self.stop()
            await self.start()
            return await self._publish(batches)

    async def _publish(self, batches: Mapping[int, tuple[Mapping[str, bytes | None], Mapping[str, int]]]
                      ) -> dict[int, int]:
        """Send the states and one meta record per partition; once the broker has acknowledged
        all of them (one flush for all partitions), return each partition's next offset."""
        assert self._producer is not None, "KafkaChangelog.start() was not called"
        if self.fenced:
            msg = f"changelog {self.topic!r} was fenced: its producer is not used again"
            raise ChangelogError(msg)
        if self._may_send is not None and not self._may_send():
            msg = "not sure of the group membership: states held back"
            raise MembershipUnsure(msg)
        send = self._producer.send
        futs = self._pending = []
        last = {}
        failed: BaseException | None = None
        try:
            for partition, (states, meta) in batches.items():
                for key, value in states.items():
                    futs.append(await send(self.topic, value=value, key=key.encode(), partition=partition))
                last[partition] = await send(self.topic, value=_meta_codec.encode(dict(meta)), key=b"\0meta",
                                             partition=partition, headers=[(_META_HEADER, b"1")])
                futs.append(last[partition])
        except Exception as e:  # noqa: BLE001 - reported below, once what was sent is settled
            failed = e
        # every outcome is collected, so no failed send is left unretrieved; the first error
        # fails the checkpoint before anything is committed
        results = await asyncio.gather(*futs, return_exceptions=True)
        failed = failed or next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            msg = f"publishing states to changelog {self.topic!r} failed: {type(failed).__name__}: {failed}"
            raise ChangelogError(msg) from failed
        return {p: fut.result().offset + 1 for p, fut in last.items()}

    async def restore(self, stores: Mapping[int, Store]) -> dict[int, dict[str, int]]:
        """Bring each partition's store up to the changelog's end; return the meta each now
        reflects. One consumer reads all partitions."""
        starts = {p: s.meta().get("changelog", 0) for p, s in stores.items()}
        ends = dict(starts)
        latest: dict[int, dict[str, int]] = {}
        pending: dict[int, dict[str, bytes | None]] = {p: {} for p in stores}
        async for p, batch in read_to_end(self.brokers, self.topic, starts):
            for rec in batch:
                if rec.headers and any(k == _META_HEADER for k, _ in rec.headers):
                    latest[p] = _meta_dec.decode(rec.value)
                else:
                    pending[p][rec.key.decode()] = rec.value
            ends[p] = batch[-1].offset + 1
            self.restored_records += len(batch)
            if len(pending[p]) >= 10_000:
                stores[p].write(pending[p], {}, {"changelog": ends[p]})
                pending[p] = {}
        for p, store in stores.items():
            if ends[p] > starts[p]:
                meta = latest.get(p, {})
                meta.pop("changelog", None)
                store.write(pending[p], {}, {**meta, "changelog": ends[p]})
                logger.info("restored %s[%d] from changelog offsets %d..%d", self.topic, p, starts[p], ends[p])
        return {p: s.meta() for p, s in stores.items()}

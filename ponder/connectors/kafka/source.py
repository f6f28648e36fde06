"""Consumer-group source: batches of records, commits of completed positions, rebalances.

The runtime binds itself to the source (`bind`) so that a rebalance drains and checkpoints the
revoked partitions before they go, and restores state for assigned partitions before their
first record is processed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from typing import Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (CommitFailedError, IllegalGenerationError, RebalanceInProgressError,
                             UnknownMemberIdError)
from aiokafka.protocol.group import LeaveGroupRequest

from ponder.connectors.base import Assignments, Record, fingerprint
from ponder.connectors.kafka.reader import read_at
from ponder.types import SourcePos

UNKNOWN_MEMBER_ID = ""
# a commit the group refused because it moved on (a rebalance, a broker that lost the group)
_REFUSED = (CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError)

__all__ = ["KafkaSource"]

logger = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in revoked)
        # the runtime drains and commits these partitions while we still own them
        if tps and self.source.runtime is not None:
            await self.source.runtime.revoke(tps)
        self.source.assigned.difference_update(tps)

    async def on_partitions_assigned(self, assigned) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        # the fetcher may already return records of these partitions: hold them back until
        # the runtime has restored their state
        self.source.ready.clear()
        try:
            if tps and self.source.runtime is not None:
                await self.source.runtime.assign(tps)
            self.source.assigned.update(tps)
        finally:
            self.source.ready.set()


class KafkaSource:
    """Read `topic` as member of consumer group `group`; never auto-commit."""

    def __init__(self, brokers: str, topic: str, group: str, *, batch: int = 2000,
                 session_timeout_ms: int = 10_000, rebalance_timeout_ms: int = 10_000,
                 heartbeat_interval_ms: int = 1_000, fetch_max_wait_ms: int = 100,
                 auto_offset_reset: str = "earliest", client_id: str = "ponder") -> None:
        self.brokers = brokers
        self.topic = topic
        self.group = group
        self.runtime: Assignments | None = None
        self.assigned: set[tuple[str, int]] = set()
        self._batch = batch
        self._opts = dict(session_timeout_ms=session_timeout_ms, rebalance_timeout_ms=rebalance_timeout_ms,
                          heartbeat_interval_ms=heartbeat_interval_ms, fetch_max_wait_ms=fetch_max_wait_ms,
                          auto_offset_reset=auto_offset_reset, client_id=client_id,
                          max_partition_fetch_bytes=4 * 1024 * 1024)
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self.ready.set()
        self._stopped = False
        self._paused = False

    def bind(self, runtime: Assignments) -> None:
        self.runtime = runtime

    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.brokers, group_id=self.group,
                                          enable_auto_commit=False, **self._opts)
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Listener(self))

    async def stop(self) -> None:
        self._stopped = True
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await _leave_first_generation(consumer)
            await consumer.stop()

    async def batches(self) -> AsyncIterator[list[Record]]:
        """Yield record batches; an empty batch when idle, so the runtime can checkpoint."""
        await self.start()
        assert self._consumer is not None
        topic = self.topic
        while not self._stopped:
            data = await self._consumer.getmany(timeout_ms=200, max_records=self._batch)
            await self.ready.wait()
            out: list[Record] = []
            for tp, msgs in data.items():
                p = tp.partition
                for m in msgs:
                    headers = {k: v.decode("utf-8", "replace") for k, v in m.headers} if m.headers else {}
                    out.append(Record(m.value if m.value is not None else b"", SourcePos(topic, p, m.offset),
                                      m.key.decode("utf-8", "replace") if m.key else None, None, headers))
            yield out

    async def commit(self, positions: Mapping[tuple[str, int], int]) -> bool:
        if self._consumer is None:
            return False
        offsets = {TopicPartition(t, p): o for (t, p), o in positions.items() if (t, p) in self.assigned}
        if not offsets:
            return True
        try:
            await self._consumer.commit(offsets)
        except _REFUSED as e:
            logger.warning("group %r refused the commit of %s: %s", self.group, positions, e)
            return False
        return True

    async def anchors(self, offsets: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        found = await read_at(self.brokers, self.topic, {p: o for (_, p), o in offsets.items()})
        out = {}
        for (t, p), o in offsets.items():
            rec = found[p]
            if isinstance(rec, int):
                out[(t, p)] = rec
            else:  # decoded as batches() decodes it, so the fingerprints agree
                key = rec.key.decode("utf-8", "replace") if rec.key else None
                out[(t, p)] = fingerprint(key, rec.value if rec.value is not None else b"")
        return out

    def rewind(self, partitions: list[tuple[str, int]]) -> None:
        if self._consumer is not None and partitions:
            self._consumer.seek_to_beginning(*(TopicPartition(t, p) for t, p in partitions))

    async def committed(self, topic: str, partition: int) -> int | None:
        assert self._consumer is not None
        return await self._consumer.committed(TopicPartition(topic, partition))

    def pause(self) -> None:
        if self._consumer is not None and not self._paused:
            self._consumer.pause(*self._consumer.assignment())
            self._paused = True

    def resume(self) -> None:
        if self._consumer is not None and self._paused:
            self._consumer.resume(*self._consumer.assignment())
            self._paused = False


async def _leave_first_generation(consumer: AIOKafkaConsumer) -> None:
    """Leave the group explicitly when its generation is 0.

    aiokafka sends LeaveGroup only for generations above 0, and Tansu numbers a group's first
    generation 0: without this, a worker stopped in that generation stays a member until its
    session times out, and the partitions it held wait that long for a new owner.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "generation", None) != 0:
        return
    member = getattr(coordinator, "member_id", "")
    if not member or member == UNKNOWN_MEMBER_ID:
        return
    try:
        await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, member))  # noqa: SLF001
        logger.info("left group %r (generation 0)", coordinator.group_id)
    except Exception as e:  # noqa: BLE001 - best effort, as aiokafka's own leave is
        logger.warning("LeaveGroup for generation 0 failed: %s", e)

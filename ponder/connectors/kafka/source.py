"""Consumer-group source: batches of records, commits of completed positions, rebalances.

The runtime binds itself to the source (`bind`) so that a rebalance drains and checkpoints the
revoked partitions before they go, and restores state for assigned partitions before their
first record is processed.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
        src = self.source
        if tps and src.runtime is not None:
            if src.expelled():
                # the group already gave these partitions to another member (our session
                # expired: a network partition, a long pause): nothing more may be written
                # for them; their new owner replays from the last commit
                await src.runtime.lose(tps)
            else:  # still ours: the runtime drains and commits them
                await src.runtime.revoke(tps)
        src.assigned.difference_update(tps)

    async def on_partitions_assigned(self, assigned) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in assigned)
        # the fetcher may already return records of these partitions: hold them back until
        # the runtime has restored their state
        self.source.ready.clear()
        self.source.renew()  # a completed join proves membership as a heartbeat does
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
        # membership lease: outputs and changelog records are handed to the broker only within
        # half a session of the last heartbeat the group accepted, and the producers give up on
        # a record within the other half, so nothing of ours lands after the group could have
        # expired us and handed our partitions on (fencing without transactions)
        self.lease_s = session_timeout_ms / 2000.0
        self._last_beat = time.monotonic()
        self.ready = asyncio.Event()
        self.ready.set()
        self._stopped = False
        self._paused = False
        # partitions of the latest rewind, a new object each time: a fetch that began before it
        # returns records of their old position, which are dropped
        self._rewinds: frozenset[int] = frozenset()

    def bind(self, runtime: Assignments) -> None:
        self.runtime = runtime

    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.brokers, group_id=self.group,
                                          enable_auto_commit=False, **self._opts)
        await self._consumer.start()
        self._watch_heartbeats(self._consumer)
        self._consumer.subscribe([self.topic], listener=_Listener(self))

    def _watch_heartbeats(self, consumer: AIOKafkaConsumer) -> None:
        """Note each heartbeat the group accepts (aiokafka has no hook for it, so its
        coordinator's heartbeat call is wrapped)."""
        coordinator = consumer._coordinator  # noqa: SLF001
        beat = coordinator._do_heartbeat  # noqa: SLF001

        async def watched() -> bool:
            ok = await beat()
            if ok:
                self.renew()
            return ok

        coordinator._do_heartbeat = watched  # noqa: SLF001

    def renew(self) -> None:
        self._last_beat = time.monotonic()

    def member(self) -> bool:
        """Whether the group certainly still counts this worker as the owner of its partitions."""
        return time.monotonic() - self._last_beat < self.lease_s

    def expelled(self) -> bool:
        """Whether the group has forgotten this member (it must rejoin as a new one)."""
        c = getattr(self._consumer, "_coordinator", None)
        return c is not None and c.member_id == UNKNOWN_MEMBER_ID

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
            rewinds = self._rewinds
            data = await self._consumer.getmany(timeout_ms=200, max_records=self._batch)
            await self.ready.wait()
            out: list[Record] = []
            for tp, msgs in data.items():
                p = tp.partition
                if self._rewinds is not rewinds and p in self._rewinds:
                    continue  # fetched from where the partition was before it was rewound
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
        # offset 0 rather than seek_to_beginning (a coroutine to await): a log trimmed by
        # retention answers out-of-range and the consumer's `earliest` reset takes its start
        if self._consumer is not None and partitions:
            for t, p in partitions:
                self._consumer.seek(TopicPartition(t, p), 0)
            self._rewinds = frozenset(p for _, p in partitions)

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

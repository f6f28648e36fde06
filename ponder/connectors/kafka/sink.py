"""Decisions and dead letters to Kafka, without duplicates across crashes.

Record key = event key; headers carry `decision_id` and `tenant`. A decision goes to the output
partition with the number of its input partition, so everything that input partition p caused
lives in output partition p. That makes duplicates findable: at each checkpoint the sink
reports, per input partition, the output offset where the outputs of not-yet-committed input
begin; after a crash the worker replays that input, and the sink first reads output partition p
from that offset and suppresses every id it finds there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import msgspec
from aiokafka import AIOKafkaProducer

from ponder.connectors.kafka.reader import read_to_end
from ponder.types import DeadLetter, Decision

__all__ = ["KafkaSink"]

logger = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()


def dead_letter_id(letter: DeadLetter) -> str:
    s = letter.source
    return f"{s.topic}:{s.partition}:{s.offset}:{letter.stage}"


class KafkaSink:
    def __init__(self, brokers: str, decisions_topic: str, dead_topic: str, *, linger_ms: int = 5) -> None:
        self.brokers = brokers
        self.topics = {"decisions": decisions_topic, "dead": dead_topic}
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        self._queue: deque[tuple[str, int, int, str, bytes, bytes, list]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._inflight: list[tuple[str, int, int, asyncio.Future]] = []
        # (kind, input partition) -> deque of (input offset, output offset), oldest first
        self._outputs: dict[tuple[str, int], deque[tuple[int, int]]] = {}
        self._end: dict[tuple[str, int], int] = {}  # next output offset known per partition
        self._suppress: dict[tuple[str, int], set[str]] = {}
        self.written = 0
        self.dead_letters = 0
        self.suppressed = 0

    async def start(self) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.brokers, acks="all",
                                              linger_ms=self._linger_ms, max_batch_size=1 << 20)
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self.flush()
            await self._producer.stop()
            self._producer = None

    # -- writing ------------------------------------------------------------------------------

    def write(self, decision: Decision) -> None:
        src = decision.source
        part = src.partition if src is not None else 0
        if self._suppressed("decisions", part, decision.decision_id):
            return
        headers = [("decision_id", decision.decision_id.encode())]
        tenant = decision.headers.get("tenant")
        if tenant:
            headers.append(("tenant", tenant.encode()))
        self._enqueue("decisions", part, src.offset if src else -1, decision.key.encode(),
                      _enc.encode(decision), headers)
        self.written += 1

    def dead(self, letter: DeadLetter) -> None:
        lid = dead_letter_id(letter)
        if self._suppressed("dead", letter.source.partition, lid):
            return
        self._enqueue("dead", letter.source.partition, letter.source.offset, None,
                      _enc.encode(letter), [("dead_letter_id", lid.encode()),
                                            ("reason", letter.reason[:200].encode())])
        self.dead_letters += 1

    def _suppressed(self, kind: str, part: int, ident: str) -> bool:
        ids = self._suppress.get((kind, part))
        if ids and ident in ids:
            ids.discard(ident)
            self.suppressed += 1
            return True
        return False

    def _enqueue(self, kind: str, part: int, offset: int, key: bytes | None, value: bytes, headers: list) -> None:
        self._queue.append((kind, part, offset, key, value, headers))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """One sender task keeps each partition's records in the order they were written."""
        assert self._producer is not None, "KafkaSink.start() was not called"
        q = self._queue
        while q:
            kind, part, offset, key, value, headers = q.popleft()
            fut = await self._producer.send(self.topics[kind], value=value, key=key, partition=part,
                                            headers=headers)
            self._inflight.append((kind, part, offset, fut))

    async def flush(self) -> None:
        """Wait until every written record is acknowledged; remember where each landed."""
        if self._producer is None:
            return
        while self._sender is not None and not self._sender.done() or self._queue:
            if self._sender is None or self._sender.done():
                self._sender = asyncio.get_running_loop().create_task(self._send())
            await self._sender
        await self._producer.flush()
        inflight, self._inflight = self._inflight, []
        for kind, part, offset, fut in inflight:
            md = await fut
            self._outputs.setdefault((kind, part), deque()).append((offset, md.offset))
            self._end[(kind, part)] = md.offset + 1

    # -- crash safety -------------------------------------------------------------------------

    def checkpoint_meta(self, partition: int, committed: int) -> dict[str, int]:
        """Per output kind, the offset from which the outputs of input at or past `committed`
        begin. Call after flush(), with the offset about to be committed."""
        meta = {}
        for kind in self.topics:
            outs = self._outputs.get((kind, partition))
            while outs and outs[0][0] < committed:
                outs.popleft()
            if outs:
                meta[f"{kind}_from"] = outs[0][1]
            elif (kind, partition) in self._end:
                meta[f"{kind}_from"] = self._end[(kind, partition)]
        return meta

    async def recover(self, metas: dict[int, dict[str, int]]) -> int:
        """Before replaying input partitions, learn which of their outputs already exist."""
        found = 0
        for kind, topic in self.topics.items():
            header = "decision_id" if kind == "decisions" else "dead_letter_id"
            # no checkpoint has recorded where to look yet: everything may be a duplicate
            starts = {p: meta.get(f"{kind}_from", 0) for p, meta in metas.items()}
            ids: dict[int, set[str]] = {p: set() for p in starts}
            async for p, batch in read_to_end(self.brokers, topic, starts):
                for rec in batch:
                    for k, v in rec.headers or ():
                        if k == header:
                            ids[p].add(v.decode())
                end = batch[-1].offset + 1
                self._end[(kind, p)] = max(end, self._end.get((kind, p), 0))
            for p, found_ids in ids.items():
                self._suppress[(kind, p)] = found_ids
                found += len(found_ids)
        if found:
            logger.info("partitions %s: %d outputs already emitted will not be sent again", sorted(metas), found)
        return found

    def forget(self, partition: int) -> None:
        for kind in self.topics:
            self._outputs.pop((kind, partition), None)
            self._suppress.pop((kind, partition), None)

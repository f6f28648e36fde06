"""In-memory source and sink: for tests, notebooks and embedding ponder in another program."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, AsyncIterator, Iterable

import msgspec

from ponder.connectors.base import BEYOND_END, Record, fingerprint
from ponder.types import DeadLetter, Decision, SourcePos

__all__ = ["MemorySource", "MemorySink", "MemoryLog", "MemoryLogSource"]

_enc = msgspec.json.Encoder()


class MemorySource:
    """Serve a list of values (bytes, str or dicts) as topic `topic`, one partition per key
    hash when `partitions` > 1, so tests can exercise per-partition completion tracking."""

    def __init__(self, items: Iterable[bytes | str | dict[str, Any]], *, topic: str = "memory",
                 partitions: int = 1, batch: int = 512, key_field: str | None = None) -> None:
        self._items = list(items)
        self._topic = topic
        self._partitions = partitions
        self._batch = batch
        self._key_field = key_field

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def batches(self) -> AsyncIterator[list[Record]]:
        next_offset = [0] * self._partitions
        out: list[Record] = []
        for item in self._items:
            value = item.encode() if isinstance(item, str) else item
            p = 0
            if self._partitions > 1 and isinstance(item, dict) and self._key_field:
                p = zlib.crc32(str(item.get(self._key_field)).encode()) % self._partitions
            out.append(Record(value, SourcePos(self._topic, p, next_offset[p])))
            next_offset[p] += 1
            if len(out) >= self._batch:
                yield out
                out = []
                await asyncio.sleep(0)  # let lanes run between batches, as a network source would
        if out:
            yield out


class MemorySink:
    """Collect decisions and dead letters in lists."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.dead_letters: list[DeadLetter] = []
        self.flushes = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def write(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def dead(self, letter: DeadLetter) -> None:
        self.dead_letters.append(letter)

    async def flush(self) -> None:
        self.flushes += 1


class MemoryLog:
    """A partitioned topic in memory with one consumer group's commits: what a broker keeps,
    for testing the effectively-once contract without one. `restart()` loses everything, as a
    memory-only broker does when it restarts."""

    def __init__(self, topic: str = "memory", partitions: int = 1) -> None:
        self.topic = topic
        self.logs: list[list[tuple[str | None, bytes]]] = [[] for _ in range(partitions)]
        self.committed: dict[tuple[str, int], int] = {}
        self.commits: list[dict[tuple[str, int], int]] = []

    def append(self, value: bytes | str | dict[str, Any], key: str | None = None, partition: int = 0) -> int:
        raw = value.encode() if isinstance(value, str) else value if isinstance(value, bytes) else _enc.encode(value)
        self.logs[partition].append((key, raw))
        return len(self.logs[partition]) - 1

    def restart(self) -> None:
        self.logs = [[] for _ in self.logs]
        self.committed.clear()


class MemoryLogSource:
    """A CommittingSource over a MemoryLog: it owns every partition, reads from the committed
    positions (else from the start), and ends once it has caught up with the log. A position
    past a partition's end (the log started again) resets to the start, as a Kafka consumer
    with `auto_offset_reset=earliest` does."""

    def __init__(self, log: MemoryLog, *, batch: int = 64, refuse_commits: bool = False) -> None:
        self.log = log
        self.batch = batch
        self.refuse_commits = refuse_commits
        self.runtime = None
        self.positions: dict[int, int] = {}
        self.between_batches: list = []  # callables run after each batch (tests inject faults)

    def bind(self, runtime) -> None:
        self.runtime = runtime

    async def start(self) -> None:
        tps = [(self.log.topic, p) for p in range(len(self.log.logs))]
        for t, p in tps:
            self.positions[p] = self.log.committed.get((t, p), 0)
        if self.runtime is not None:
            await self.runtime.assign(tps)

    async def stop(self) -> None:
        pass

    async def batches(self) -> AsyncIterator[list[Record]]:
        topic = self.log.topic
        while True:
            out: list[Record] = []
            for p, log in enumerate(self.log.logs):
                pos = self.positions.get(p, 0)
                if pos > len(log):
                    pos = 0
                for off in range(pos, min(len(log), pos + self.batch)):
                    key, value = log[off]
                    out.append(Record(value, SourcePos(topic, p, off), key))
                self.positions[p] = min(len(log), pos + self.batch)
            if not out:
                return
            yield out
            await asyncio.sleep(0)
            for hook in list(self.between_batches):
                await hook()

    async def commit(self, positions) -> bool:
        if self.refuse_commits:
            return False
        self.log.committed.update(positions)
        self.log.commits.append(dict(positions))
        return True

    async def anchors(self, offsets) -> dict[tuple[str, int], int]:
        out = {}
        for (t, p), off in offsets.items():
            log = self.log.logs[p]
            out[(t, p)] = BEYOND_END if off >= len(log) else fingerprint(*log[off])
        return out

    def rewind(self, partitions) -> None:
        for _, p in partitions:
            self.positions[p] = 0

    def member(self) -> bool:
        return True

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

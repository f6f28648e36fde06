"""In-memory source and sink: for tests, notebooks and embedding ponder in another program."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, AsyncIterator, Iterable

import msgspec

from ponder.connectors.base import Record
from ponder.types import DeadLetter, Decision, SourcePos

__all__ = ["MemorySource", "MemorySink"]

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

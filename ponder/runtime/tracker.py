"""Completion tracking: the highest position per partition below which every event is done.

Events of one partition are received in offset order but finish out of order (a slow key's lane
holds its events while other keys race ahead). A worker may only commit past an offset when
everything before it is done, or a crash would skip unfinished work.

Offsets need not be contiguous (compaction and transaction markers leave holes in Kafka), so
the tracker remembers the offsets it was given rather than assuming `offset + 1`.

>>> t = CompletionTracker()
>>> for o in (5, 6, 9): t.received("t", 0, o)
>>> t.done("t", 0, 6); t.committable()
{}
>>> t.done("t", 0, 5); t.committable()
{('t', 0): 7}
>>> t.done("t", 0, 9); t.committable()
{('t', 0): 10}
"""

from __future__ import annotations

from collections import deque

__all__ = ["CompletionTracker", "OutOfOrderOffset"]


class OutOfOrderOffset(ValueError):
    """A partition delivered an offset not above the previous one."""


class _Partition:
    __slots__ = ("pending", "finished", "next", "last")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # received, in order, not yet below the watermark
        self.finished: set[int] = set()  # done but blocked behind an unfinished offset
        self.next: int | None = None  # offset to commit: one past the last contiguous done
        self.last = -1


class CompletionTracker:
    """Per-partition watermarks of contiguous completed offsets (Kafka commit semantics:
    the committable value is the next offset to consume)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], _Partition] = {}

    def received(self, topic: str, partition: int, offset: int) -> None:
        p = self._parts.get((topic, partition))
        if p is None:
            p = self._parts[(topic, partition)] = _Partition()
        if offset <= p.last:
            msg = f"{topic}[{partition}]: offset {offset} received after {p.last}"
            raise OutOfOrderOffset(msg)
        p.last = offset
        p.pending.append(offset)

    def done(self, topic: str, partition: int, offset: int) -> None:
        p = self._parts[(topic, partition)]
        pending = p.pending
        if pending and pending[0] == offset:
            pending.popleft()
            p.next = offset + 1
            finished = p.finished
            while pending and pending[0] in finished:
                o = pending.popleft()
                finished.discard(o)
                p.next = o + 1
        else:
            p.finished.add(offset)

    def committable(self) -> dict[tuple[str, int], int]:
        """Next offset to commit per partition, for partitions with progress."""
        return {tp: p.next for tp, p in self._parts.items() if p.next is not None}

    def in_flight(self) -> int:
        return sum(len(p.pending) - len(p.finished) for p in self._parts.values())

    def forget(self, topic: str, partition: int) -> None:
        """Drop a revoked partition."""
        self._parts.pop((topic, partition), None)

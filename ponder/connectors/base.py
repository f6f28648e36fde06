"""What every connector speaks: raw records in, decisions and dead letters out.

Two richer contracts carry the effectively-once guarantee of a worker (see
`ponder/runtime/checkpoint.py`, which drives them):

- a `CommittingSource` has partitions assigned and revoked, takes commits of completed
  positions, and can tell whether the log it reads is still the log a checkpoint saw
  (`anchors`), so a topic that started again is read as a new epoch rather than as replays;
- a `ReplayableSink` says where the outputs of not-yet-committed input begin
  (`checkpoint_meta`) and, before that input is replayed, reads them back (`recover`) so
  nothing is emitted twice.

A plain `Source`/`Sink` (files, stdin, memory) gives at-least-once only where it can replay.
"""

from __future__ import annotations

import zlib
from typing import Any, AsyncIterator, Mapping, Protocol, runtime_checkable

import msgspec

from ponder.types import DeadLetter, Decision, SourcePos

__all__ = ["Record", "Source", "Sink", "CommittingSource", "ReplayableSink", "Assignments",
           "SinkError", "MembershipUnsure", "fingerprint", "BEFORE_START", "BEYOND_END"]

# what `CommittingSource.anchors` answers for an offset it cannot read
BEFORE_START = -1  # removed by retention: the log is older than that offset, not a new one
BEYOND_END = -2  # the log does not reach that offset: it started again


class SinkError(RuntimeError):
    """A sink could not make an output durable and cannot retry: the worker must stop before
    committing past the input that caused it."""


class MembershipUnsure(RuntimeError):
    """Not now: the consumer group may have moved our partitions on, so nothing may be made
    durable until it says otherwise (the partitions come back, or are lost). Not an error of
    the worker: the checkpoint is skipped and tried again."""


class Record(msgspec.Struct):
    """One input record before decoding. `value` is raw bytes (decoded by the runtime, so a
    bad record becomes a dead letter there) or an already-parsed mapping (CSV rows). A
    connector that knows the key or timestamp out of band (Kafka message key, NAB file name)
    sets them; otherwise the pipeline's key and time fields are read from the value."""

    value: bytes | dict[str, Any]
    source: SourcePos
    key: str | None = None
    ts: float | None = None
    headers: dict[str, str] = {}
    error: str | None = None  # the connector already knows this record is broken, and why


def fingerprint(key: str | None, value: bytes | None) -> int:
    """A record's identity for telling one log from another at the same offset (a 31-bit int,
    so it fits every store's bookkeeping). `key` as the source decoded it."""
    return zlib.crc32(value or b"", zlib.crc32((key or "").encode("utf-8", "replace"))) & 0x7FFF_FFFF


def record_fingerprint(rec: Record) -> int:
    value = rec.value
    if not isinstance(value, bytes):
        try:
            value = msgspec.json.encode(value)
        except Exception:  # noqa: BLE001 - a record the decoder refused still has an identity
            value = repr(value).encode("utf-8", "backslashreplace")
    return fingerprint(rec.key, value)


@runtime_checkable
class Source(Protocol):
    """An async source of record batches. Batches keep per-partition order."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def batches(self) -> AsyncIterator[list[Record]]: ...


@runtime_checkable
class Sink(Protocol):
    """Where decisions and dead letters go. `write`/`dead` buffer; `flush` makes them durable
    (or raises SinkError), and the runtime flushes before it reports positions as committable."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def write(self, decision: Decision) -> None: ...
    def dead(self, letter: DeadLetter) -> None: ...
    async def flush(self) -> None: ...


class Assignments(Protocol):
    """What the runtime offers a committing source: partitions arrive and leave."""

    async def assign(self, partitions: list[tuple[str, int]]) -> None: ...
    async def revoke(self, partitions: list[tuple[str, int]]) -> None: ...

    async def lose(self, partitions: list[tuple[str, int]]) -> None:
        """The group already gave these partitions to another member: drop, never commit."""
        ...


@runtime_checkable
class CommittingSource(Source, Protocol):
    """A source read by a consumer group: assignment, commits, and log identity."""

    def bind(self, runtime: Assignments) -> None:
        """Call `runtime.assign`/`revoke` around every rebalance, before records of an assigned
        partition are returned and before a revoked one is given up."""
        ...

    async def commit(self, positions: Mapping[tuple[str, int], int]) -> bool:
        """Commit next-offsets of owned partitions; False when the group refused (a rebalance
        took them): not an error, the next owner replays and dedups."""
        ...

    async def anchors(self, offsets: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The `fingerprint` of the record at each offset, or BEFORE_START / BEYOND_END."""
        ...

    def rewind(self, partitions: list[tuple[str, int]]) -> None:
        """Read these partitions again from their first offset (a new epoch)."""
        ...

    def member(self) -> bool:
        """Whether the group certainly still counts this worker as the owner of its
        partitions; a checkpoint publishes nothing when it does not."""
        ...

    def pause(self) -> None: ...
    def resume(self) -> None: ...


@runtime_checkable
class ReplayableSink(Sink, Protocol):
    """A sink whose outputs can be read back, so a replay suppresses what already exists."""

    def checkpoint_meta(self, partition: int, committed: int) -> dict[str, int]:
        """Where the outputs of input at or past `committed` begin (after `flush`)."""
        ...

    async def recover(self, metas: Mapping[int, Mapping[str, int]]) -> int:
        """Before input partitions are replayed, learn which of their outputs exist."""
        ...

    def abandon(self, partition: int) -> int:
        """Drop the not-yet-sent outputs of a lost input partition."""
        ...

    def prune(self, partition: int, committed: int) -> None:
        """The commit of `committed` was accepted: forget where older input's outputs lie."""
        ...

    def forget(self, partition: int) -> None: ...

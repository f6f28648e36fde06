"""What every connector speaks: raw records in, decisions and dead letters out."""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

import msgspec

from ponder.types import DeadLetter, Decision, SourcePos

__all__ = ["Record", "Source", "Sink"]


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


@runtime_checkable
class Source(Protocol):
    """An async source of record batches. Batches keep per-partition order."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def batches(self) -> AsyncIterator[list[Record]]: ...


@runtime_checkable
class Sink(Protocol):
    """Where decisions and dead letters go. `write`/`dead` buffer; `flush` makes them durable,
    and the runtime flushes before it reports positions as committable."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def write(self, decision: Decision) -> None: ...
    def dead(self, letter: DeadLetter) -> None: ...
    async def flush(self) -> None: ...

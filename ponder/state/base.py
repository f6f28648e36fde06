"""The Store protocol: per-key state plus the positions that state reflects.

A write is one atomic batch of key states AND bookkeeping (input positions, the changelog offset
the state reflects, where the outputs of uncommitted input begin), so after a restore the store
says exactly which input it already reflects and a replay of older input is skipped.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, runtime_checkable

__all__ = ["Store", "Changelog", "ChangelogError", "Positions"]

# (topic, partition) -> next offset to process
Positions = Mapping[tuple[str, int], int]


@runtime_checkable
class Store(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def write(self, states: Mapping[str, bytes | None], positions: Positions,
              meta: Mapping[str, int] | None = None) -> None:
        """Atomically put (or delete, for None) states and record positions and meta."""
        ...

    def positions(self) -> dict[tuple[str, int], int]: ...
    def meta(self) -> dict[str, int]: ...
    def items(self) -> Iterator[tuple[str, bytes]]: ...
    def close(self) -> None: ...


class ChangelogError(RuntimeError):
    """A checkpoint could not make states durable; nothing may be committed."""


@runtime_checkable
class Changelog(Protocol):
    """A durable copy of each partition's store that another machine can restore from."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def publish(self, batches: Mapping[int, tuple[Mapping[str, bytes | None], Mapping[str, int]]]
                      ) -> dict[int, int]:
        """Make each partition's states and meta durable; return the changelog position each
        partition reaches."""
        ...

    async def restore(self, stores: Mapping[int, Store]) -> dict[int, dict[str, int]]:
        """Bring each partition's store up to date; return each one's meta."""
        ...

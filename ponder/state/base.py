"""The Store protocol: per-key state plus the source positions that state reflects.

A write is one atomic batch of key states AND positions, so after a restore the store can say
exactly which input it already reflects, and a replay of older input is skipped.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, runtime_checkable

__all__ = ["Store", "Positions"]

# (topic, partition) -> next offset to process
Positions = Mapping[tuple[str, int], int]


@runtime_checkable
class Store(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def write(self, states: Mapping[str, bytes | None], positions: Positions) -> None:
        """Atomically put (or delete, for None) states and record positions."""
        ...
    def positions(self) -> dict[tuple[str, int], int]: ...
    def items(self) -> Iterator[tuple[str, bytes]]: ...
    def close(self) -> None: ...

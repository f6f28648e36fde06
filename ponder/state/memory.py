"""A Store in a dict: the default for local runs and the reference the RocksDB store must match."""

from __future__ import annotations

from typing import Iterator, Mapping

from ponder.state.base import Positions

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._positions: dict[tuple[str, int], int] = {}
        self._meta: dict[str, int] = {}
        self.writes = 0

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def write(self, states: Mapping[str, bytes | None], positions: Positions,
              meta: Mapping[str, int] | None = None) -> None:
        # single-threaded: nothing can observe the store between these updates
        for k, v in states.items():
            if v is None:
                self._data.pop(k, None)
            else:
                self._data[k] = v
        self._positions.update(positions)
        if meta:
            self._meta.update(meta)
        self.writes += 1

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._positions)

    def meta(self) -> dict[str, int]:
        return dict(self._meta)

    def items(self) -> Iterator[tuple[str, bytes]]:
        return iter(list(self._data.items()))

    def close(self) -> None:
        pass

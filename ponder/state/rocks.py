"""A Store in RocksDB (rocksdict), one database per assigned partition.

Keys are namespaced in one keyspace: `s:<key>` for states, `p:<topic>\\0<partition>` for input
positions and `m:<name>` for bookkeeping, so a state write and its positions land in a single
WriteBatch: after a crash the database holds either both or neither.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator, Mapping

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from ponder.state.base import Positions

__all__ = ["RocksStore"]

_I64 = struct.Struct(">q")


def _pos_key(topic: str, partition: int) -> bytes:
    return b"p:" + topic.encode() + b"\0" + str(partition).encode()


class RocksStore:
    """:param durable: False skips the write-ahead log, for a scratch store nothing restores
        from (a file run's spilled keys): a crash loses it whole, which is all it may lose."""

    def __init__(self, path: str | Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # a key's first event looks for a state that is not there: a bloom filter answers
        # that without reading the table
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        if not durable:
            # a scratch store is read back at once, key by key: keep its blocks uncompressed
            # and cached rather than decompress one per lookup
            table.set_block_cache(Cache(64 << 20))
            opts.set_compression_type(DBCompressionType.none())
        opts.set_block_based_table_factory(table)
        self._db = Rdict(str(self.path), options=opts)
        self._write_opts = WriteOptions()
        self._write_opts.disable_wal = not durable

    def get(self, key: str) -> bytes | None:
        return self._db.get(b"s:" + key.encode())

    def write(self, states: Mapping[str, bytes | None], positions: Positions,
              meta: Mapping[str, int] | None = None) -> None:
        wb = WriteBatch(raw_mode=True)
        for k, v in states.items():
            if v is None:
                wb.delete(b"s:" + k.encode())
            else:
                wb.put(b"s:" + k.encode(), v)
        for (topic, partition), offset in positions.items():
            wb.put(_pos_key(topic, partition), _I64.pack(offset))
        for name, value in (meta or {}).items():
            wb.put(b"m:" + name.encode(), _I64.pack(value))
        self._db.write(wb, self._write_opts)

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self._db.items(from_key=prefix):
            if not k.startswith(prefix):
                break
            yield k[len(prefix):], v

    def positions(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in self._scan(b"p:"):
            topic, _, part = k.partition(b"\0")
            out[(topic.decode(), int(part))] = _I64.unpack(v)[0]
        return out

    def meta(self) -> dict[str, int]:
        return {k.decode(): _I64.unpack(v)[0] for k, v in self._scan(b"m:")}

    def items(self) -> Iterator[tuple[str, bytes]]:
        for k, v in self._scan(b"s:"):
            yield k.decode(), v

    def close(self) -> None:
        self._db.close()

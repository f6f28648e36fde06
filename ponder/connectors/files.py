"""File connectors: JSONL and CSV sources and sinks, NAB CSV series, stdin/stdout.

A file is one partition of a topic named after the file; a record's offset is its line number
(0-based, header excluded for CSV), so a dead letter points at the exact line to fix.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, AsyncIterator

import msgspec

from ponder.connectors.base import Record
from ponder.types import DeadLetter, Decision, SourcePos

__all__ = [
    "JsonlSource",
    "CsvSource",
    "NabSource",
    "JsonlSink",
    "CsvSink",
    "read_nab",
    "nab_key",
]

_enc = msgspec.json.Encoder()


class _LineSource:
    """Shared reading loop: batches of lines, yielding to the event loop between batches."""

    def __init__(self, path: str | Path | None, *, batch: int = 1024, topic: str | None = None) -> None:
        self.path = None if path in (None, "-") else Path(path)
        self.topic = topic or (self.path.name if self.path else "stdin")
        self._batch = batch
        self._fh: IO[bytes] | None = None

    async def start(self) -> None:
        if self._fh is None:
            if self.path is None:
                self._fh = sys.stdin.buffer
            else:
                if not self.path.exists():
                    msg = f"input file {str(self.path)!r} does not exist"
                    raise FileNotFoundError(msg)
                self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in stop()

    async def stop(self) -> None:
        if self._fh is not None and self.path is not None:
            self._fh.close()
        self._fh = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class JsonlSource(_LineSource):
    """One JSON object per line; blank lines are skipped but keep their line numbers."""

    async def batches(self) -> AsyncIterator[list[Record]]:
        await self.start()
        assert self._fh is not None
        out: list[Record] = []
        topic = self.topic
        for i, line in enumerate(self._fh):
            line = line.strip()
            if line:
                out.append(Record(line, SourcePos(topic, 0, i)))
                if len(out) >= self._batch:
                    yield out
                    out = []
                    await asyncio.sleep(0)
        if out:
            yield out


def _cell(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


class CsvSource(_LineSource):
    """A CSV file with a header row; numeric-looking cells become numbers, empty cells null."""

    async def batches(self) -> AsyncIterator[list[Record]]:
        await self.start()
        assert self._fh is not None
        text = io.TextIOWrapper(self._fh, encoding="utf-8", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        out: list[Record] = []
        for i, row in enumerate(reader):
            pos = SourcePos(self.topic, 0, i)
            if len(row) != len(header):
                # keep the raw line so the dead letter shows what was wrong
                out.append(Record(",".join(row).encode(), pos,
                                  error=f"expected {len(header)} columns, got {len(row)}"))
            else:
                out.append(Record({h: _cell(v) for h, v in zip(header, row)}, pos))
            if len(out) >= self._batch:
                yield out
                out = []
                await asyncio.sleep(0)
        if out:
            yield out
        text.detach()


def nab_key(path: Path, root: Path | None = None) -> str:
    """A NAB series' key: `group/name.csv`, as in NAB's labels file."""
    return f"{path.parent.name}/{path.name}" if root is None or path.parent != root else path.name


def _nab_ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


def read_nab(path: str | Path) -> tuple[list[str], list[float], list[float]]:
    """Read one NAB series: (timestamps as written, epoch seconds, values)."""
    stamps, ts, values = [], [], []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            msg = f"{str(path)!r} is not a NAB series: expected header 'timestamp,value', got {header!r}"
            raise ValueError(msg)
        for line, row in enumerate(reader, start=2):
            try:
                t, v = _nab_ts(row[0]), float(row[1])
            except (ValueError, IndexError) as e:
                msg = f"{str(path)!r} line {line}: {e}"
                raise ValueError(msg) from e
            stamps.append(row[0])
            ts.append(t)
            values.append(v)
    return stamps, ts, values


class NabSource:
    """NAB series (`timestamp,value` CSVs): one file is one key and one partition.

    Files are interleaved by timestamp, as if each series were a device publishing live.
    """

    def __init__(self, paths: list[Path], *, root: Path | None = None, batch: int = 1024,
                 topic: str = "nab") -> None:
        self.paths = sorted(paths)
        self.root = root
        self.topic = topic
        self._batch = batch

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def batches(self) -> AsyncIterator[list[Record]]:
        rows = []
        for p, path in enumerate(self.paths):
            key = nab_key(path, self.root)
            _, ts, values = read_nab(path)
            rows.extend((t, p, i, key, v) for i, (t, v) in enumerate(zip(ts, values)))
        rows.sort()
        out: list[Record] = []
        for t, p, i, key, v in rows:
            out.append(Record({"value": v}, SourcePos(self.topic, p, i), key=key, ts=t))
            if len(out) >= self._batch:
                yield out
                out = []
                await asyncio.sleep(0)
        if out:
            yield out


class JsonlSink:
    """Decisions as JSONL; dead letters as JSONL beside them (`FILE.dead.jsonl` by default).
    Path `-` writes decisions to stdout."""

    def __init__(self, path: str | Path, dead_path: str | Path | None = None) -> None:
        self.path = None if str(path) == "-" else Path(path)
        if dead_path is None:
            dead_path = "ponder.dead.jsonl" if self.path is None else f"{self.path}.dead.jsonl"
        self.dead_path = Path(dead_path)
        self._out: IO[bytes] | None = None
        self._dead: IO[bytes] | None = None
        self.written = 0
        self.dead_letters = 0

    async def start(self) -> None:
        if self._out is None:
            if self.path is None:
                self._out = sys.stdout.buffer
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._out = open(self.path, "wb")  # noqa: SIM115 - closed in stop()

    def write(self, decision: Decision) -> None:
        assert self._out is not None, "JsonlSink.start() was not called"
        self._out.write(_enc.encode(decision) + b"\n")
        self.written += 1

    def dead(self, letter: DeadLetter) -> None:
        if self._dead is None:
            self.dead_path.parent.mkdir(parents=True, exist_ok=True)
            self._dead = open(self.dead_path, "wb")  # noqa: SIM115 - closed in stop()
        self._dead.write(_enc.encode(letter) + b"\n")
        self.dead_letters += 1

    async def flush(self) -> None:
        for fh in (self._out, self._dead):
            if fh is not None:
                fh.flush()

    async def stop(self) -> None:
        await self.flush()
        if self._out is not None and self.path is not None:
            self._out.close()
        if self._dead is not None:
            self._dead.close()
        self._out = self._dead = None


class CsvSink(JsonlSink):
    """Decisions as CSV rows (one column per Decision field, nested values as JSON)."""

    _columns = ("decision_id", "key", "ts", "action", "severity", "confidence", "tier", "model",
                "degraded", "latency_ms", "reason")

    async def start(self) -> None:
        await super().start()
        assert self._out is not None
        self._out.write((",".join(self._columns) + "\n").encode())

    def write(self, decision: Decision) -> None:
        assert self._out is not None, "CsvSink.start() was not called"
        buf = io.StringIO()
        csv.writer(buf).writerow([getattr(decision, c) for c in self._columns])
        self._out.write(buf.getvalue().encode())
        self.written += 1

"""File connectors: JSONL and CSV sources and sinks, NAB CSV series, stdin/stdout.

A file is one partition of a topic named after the file; a record's offset is the 0-based number
of the line it starts on (for CSV, counted from the line after the header), so a dead letter
points at the exact line to fix.

Input files are untrusted. They are read in chunks, never whole, and a broken record becomes a
dead letter (a Record with `error` set) while the rest of the file is still read:

- A line ends at LF, CRLF or a lone CR (old Mac files), so line numbers match an editor's
  whatever the line endings. A UTF-8 byte-order mark at the start of the file is dropped.
- A line longer than `max_bytes` (1 MiB) is a dead letter keeping only its first bytes; the rest
  of it is skipped without being held in memory.
- A record that is not valid UTF-8 is a dead letter naming the first bad byte.
- JSONL: one record per non-blank line. Whatever else is wrong with a line (a NUL byte, a last
  line cut short) is left to the decoder, which dead-letters the line.
- CSV: the first non-blank record is the header; a file whose header cannot be read is refused
  with InputError, as none of its rows could be understood. Blank lines are skipped. Quoting is
  strict (RFC 4180): a closing quote must be followed by a comma or the end of the line. A record
  is one line, or several while a quoted field holds line breaks. A quoted field still open after
  `max_lines` (100) lines or `csv.field_size_limit()` bytes (131,072), or at the end of the file,
  is taken for a stray quote: the record is a dead letter at its first line, and reading resumes
  at its second line. So is a record over several lines that has the wrong number of columns or
  that the csv module rejects. One stray quote thus costs one dead letter, never the rest of the
  file, and no line is read more than `max_lines` times.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import sys
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, AsyncIterator, Callable, Iterator, NamedTuple

import msgspec

from ponder.connectors.base import Record
from ponder.types import DeadLetter, Decision, SourcePos

__all__ = [
    "JsonlSource",
    "CsvSource",
    "NabSource",
    "JsonlSink",
    "CsvSink",
    "InputError",
    "read_nab",
    "nab_key",
]

_enc = msgspec.json.Encoder()

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 16
_KEEP = 2000  # bytes of an over-long line kept for its dead letter (what decode shows of it)
_BATCH_BYTES = 1 << 23  # a batch also ends here, so batches of long lines stay small


class InputError(ValueError):
    """An input file that cannot be read at all (a CSV file without a usable header)."""


class _Line(NamedTuple):
    number: int  # 0-based, counting every line of the file
    text: bytes  # without its end; over the limit, only its first min(_KEEP, limit) bytes
    end: bytes  # b"\n", b"\r\n", b"\r", or b"" for a last line without one
    length: int  # the full length of `text` in the file


def _skip(read: Callable[[int], bytes], data: bytes, length: int) -> tuple[int, bytes, bytes]:
    """Read past the rest of an over-long line, keeping none of it: its full length, its end,
    and the data after that end."""
    while True:
        m = _EOL.search(data)
        if m is None:
            length += len(data)
            data = read(_CHUNK)
            if not data:
                return length, b"", b""
            continue
        length += m.start()
        rest = data[m.end():]
        if m.group() == b"\r" and not rest:  # the LF of a CRLF may be in the next chunk
            rest = read(_CHUNK)
            if rest.startswith(b"\n"):
                return length, b"\r\n", rest[1:]
        return length, m.group(), rest


def _read_lines(fh: IO[bytes], max_bytes: int) -> Iterator[_Line]:
    """Split a byte stream into lines at LF, CRLF or CR, holding at most `max_bytes` of one."""
    # read1 returns what is there, so lines piped in on stdin flow as they arrive
    read = getattr(fh, "read1", fh.read)
    data = read(_CHUNK)
    while data and len(data) < len(_BOM) and _BOM.startswith(data) and (more := read(_CHUNK)):
        data += more  # a first read too short to tell whether the file opens with a BOM
    data = data.removeprefix(_BOM) or read(_CHUNK)
    number = 0
    carry = b""  # a line whose end is not read yet; a CR at its end may be half of a CRLF
    line_of = tuple.__new__  # what _Line(...) does, without its Python-level __new__ per line
    keep = min(_KEEP, max_bytes)  # of an over-long line: the same bytes however the reads fell
    while data:
        # bytes.splitlines breaks at exactly LF, CRLF and CR, and keeps one end on each piece
        lines = (carry + data).splitlines(True) if carry else data.splitlines(True)
        carry = b"" if lines[-1].endswith(b"\n") else lines.pop()
        for line in lines:
            text = line.rstrip(b"\r\n")
            n = len(text)
            yield line_of(_Line, (number, text if n <= max_bytes else text[:keep], line[n:], n))
            number += 1
        cr = carry.endswith(b"\r")
        if len(carry) - cr > max_bytes:
            n, end, data = _skip(read, b"\r" if cr else b"", len(carry) - cr)
            yield _Line(number, carry[:keep], end, n)
            number += 1
            carry = b""
            if data:  # what followed the over-long line in its last chunk
                continue
        data = read(_CHUNK)
    if carry:
        text = carry.rstrip(b"\r")
        yield _Line(number, text, carry[len(text):], len(text))


def _too_long(length: int, max_bytes: int) -> str:
    return f"line is {length} bytes long, over the limit of {max_bytes}"


def _utf8_error(data: bytes, at: int = 0) -> str | None:
    """Why `data` is not UTF-8 (`at`: where it starts in its record), or None if it is."""
    if data.isascii():
        return None
    try:
        data.decode()
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at byte {at + e.start} (0x{data[e.start]:02x}): {e.reason}"
    return None


class _LineSource:
    """Shared reading loop: records in batches, yielding to the event loop between batches."""

    def __init__(self, path: str | Path | None, *, batch: int = 1024, topic: str | None = None,
                 max_bytes: int = 1 << 20) -> None:
        if max_bytes < 1:
            msg = f"max_bytes must be at least 1, got {max_bytes}"
            raise ValueError(msg)
        self.path = None if path in (None, "-") else Path(path)
        self.topic = topic or (self.path.name if self.path else "stdin")
        self.max_bytes = max_bytes
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

    def _records(self, lines: Iterator[_Line]) -> Iterator[tuple[Record, int]]:
        """Each record with its size in bytes."""
        raise NotImplementedError

    async def batches(self) -> AsyncIterator[list[Record]]:
        await self.start()
        assert self._fh is not None
        out: list[Record] = []
        size = 0
        for rec, n in self._records(_read_lines(self._fh, self.max_bytes)):
            out.append(rec)
            size += n
            if len(out) >= self._batch or size >= _BATCH_BYTES:
                yield out
                out, size = [], 0
                await asyncio.sleep(0)
        if out:
            yield out


class JsonlSource(_LineSource):
    """One JSON object per line; blank lines are skipped but keep their line numbers.

    :param max_bytes: longest line, in bytes; a longer one is a dead letter.
    """

    def _records(self, lines: Iterator[_Line]) -> Iterator[tuple[Record, int]]:
        topic, limit = self.topic, self.max_bytes
        for number, line, _, length in lines:
            pos = SourcePos(topic, 0, number)
            if length > limit:
                yield Record(line, pos, error=_too_long(length, limit)), len(line)
                continue
            text = line.strip()
            if not text:
                continue
            if text.isascii():
                yield Record(text, pos), len(text)
            else:
                yield Record(text, pos, error=_utf8_error(line)), len(text)


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


class _Unclosed(Exception):
    """A quoted CSV field ran past the record's limits or the end of the file."""


class _Feed:
    """The lines of one CSV record, handed to csv.reader one at a time: the first, then more
    only while a quoted field is open, within the record's limits. A broken record's later lines
    can be handed out again, to start the next records."""

    def __init__(self, lines: Iterator[_Line], max_lines: int, max_bytes: int) -> None:
        self._lines = lines
        self._again: deque[_Line] = deque()
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._fresh = False  # the record's first line is still to be handed out
        self.taken: list[_Line] = []
        self.size = 0
        self.bad_utf8: str | None = None

    def next_record(self) -> _Line | None:
        """Start a record at the next line and return that line; None at the end of the file."""
        line = self._again.popleft() if self._again else next(self._lines, None)
        self.taken = [] if line is None else [line]
        self.size = 0 if line is None else line.length + len(line.end)
        self.bad_utf8 = None
        self._fresh = line is not None
        return line

    def reread(self) -> None:
        """Hand out again every line of the current record but its first."""
        self._again.extendleft(reversed(self.taken[1:]))

    def raw(self) -> bytes:
        data = b"".join(line.text + line.end for line in self.taken)
        return data.removesuffix(self.taken[-1].end)[:_KEEP]

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self._fresh:
            self._fresh = False
            return self._text(self.taken[0], 0)
        # csv.reader asks for another line only while a quoted field is open
        line = self._again.popleft() if self._again else next(self._lines, None)
        if line is None:
            msg = "quoted field not closed before the end of the file"
            raise _Unclosed(msg)
        at = self.size
        self.taken.append(line)
        self.size += line.length + len(line.end)
        if len(self.taken) > self._max_lines or self.size > self._max_bytes:
            msg = f"quoted field not closed within {self._max_lines} lines and {self._max_bytes} bytes"
            raise _Unclosed(msg)
        return self._text(line, at)

    def _text(self, line: _Line, at: int) -> str:
        data = line.text + line.end
        why = _utf8_error(data, at)
        if why is None:
            return data.decode()
        self.bad_utf8 = self.bad_utf8 or why
        # parse on, so the record ends where its quotes say, then dead-letter it
        return data.decode("utf-8", "surrogateescape")


class CsvSource(_LineSource):
    """A CSV file with a header row; numeric-looking cells become numbers, empty cells null.

    :param max_lines: most lines one record may span (a quoted field with line breaks).
    :param max_bytes: longest line, in bytes; a longer one is a dead letter.
    """

    def __init__(self, path: str | Path | None, *, batch: int = 1024, topic: str | None = None,
                 max_bytes: int = 1 << 20, max_lines: int = 100) -> None:
        super().__init__(path, batch=batch, topic=topic, max_bytes=max_bytes)
        if max_lines < 1:
            msg = f"max_lines must be at least 1, got {max_lines}"
            raise ValueError(msg)
        self.max_lines = max_lines

    def _header(self, feed: _Feed, reader: Iterator[list[str]]) -> tuple[list[str], int] | None:
        """The header's names and the number of the line after it; None for an empty file."""
        while (first := feed.next_record()) is not None:
            if first.length == 0:
                continue
            where = f"{self.topic!r} line {first.number + 1}"
            if first.length > self.max_bytes:
                msg = f"{where}: CSV header {_too_long(first.length, self.max_bytes)}"
                raise InputError(msg)
            try:
                names = next(reader)
            except (csv.Error, _Unclosed) as e:
                msg = f"{where}: cannot read the CSV header: {e}"
                raise InputError(msg) from e
            if feed.bad_utf8 is not None:
                msg = f"{where}: cannot read the CSV header: {feed.bad_utf8}"
                raise InputError(msg)
            return names, feed.taken[-1].number + 1
        return None

    def _records(self, lines: Iterator[_Line]) -> Iterator[tuple[Record, int]]:
        feed = _Feed(lines, self.max_lines, min(self.max_bytes, csv.field_size_limit()))
        # strict: a closing quote must be followed by a comma or the line's end, which is also
        # how a stray quote that pairs with a later, real one gives itself away
        reader = csv.reader(feed, strict=True)
        found = self._header(feed, reader)
        if found is None:
            return
        header, base = found
        topic = self.topic
        while (first := feed.next_record()) is not None:
            pos = SourcePos(topic, 0, first.number - base)
            if first.length > self.max_bytes:
                why = _too_long(first.length, self.max_bytes)
                yield Record(first.text, pos, error=why), len(first.text)
                continue
            if first.length == 0:
                continue
            try:
                row = next(reader)
            except (csv.Error, _Unclosed) as e:
                why, misread = str(e), True
            else:
                why = feed.bad_utf8
                misread = why is None and len(row) != len(header)
                if misread:
                    why = f"expected {len(header)} columns, got {len(row)}"
            if why is None:
                yield Record({h: _cell(v) for h, v in zip(header, row)}, pos), feed.size
            elif misread and len(feed.taken) > 1:
                # a stray quote, most likely: the dead letter is this line, and the lines the
                # quote swallowed are read again as records of their own
                feed.reread()
                yield Record(first.text, pos, error=why), len(first.text)
            else:
                yield Record(feed.raw(), pos, error=why), feed.size


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

"""File sources under adversarial bytes: every broken record is its own dead letter at its line,
and every good record around it still reaches a decision."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder.connectors import files
from ponder.connectors.files import CsvSource, InputError, JsonlSource
from ponder.connectors.memory import MemorySink
from ponder.inference.reflex import ReflexRule
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.types import SourcePos

CHUNK = files._CHUNK  # the sources' read size, to put a CRLF across two reads of a real file


def pipeline() -> Pipeline:
    """Every event escalates to the reflex tier, so each good record becomes one decision."""
    return Pipeline(
        name="files", key="k", time="ts", actions=("none", "alert"),
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=(Rule("every", lambda e: True),)),
        tiers=(TierSpec("reflex", max_batch=1),), reflex=(ReflexRule("every", "alert", "high"),))


def run(source) -> tuple[list[tuple[str, int]], list[tuple[int, str, str]]]:
    """Decisions as (key, offset) and dead letters as (offset, reason, raw), in offset order."""
    sink = MemorySink()
    asyncio.run(asyncio.wait_for(pipeline().worker(source, sink).run(), 20))
    decided = sorted((d.key, d.source.offset) for d in sink.decisions)
    assert {d.source.topic for d in sink.decisions} <= {source.topic}
    dead = sorted((x.source.offset, x.reason, x.raw) for x in sink.dead_letters)
    assert {x.source for x in sink.dead_letters} == {SourcePos(source.topic, 0, o) for o, _, _ in dead}
    return decided, dead


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def jline(key: str, ts: int = 1) -> bytes:
    return msgspec.json.encode({"k": key, "ts": ts})


def read_all(source) -> list:
    async def read() -> list:
        return [r async for batch in source.batches() for r in batch]

    return asyncio.run(read())


class Trickle(io.RawIOBase):
    """A pipe that hands over at most `step` bytes a read."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__()
        self.data, self.step, self.at = data, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        out = self.data[self.at:self.at + min(len(buf), self.step)]
        buf[:len(out)] = out
        self.at += len(out)
        return len(out)


def msgspec_reason(line: bytes) -> str:
    """What the decoder says of JSON that does not parse: msgspec's own message."""
    with pytest.raises(msgspec.DecodeError) as e:
        msgspec.json.decode(line)
    return str(e.value)


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_adversarial_lines_each_cost_one_dead_letter(tmp_path):
    """Invalid UTF-8, a NUL byte, a line over the limit, CR-only endings and a cut-off last line:
    one dead letter each, at its own line, and every good line decided."""
    nul = b'{"k":"n\x00","ts":1}'
    cut = b'{"k":"t","ts":'
    huge = b'{"k":"h","pad":"' + b"x" * (1 << 20) + b'"}'
    lines = [
        (jline("a"), b"\n"),  # 0
        (b'{"k":"u\xff","ts":1}', b"\n"),  # 1: invalid UTF-8
        (jline("b"), b"\r"),  # 2: CR-only from here (old Mac)
        (nul, b"\r"),  # 3
        (jline("c"), b"\r"),  # 4
        (huge, b"\r"),  # 5: over the 1 MiB limit
        (jline("d"), b"\r"),  # 6
        (b"   ", b"\r"),  # 7: blank: skipped, but counted
        (jline("e"), b"\r\n"),  # 8
        (cut, b""),  # 9: the writer died mid-line
    ]
    path = write(tmp_path, "events.jsonl", b"".join(t + e for t, e in lines))
    decided, dead = run(JsonlSource(path))
    assert decided == [("a", 0), ("b", 2), ("c", 4), ("d", 6), ("e", 8)]
    assert dead == [
        (1, "invalid UTF-8 at byte 7 (0xff): invalid start byte", '{"k":"u\ufffd","ts":1}'),
        (3, msgspec_reason(nul), nul.decode()),
        (5, f"line is {len(huge)} bytes long, over the limit of {1 << 20}", huge[:2000].decode()),
        (9, msgspec_reason(cut), cut.decode()),
    ]


def test_jsonl_line_ends_of_every_kind_count_as_one_line_each(tmp_path):
    """LF, CRLF, lone CR, and a CRLF split across two reads: one line each, so offsets are the
    line numbers an editor shows (and a CR then LF is two line ends, with a blank line between)."""
    first = jline("a")
    pad = b" " * (CHUNK - 1 - len(first))  # JSON allows trailing spaces: the CR is the read's last byte
    data = first + pad + b"\r\n" + jline("b") + b"\r" + jline("c") + b"\n\r" + jline("d") + b"\r\n"
    path = write(tmp_path, "ends.jsonl", data)
    decided, dead = run(JsonlSource(path))
    assert dead == []
    assert decided == [("a", 0), ("b", 1), ("c", 2), ("d", 4)]


def test_jsonl_huge_line_without_newline_is_skipped_in_bounded_memory(tmp_path):
    """A 24 MB line (no newline anywhere) is one dead letter and never held in memory; the line
    before it is still decided."""
    size = 24 << 20
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(jline("a") + b"\n" + b'{"k":"h","v":"')
        for _ in range(size // CHUNK):
            fh.write(b"y" * CHUNK)
    total = path.stat().st_size - len(jline("a")) - 1

    tracemalloc.start()
    try:
        recs = read_all(JsonlSource(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # a 1 MiB line limit plus a read buffer, not the 24 MB line
    assert [(r.source.offset, r.error) for r in recs] == [
        (0, None), (1, f"line is {total} bytes long, over the limit of {1 << 20}")]
    assert recs[1].value == (b'{"k":"h","v":"' + b"y" * 2000)[:2000]


PIECES = [b"{", b"}", b'"', b"a", b" ", b"\r", b"\n", b"\r\n", b"\xff", b"\xef\xbb\xbf", b"\xc3\xa9",
          b"\x00"]


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
       step=st.integers(1, 9), max_bytes=st.integers(1, 12))
def test_jsonl_records_match_a_reference_split_however_the_bytes_arrive(data, step, max_bytes):
    """Whatever the bytes and however the reads cut them (a CRLF or a BOM split between two):
    one record per non-blank line at its line number, over-long lines cut to a prefix, and
    exactly the lines that are not UTF-8 flagged."""
    lines = re.split(rb"\r\n|\r|\n", data.removeprefix(b"\xef\xbb\xbf"))
    if lines[-1] == b"":
        lines.pop()  # the file's last line end ends a line; it does not start one
    expected = []
    for i, line in enumerate(lines):
        if len(line) > max_bytes:
            why = f"line is {len(line)} bytes long, over the limit of {max_bytes}"
            expected.append((i, line[:max_bytes], why))
        elif line.strip():
            try:
                line.decode()
                why = None
            except UnicodeDecodeError as e:
                why = f"invalid UTF-8 at byte {e.start} (0x{line[e.start]:02x}): {e.reason}"
            expected.append((i, line.strip(), why))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", SimpleNamespace(buffer=io.BufferedReader(Trickle(data, step))))
        recs = read_all(JsonlSource("-", max_bytes=max_bytes))
    assert [(r.source.offset, r.value, r.error) for r in recs] == expected


# -- CSV -------------------------------------------------------------------------------------


def test_csv_invalid_utf8_and_oversized_field_are_dead_letters_and_the_rest_is_read(tmp_path):
    big = b"x" * 131_073  # one character over the csv module's field limit
    path = write(tmp_path, "readings.csv", b"k,ts,v\n"
                 b"a,1,1\n"  # 0
                 b"b,2,\xe9t\xe9\n"  # 1: Latin-1, not UTF-8
                 b"c,3,3\n"  # 2
                 b"d,4," + big + b"\n"  # 3
                 b"e,5,5\n")  # 4
    decided, dead = run(CsvSource(path))
    assert decided == [("a", 0), ("c", 2), ("e", 4)]
    assert dead == [
        (1, "invalid UTF-8 at byte 4 (0xe9): invalid continuation byte", "b,2,\ufffdt\ufffd"),
        (3, "field larger than field limit (131072)", ("d,4," + "x" * 131_073)[:2000]),
    ]


def test_csv_stray_quote_costs_only_its_own_line(tmp_path):
    """A quote that never closes is a dead letter at its line once it has run 100 lines (or
    reached the end of the file); the lines it swallowed are read again as rows."""
    rows = [b'a0,0,"oops']  # 0: still open 100 lines later
    rows += [b"a%d,%d,%d" % (i, i, i) for i in range(1, 120)]
    rows += [b'b0,120,"open']  # 120: still open at the end of the file
    rows += [b"b%d,%d,%d" % (i, 120 + i, i) for i in range(1, 3)]
    path = write(tmp_path, "quotes.csv", b"k,ts,v\n" + b"\n".join(rows) + b"\n")
    decided, dead = run(CsvSource(path))
    assert decided == sorted([(f"a{i}", i) for i in range(1, 120)] + [("b1", 121), ("b2", 122)])
    assert dead == [
        (0, "quoted field not closed within 100 lines and 131072 bytes", 'a0,0,"oops'),
        (120, "quoted field not closed before the end of the file", 'b0,120,"open'),
    ]


def test_csv_stray_quote_that_pairs_with_a_later_quote_is_caught(tmp_path):
    """A stray quote would close at the next real quoted field and swallow the rows between; the
    text after that closing quote gives it away, and the swallowed rows are read again."""
    path = write(tmp_path, "pairs.csv", b"k,ts,v\n"
                 b'a,1,"oops\n'  # 0: stray
                 b"b,2,2\n"  # 1
                 b'c,3,"hello, world"\n'  # 2: a real quoted field
                 b"d,4,4\n")  # 3
    decided, dead = run(CsvSource(path))
    assert decided == [("b", 1), ("c", 2), ("d", 3)]
    assert dead == [(0, "',' expected after '\"'", 'a,1,"oops')]


def test_csv_offsets_are_line_numbers_with_cr_endings_and_multiline_fields(tmp_path):
    """An old-Mac file (CR only) whose quoted field spans two lines: the row after it is at line
    3, not record 2; the multi-line value keeps its line break."""
    path = write(tmp_path, "mac.csv", b'k,ts,v\r'
                 b'a,1,"two\rlines"\r'  # 0-1
                 b"b,2,2\r"  # 2
                 b"c,3,3\r")  # 3

    recs = read_all(CsvSource(path))
    assert [(r.source.offset, r.value, r.error) for r in recs] == [
        (0, {"k": "a", "ts": 1, "v": "two\rlines"}, None),
        (2, {"k": "b", "ts": 2, "v": 2}, None),
        (3, {"k": "c", "ts": 3, "v": 3}, None),
    ]


def test_csv_invalid_utf8_inside_a_multiline_field_is_one_dead_letter(tmp_path):
    """The quotes still say where the record ends, so its second line is not read as a row."""
    record = b'a,1,"first\r\nsec\xffond"'  # lines 0-1
    path = write(tmp_path, "notes.csv", b"k,ts,v\r\n" + record + b"\r\nb,2,2\r\n")
    decided, dead = run(CsvSource(path))
    assert decided == [("b", 2)]
    at = record.index(b"\xff")  # counted from the start of the record, across its line break
    assert dead == [(0, f"invalid UTF-8 at byte {at} (0xff): invalid start byte",
                     'a,1,"first\r\nsec\ufffdond"')]


def test_csv_bom_and_blank_lines_are_not_rows(tmp_path):
    """What editors leave behind (a byte-order mark, blank lines, CRLF) costs nothing."""
    path = write(tmp_path, "excel.csv", b"\xef\xbb\xbfk,ts,v\r\n"
                 b"a,1,1\r\n"  # 0
                 b"\r\n"  # 1
                 b"b,2,2\r\n"  # 2
                 b"\r\n\r\n")  # 3, 4
    decided, dead = run(CsvSource(path))
    assert dead == []
    assert decided == [("a", 0), ("b", 2)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"k,ts,\xffv\na,1,1\n", "invalid UTF-8 at byte 5 (0xff): invalid start byte"),
        (b'k,ts,"v\na,1,1\n', "quoted field not closed before the end of the file"),
    ],
    ids=["invalid-utf8", "unclosed-quote"],
)
def test_csv_unreadable_header_refuses_the_file(tmp_path, data, reason):
    path = write(tmp_path, "bad.csv", b"\n" + data)  # the header is on line 2

    with pytest.raises(InputError) as e:
        read_all(CsvSource(path))
    assert str(e.value) == f"'bad.csv' line 2: cannot read the CSV header: {reason}"

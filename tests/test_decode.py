"""Decoder: raw records into Events, or dead letters that say why and where."""

from __future__ import annotations

import math

import msgspec
import pytest

from ponder.connectors.base import Record
from ponder.connectors.files import CsvSource
from ponder.pipelines.iot_monitor import Telemetry
from ponder.runtime.decode import Decoder
from ponder.types import DeadLetter, Event, SourcePos

POS = SourcePos("events", 2, 41)
JAN1 = 1704067200.0  # 2024-01-01T00:00:00Z


def rec(value, **kw) -> Record:
    if isinstance(value, str):
        value = value.encode()
    return Record(value, POS, **kw)


def dec(**kw) -> Decoder:
    return Decoder("k", "ts", **kw)


# -- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1700000000", 1700000000.0),  # epoch seconds, int
        ("1700000000.25", 1700000000.25),  # epoch seconds, float
        ("0", 0.0),
        ("-5", -5.0),
        ("100000000000", 1e11),  # the threshold itself is still seconds (year 5138)
        ("100000000001", 100000000.001),  # just above: milliseconds
        ("1700000000123", 1700000000.123),  # epoch ms, int
        ("1700000000123.5", 1700000000.1235),  # epoch ms, float
        ('"2024-01-01T00:00:00Z"', JAN1),
        ('"2024-01-01T00:00:00.250Z"', JAN1 + 0.25),
        ('"2024-01-01T02:00:00+02:00"', JAN1),
        ('"2023-12-31T19:00:00-05:00"', JAN1),
        ('"2024-01-01T00:00:00"', JAN1),  # naive: taken as UTC
        ('"2024-01-01 00:00:00"', JAN1),
        ('"2024-01-01"', JAN1),
    ],
)
def test_time_forms(raw, expected):
    ev = dec()(rec(f'{{"k":"a","ts":{raw},"v":1}}'))
    assert type(ev) is Event
    assert ev.ts == pytest.approx(expected, abs=1e-6)
    assert ev == Event("a", ev.ts, {"v": 1}, POS, {})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("true", "time field 'ts': expected a number or ISO-8601 string, got True"),
        ("false", "time field 'ts': expected a number or ISO-8601 string, got False"),
        ("[1]", "time field 'ts': expected a number or ISO-8601 string, got list"),
        ('{"s":1}', "time field 'ts': expected a number or ISO-8601 string, got dict"),
        ('"yesterday"', "time field 'ts': Invalid isoformat string: 'yesterday'"),
        ('""', "time field 'ts': Invalid isoformat string: ''"),
        ("null", "time field 'ts' missing"),
        ("1e400", "Number out of range - at `$[...]`"),  # msgspec rejects it while parsing
    ],
)
def test_bad_time_is_a_dead_letter(raw, reason):
    value = f'{{"k":"a","ts":{raw}}}'
    out = dec()(rec(value))
    assert out == DeadLetter(reason, POS, value, "decode")


def test_missing_time_is_a_dead_letter():
    assert dec()(rec('{"k":"a","v":1}')) == DeadLetter("time field 'ts' missing", POS, '{"k":"a","v":1}')


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_time_is_a_dead_letter(bad):
    # parsed records (CSV rows) can carry non-finite floats: "nan", "inf" cells
    out = dec()(Record({"k": "a", "ts": bad}, POS))
    assert type(out) is DeadLetter
    assert out.reason == f"time field 'ts': time {bad!r} is not finite"
    assert out.source == POS
    assert out.stage == "decode"


def test_non_finite_epoch_ms_is_a_dead_letter():
    # inf is > 1e11, so it goes through the ms conversion first and must still be rejected
    out = dec()(Record({"k": "a", "ts": 1e308 * 10}, POS))
    assert type(out) is DeadLetter
    assert out.reason == "time field 'ts': time inf is not finite"


def test_integer_time_too_large_for_a_float_is_a_dead_letter():
    """JSON allows arbitrarily long integers; the decoder must dead-letter one that does not
    fit a float instead of raising (an exception here stops the whole worker)."""
    value = '{"k":"a","ts":' + "9" * 400 + "}"
    out = dec()(rec(value))
    assert out == DeadLetter("time field 'ts': int too large to convert to float", POS, value)


def test_time_none_stamps_ingestion_time():
    d = Decoder("k", None, now=lambda: 1234.5)
    assert d(rec('{"k":"a","ts":"not even read"}')) == Event("a", 1234.5, {"ts": "not even read"}, POS)


def test_time_field_name_is_configurable():
    d = Decoder("device", "when")
    assert d(rec('{"device":"d1","when":"2024-01-01T00:00:00Z","ts":3}')) == \
        Event("d1", JAN1, {"ts": 3}, POS)
    assert d(rec('{"device":"d1","ts":3}')) == \
        DeadLetter("time field 'when' missing", POS, '{"device":"d1","ts":3}')


# -- key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "key"), [('"dev-1"', "dev-1"), ("7", "7"), ("1.5", "1.5"), ('"0"', "0")])
def test_key_forms(raw, key):
    ev = dec()(rec(f'{{"k":{raw},"ts":5,"v":2}}'))
    assert ev == Event(key, 5.0, {"v": 2}, POS)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "key field 'k' missing"),
        ("null", "key field 'k' missing"),
        ('""', "key field 'k' not a usable key: ''"),
        ("[1]", "key field 'k' not a usable key: [1]"),
        ('{"a":1}', "key field 'k' not a usable key: {'a': 1}"),
        ("true", "key field 'k' not a usable key: True"),
    ],
)
def test_bad_key_is_a_dead_letter(raw, reason):
    value = '{"ts":5}' if raw is None else f'{{"k":{raw},"ts":5}}'
    assert dec()(rec(value)) == DeadLetter(reason, POS, value, "decode")


# -- not an object -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe\x00junk", "JSON is malformed: invalid character (byte 0)"),
        (b"", "Input data was truncated"),
        (b'{"k":"a",', "Input data was truncated"),
        (b"[1, 2, 3]", "expected a JSON object, got list"),
        (b"42", "expected a JSON object, got int"),
        (b'"text"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
)
def test_not_an_object_is_a_dead_letter(value, reason):
    out = dec()(rec(value))
    assert out == DeadLetter(reason, POS, value.decode("utf-8", errors="replace"), "decode")


def test_raw_is_truncated_to_2000_chars():
    value = b"x" * 5000
    out = dec()(rec(value))
    assert type(out) is DeadLetter
    assert out.raw == "x" * 2000


# -- out-of-band key and time, headers --------------------------------------------------------------


def test_out_of_band_key_and_time():
    out = dec()(rec('{"v":1.5}', key="dev-9", ts=12.5))
    assert out == Event("dev-9", 12.5, {"v": 1.5}, POS)


def test_payload_key_and_time_win_over_out_of_band_ones():
    # and are taken out of the payload, so a key's context is the same however events arrive
    out = dec()(rec('{"k":"in-payload","ts":"2024-01-01T00:00:00Z","v":1}', key="oob", ts=5.0))
    assert out == Event("in-payload", JAN1, {"v": 1}, POS)


def test_out_of_band_key_with_time_from_payload():
    out = dec()(rec('{"ts":"2024-01-01T00:00:00Z","v":1}', key="oob"))
    assert out == Event("oob", JAN1, {"v": 1}, POS)


def test_out_of_band_time_with_key_from_payload():
    assert dec()(rec('{"k":"a","v":1}', ts=99.0)) == Event("a", 99.0, {"v": 1}, POS)


def test_null_payload_key_falls_back_to_out_of_band_key():
    assert dec()(rec('{"k":null,"ts":1}', key="oob")) == Event("oob", 1.0, {}, POS)


def test_bad_payload_time_is_not_rescued_by_out_of_band_time():
    value = '{"k":"a","ts":"garbage"}'
    assert dec()(rec(value, ts=99.0)) == \
        DeadLetter("time field 'ts': Invalid isoformat string: 'garbage'", POS, value)


def test_time_none_prefers_out_of_band_time_over_the_clock():
    d = Decoder("k", None, now=lambda: 1234.5)
    assert d(rec('{"k":"a"}', ts=7.0)) == Event("a", 7.0, {}, POS)


def test_out_of_band_key_with_a_parsed_record():
    out = dec()(Record({"value": 3.0}, POS, key="nab/x.csv", ts=7.0))
    assert out == Event("nab/x.csv", 7.0, {"value": 3.0}, POS)


def test_headers_are_carried():
    out = dec()(rec('{"k":"a","ts":1}', headers={"tenant": "acme"}))
    assert out == Event("a", 1.0, {}, POS, {"tenant": "acme"})


def test_parsed_record_is_not_mutated():
    value = {"k": "a", "ts": 3, "v": 1}
    out = dec()(Record(value, POS))
    assert out == Event("a", 3.0, {"v": 1}, POS)
    assert value == {"k": "a", "ts": 3, "v": 1}


# -- schema ------------------------------------------------------------------------------------------


def tele() -> Decoder:
    return Decoder("device_id", "ts", Telemetry)


DEFAULTS = {"site": "", "temperature": None, "vibration": None, "pressure": None, "humidity": None,
            "status": "ok"}


def test_schema_valid_record_fills_defaults_and_drops_unknown_fields():
    out = tele()(rec('{"device_id":"d1","ts":1700000000000,"temperature":21,"firmware":"2.1"}'))
    assert out == Event("d1", 1700000000.0, {**DEFAULTS, "temperature": 21.0}, POS)
    assert type(out.payload["temperature"]) is float


def test_schema_applies_to_parsed_records():
    out = tele()(Record({"device_id": "d1", "ts": 5, "pressure": 101, "status": "warn"}, POS))
    assert out == Event("d1", 5.0, {**DEFAULTS, "pressure": 101.0, "status": "warn"}, POS)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('{"device_id":"d1","ts":5,"temperature":"hot"}', "Expected `float | null`, got `str` - at `$.temperature`"),
        ('{"device_id":"d1","ts":"yesterday"}', "Expected `float`, got `str` - at `$.ts`"),
        ('{"device_id":"d1"}', "Object missing required field `ts`"),
        ('{"ts":5}', "Object missing required field `device_id`"),
        ('{"device_id":7,"ts":5}', "Expected `str`, got `int` - at `$.device_id`"),
        ('{"device_id":"","ts":5}', "key field 'device_id' not a usable key: ''"),
        ("[1, 2]", "Expected `object`, got `array`"),
        ("%not json", "JSON is malformed: invalid character (byte 0)"),
    ],
)
def test_schema_violations_are_dead_letters(value, reason):
    assert tele()(rec(value)) == DeadLetter(reason, POS, value, "decode")


def test_schema_violation_in_a_parsed_record():
    value = {"device_id": "d1", "ts": 5, "humidity": "wet"}
    out = tele()(Record(value, POS))
    assert out == DeadLetter("Expected `float | null`, got `str` - at `$.humidity`", POS,
                             '{"device_id":"d1","ts":5,"humidity":"wet"}')


# -- rows the connector flagged as broken (CSV) -------------------------------------------------------------------


def test_csv_error_is_the_reason():
    out = dec()(rec(b"a,1", error="expected 3 columns, got 2"))
    assert out == DeadLetter("expected 3 columns, got 2", POS, "a,1", "decode")


def test_csv_error_wins_even_if_the_row_parses_as_json():
    """A row the connector already flagged as broken must never become an Event, even when its
    text happens to be a JSON object with the key (and time) fields."""
    d = Decoder("k", None, now=lambda: 1.0)
    out = d(rec(b'{"k":"a"}', error="expected 2 columns, got 1"))
    assert out == DeadLetter("expected 2 columns, got 1", POS, '{"k":"a"}', "decode")


async def test_csv_source_rows_decode_with_line_numbers(tmp_path):
    path = tmp_path / "readings.csv"
    path.write_text("k,ts,v\n"
                    "a,2024-01-01T00:00:00Z,1.5\n"
                    "b,10\n"  # too few columns
                    "c,20,3,extra\n"  # too many
                    ",30,4\n"  # empty key cell: null
                    "d,not-a-time,5\n"
                    "e,40,\n")  # empty value cell: null
    src = CsvSource(path)
    recs = [r async for batch in src.batches() for r in batch]
    await src.stop()
    out = [dec()(r) for r in recs]
    t = "readings.csv"
    assert out == [
        Event("a", JAN1, {"v": 1.5}, SourcePos(t, 0, 0)),
        DeadLetter("expected 3 columns, got 2", SourcePos(t, 0, 1), "b,10"),
        DeadLetter("expected 3 columns, got 4", SourcePos(t, 0, 2), "c,20,3,extra"),
        DeadLetter("key field 'k' missing", SourcePos(t, 0, 3), '{"k":null,"ts":30,"v":4}'),
        DeadLetter("time field 'ts': Invalid isoformat string: 'not-a-time'", SourcePos(t, 0, 4),
                   '{"k":"d","ts":"not-a-time","v":5}'),
        Event("e", 40.0, {"v": None}, SourcePos(t, 0, 5)),
    ]


def test_decoded_events_roundtrip_through_msgpack():
    ev = dec()(rec('{"k":"a","ts":1,"v":[1,2],"s":"x"}', headers={"h": "1"}))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ev), type=Event) == ev

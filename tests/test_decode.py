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


NOW = 1800000000.0  # 2027-01-15T08:00:00Z: the decoders' clock, so time bounds are exact


def dec(**kw) -> Decoder:
    return Decoder("k", "ts", **{"now": lambda: NOW, **kw})


# -- time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1700000000", 1700000000.0),  # epoch seconds, int
        ("1700000000.25", 1700000000.25),  # epoch seconds, float
        ("0", 0.0),
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
    ev = dec(max_skew_s=None)(rec(f'{{"k":"a","ts":{raw},"v":1}}'))
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


# -- time bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("-5", "time field 'ts': time -5 is before 1970-01-01 (negative epoch time)"),
        ("-1e15", "time field 'ts': time -1000000000000000.0 is before 1970-01-01 (negative epoch time)"),
        ('"1969-12-31T23:59:59Z"',
         "time field 'ts': time '1969-12-31T23:59:59Z' is before 1970-01-01 (negative epoch time)"),
        # 1e14 reads as epoch ms: 1e11 s, the year 5138
        ("1e14", f"time field 'ts': time 100000000000000.0 is {1e11 - NOW:.0f}s ahead of the clock, "
                 "more than max_skew_s=86400"),
        ("1e17", "time field 'ts': time 1e+17 is past the year 9999"),
        ("1e300", "time field 'ts': time 1e+300 is past the year 9999"),
        (str(NOW + 86401), "time field 'ts': time 1800086401.0 is 86401s ahead of the clock, "
                           "more than max_skew_s=86400"),
        ('"9999-12-31T23:59:59Z"', f"time field 'ts': time '9999-12-31T23:59:59Z' is "
                                   f"{253402300799 - NOW:.0f}s ahead of the clock, more than max_skew_s=86400"),
    ],
)
def test_absurd_times_are_dead_letters(raw, reason):
    value = f'{{"k":"a","ts":{raw},"v":1}}'
    assert dec()(rec(value)) == DeadLetter(reason, POS, value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0.0),
        ('"2014-04-01 00:00:00"', 1396310400.0),  # NAB's data is years old: the past is fine
        (str(NOW + 86400), NOW + 86400),  # exactly max_skew_s ahead
        (str(int((NOW + 3600) * 1000)), NOW + 3600),  # epoch ms, an hour ahead
    ],
)
def test_times_within_bounds_are_events(raw, expected):
    assert dec()(rec(f'{{"k":"a","ts":{raw}}}')) == Event("a", expected, {}, POS)


def test_max_skew_s_is_configurable():
    tight = dec(max_skew_s=0.0)
    assert tight(rec(f'{{"k":"a","ts":{NOW}}}')) == Event("a", NOW, {}, POS)
    assert tight(rec(f'{{"k":"a","ts":{NOW + 1}}}')).reason == \
        "time field 'ts': time 1800000001.0 is 1s ahead of the clock, more than max_skew_s=0"
    # None keeps only the fixed bounds: from 1970 up to the year 10000
    loose = dec(max_skew_s=None)
    assert loose(rec('{"k":"a","ts":"9999-12-31T23:59:59Z"}')) == Event("a", 253402300799.0, {}, POS)
    assert loose(rec('{"k":"a","ts":1e300}')).reason == "time field 'ts': time 1e+300 is past the year 9999"
    assert loose(rec('{"k":"a","ts":-1}')).reason == \
        "time field 'ts': time -1 is before 1970-01-01 (negative epoch time)"


def test_skew_is_measured_against_the_injected_clock_at_decode_time():
    clock = [NOW]
    d = dec(now=lambda: clock[0], max_skew_s=10.0)
    value = f'{{"k":"a","ts":{NOW + 60}}}'
    assert type(d(rec(value))) is DeadLetter
    clock[0] = NOW + 50
    assert d(rec(value)) == Event("a", NOW + 60, {}, POS)


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_max_skew_s_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError) as e:
        Decoder("k", max_skew_s=bad)
    assert str(e.value) == f"Decoder: max_skew_s must be None or a finite number >= 0, got {bad!r}"


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        (-1.0, "record time: time -1.0 is before 1970-01-01 (negative epoch time)"),
        (NOW + 86400.5, "record time: time 1800086400.5 is 86400s ahead of the clock, more than max_skew_s=86400"),
        (math.nan, "record time: time nan is not finite"),
    ],
)
def test_out_of_band_time_is_bounded_too(ts, reason):
    assert dec()(rec('{"k":"a"}', ts=ts)) == DeadLetter(reason, POS, '{"k":"a"}')


def test_ingestion_time_is_not_bounded():
    # the decoder's own clock is the reference, never an absurd producer's
    d = Decoder("k", None, now=lambda: NOW)
    assert d(rec('{"k":"a"}')) == Event("a", NOW, {}, POS)


# -- nesting, size and numbers ------------------------------------------------------------------------


def deep_list(n: int) -> str:
    return "[" * n + "]" * n


def deep_obj(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


TOO_DEEP = "nested deeper than 32 levels"


@pytest.mark.parametrize(
    "value",
    [
        deep_list(1000),
        deep_obj(1000),
        '{"k":"a","ts":1,"v":' + deep_list(1000) + "}",
        '{"k":"a","ts":1,"v":' + deep_obj(1000) + "}",
        '{"k":"a","ts":1,"v":' + deep_list(200_000) + "}",
        '{"k":"a","ts":1,"v":' + deep_list(32) + "}",  # 33 levels with the record's own object
        '{"k":"a","ts":1,"v":' + deep_obj(32) + "}",
    ],
)
def test_too_deep_is_a_dead_letter(value):
    """Deep nesting used to raise RecursionError out of the decoder, ending the run."""
    out = dec()(rec(value))
    assert out == DeadLetter(TOO_DEEP, POS, value[:2000])


def test_too_deep_with_a_schema_even_in_an_unknown_field():
    value = '{"device_id":"d1","ts":5,"firmware":' + deep_obj(1000) + "}"
    assert tele()(rec(value)) == DeadLetter(TOO_DEEP, POS, value[:2000])


def test_nesting_up_to_the_limit_decodes():
    value = '{"k":"a","ts":1,"v":' + deep_list(31) + ',"w":' + deep_obj(31) + "}"
    out = dec()(rec(value))
    assert out == Event("a", 1.0, {"v": nested(31), "w": msgspec.json.decode(deep_obj(31))}, POS)


def test_brackets_inside_strings_do_not_nest():
    value = '{"k":"a","ts":1,"s":"' + "[{" * 500 + '\\"' + "[" * 100 + '"}'
    out = dec()(rec(value))
    assert out == Event("a", 1.0, {"s": "[{" * 500 + '"' + "[" * 100}, POS)


def test_many_shallow_containers_decode():
    items = [{"x": i, "y": [i, i]} for i in range(2000)]
    value = msgspec.json.encode({"k": "a", "ts": 1, "items": items})
    assert dec()(rec(value)) == Event("a", 1.0, {"items": items}, POS)


def nested(n: int) -> list:
    v: list = []
    for _ in range(n - 1):
        v = [v]
    return v


def test_parsed_record_too_deep_or_cyclic_is_a_dead_letter():
    out = dec()(Record({"k": "a", "ts": 1, "v": nested(32)}, POS))
    assert (type(out), out.reason) == (DeadLetter, TOO_DEEP)
    # deeper than JSON encoding can recurse: the same as a cycle
    out = dec()(Record({"k": "a", "ts": 1, "v": nested(5000)}, POS))
    assert (type(out), out.reason) == (DeadLetter, TOO_DEEP + " (or cyclic)")
    assert dec()(Record({"k": "a", "ts": 1, "v": nested(31)}, POS)) == \
        Event("a", 1.0, {"v": nested(31)}, POS)
    loop: list = []
    loop.append(loop)
    out = dec()(Record({"k": "a", "ts": 1, "v": loop}, POS))
    assert out == DeadLetter(TOO_DEEP + " (or cyclic)", POS, "{'k': 'a', 'ts': 1, 'v': [[...]]}")


def test_parsed_record_values_are_normalised_through_json():
    # tuples, int names and nested NaN come out as JSON would have them
    out = dec()(Record({"k": "a", "ts": 1, "v": (1, 2.5), 3: {"n": math.nan}}, POS))
    assert out == Event("a", 1.0, {"v": [1, 2.5], "3": {"n": None}}, POS)


def test_parsed_record_with_unencodable_values_is_a_dead_letter():
    out = dec()(Record({"k": "a", "ts": 1, "v": object()}, POS))
    assert type(out) is DeadLetter
    assert out.reason == "not JSON: Encoding objects of type object is unsupported"
    out = dec()(Record({"k": "a", "ts": 1, "s": "bad \ud800 text"}, POS))
    assert out.reason == "'utf-8' codec can't encode character '\\ud800' in position 4: surrogates not allowed"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_payload_values_become_missing(bad):
    # only parsed records (CSV cells "nan", "inf") can carry them; JSON cannot
    assert dec()(Record({"k": "a", "ts": 1, "v": bad, "w": 2.5}, POS)) == \
        Event("a", 1.0, {"v": None, "w": 2.5}, POS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (str(2**63 - 1), 2**63 - 1),
        (str(-(2**63)), -(2**63)),
        (str(2**63), float(2**63)),  # past what the state store (msgpack) holds: a float
        (str(-(2**63) - 1), -float(2**63)),
        ("9" * 300, float("9" * 300)),
    ],
)
def test_large_integers_become_floats(raw, expected):
    out = dec()(rec(f'{{"k":"a","ts":1,"v":{raw}}}'))
    assert out == Event("a", 1.0, {"v": expected}, POS)
    assert type(out.payload["v"]) is type(expected)


def test_integer_beyond_the_float_range_is_a_dead_letter():
    value = '{"k":"a","ts":1,"v":' + "9" * 400 + "}"
    assert dec()(rec(value)) == \
        DeadLetter("field 'v': integer beyond the float range (±1.8e+308)", POS, value)
    # the same from a parsed record, and nested integers are left as they are
    assert dec()(Record({"k": "a", "ts": 1, "v": -(10**400)}, POS)).reason == \
        "field 'v': integer beyond the float range (±1.8e+308)"
    assert dec()(rec('{"k":"a","ts":1,"v":[' + "9" * 400 + "]}")) == \
        Event("a", 1.0, {"v": [int("9" * 400)]}, POS)


def test_long_key_is_a_dead_letter():
    assert dec()(rec('{"k":"' + "x" * 1024 + '","ts":1}')) == Event("x" * 1024, 1.0, {}, POS)
    value = '{"k":"' + "x" * 1025 + '","ts":1}'
    assert dec()(rec(value)) == \
        DeadLetter("key field 'k' longer than 1024 characters: " + repr("x" * 40) + "…", POS, value[:2000])


class Exploding(msgspec.Struct):
    k: str
    ts: float

    def __post_init__(self) -> None:
        raise RuntimeError("boom")


def test_any_exception_while_decoding_is_a_dead_letter_naming_its_type_and_position():
    value = '{"k":"a","ts":1}'
    assert Decoder("k", "ts", Exploding)(rec(value)) == \
        DeadLetter("RuntimeError while decoding events[2]@41: boom", POS, value)


def test_out_of_band_time_is_seconds_never_rescaled():
    # the ms heuristic is for payload numbers only: a connector's time is seconds already
    out = dec(max_skew_s=None)(rec('{"k":"a"}', ts=2e11))
    assert out == Event("a", 2e11, {}, POS)

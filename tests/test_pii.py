"""PII and secrets in string values: what each detector replaces, exactly; what it leaves alone
(ordinary telemetry, values failing their checksum); stable, bounded per-key placeholders; the
walk over nested values and its fast path; and generated labelled texts where every planted
value of a checksum- or format-defined kind must be found (recall 1.0).
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import msgspec
import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

from ponder.operators import pii
from ponder.operators.pii import (
    ALL, CARD, EMAIL, GPS, IBAN, IP, MAX_DEPTH, PHONE, SECRET, SSN, Placeholders, find, scrub,
    scrub_value,
)

KEY = b"test-placeholder-key"
JWT = ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
       ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nq3Jx+9f=\n-----END RSA PRIVATE KEY-----"


def _scrub(text: str, ph: Placeholders | None = None, **kw) -> tuple[str, dict[str, int]]:
    return scrub(text, Placeholders() if ph is None else ph, KEY, **kw)


# -- each kind, exact output -------------------------------------------------------------------

EXAMPLES = [
    ("mail Bob.Smith+ops@mail.example.co.uk now", "mail <EMAIL_1> now", {EMAIL: 1}),
    ("call +1 415-555-0132 or (415) 555-0132", "call <PHONE_1> or <PHONE_1>", {PHONE: 2}),
    ("uk office +44 20 7946 0958.", "uk office <PHONE_1>.", {PHONE: 1}),
    ("from 192.168.1.100:8080 via 10.0.0.1", "from <IP_1>:8080 via <IP_2>", {IP: 2}),
    ("v6 2001:db8::8a2e:370:7334 = 2001:0db8:0000:0000:0000:8a2e:0370:7334, [fe80::1]:443",
     "v6 <IP_1> = <IP_1>, [<IP_2>]:443", {IP: 3}),
    ("card 4111 1111 1111 1111 / 4111-1111-1111-1111 / 4111111111111111",
     "card <CARD_1> / <CARD_1> / <CARD_1>", {CARD: 3}),
    ("amex 3782 822463 10005, mc 5555555555554444.", "amex <CARD_1>, mc <CARD_2>.", {CARD: 2}),
    ("iban DE89 3704 0044 0532 0130 00 EUR, GB82WEST12345698765432",
     "iban <IBAN_1> EUR, <IBAN_2>", {IBAN: 2}),
    ("ssn 536-90-4399, SSN: 536904399", "ssn <SSN_1>, SSN: <SSN_1>", {SSN: 2}),
    ("truck at 40.71280, -74.00600 then 51.5074,-0.1278", "truck at <GPS_1> then <GPS_2>", {GPS: 2}),
    ("fix 40.71280° N, 74.00600° W. = 40.7128,-74.0060", "fix <GPS_1>. = <GPS_1>", {GPS: 2}),
    ("route 10.1.2.0/24 via +1 415-555-0132 10.0.0.1, tel:+14155550132",
     "route <IP_1>/24 via <PHONE_1> <IP_2>, tel:<PHONE_1>", {IP: 2, PHONE: 2}),
    ("aws AKIAIOSFODNN7EXAMPLE gh ghp_" + "a1B2" * 9, "aws <SECRET_1> gh <SECRET_2>", {SECRET: 2}),
    ("slack xoxb-123456789012-abcdefABCDEF and sk-proj-abcDEF1234567890abcdefXYZ",
     "slack <SECRET_1> and <SECRET_2>", {SECRET: 2}),
    ("google AIzaSyA1b2C3d4A1b2C3d4A1b2C3d4A1b2C3d4x", "google <SECRET_1>", {SECRET: 1}),
    (f"jwt {JWT} ok", "jwt <SECRET_1> ok", {SECRET: 1}),
    ('password=hunter2 user=bob {"api_key": "abc123xyz"}',
     'password=<SECRET_1> user=bob {"api_key": "<SECRET_2>"}', {SECRET: 2}),
    ("Authorization: Bearer abcdef123456.xyz", "Authorization: Bearer <SECRET_1>", {SECRET: 1}),
    ("dsn postgres://bob:s3cretpw@db.internal:5432/app",
     "dsn postgres://bob:<SECRET_1>@db.internal:5432/app", {SECRET: 1}),
    (f"key {PEM} end", "key <SECRET_1> end", {SECRET: 1}),
    ("blob wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end", "blob <SECRET_1> end", {SECRET: 1}),
]


@pytest.mark.parametrize(("text", "expected", "counts"), EXAMPLES)
def test_each_kind_is_replaced_exactly(text: str, expected: str, counts: dict[str, int]) -> None:
    assert _scrub(text) == (expected, counts)


def test_overlaps_resolve_to_the_longest_most_specific_span() -> None:
    # a card's digits hold phone-like runs; an IBAN holds card-like ones; an SSN is 3-2-4 digits
    text = "4111 1111 1111 1111 DE89370400440532013000 536-90-4399 +1 415-555-0132"
    assert [(s.kind, text[s.start:s.end]) for s in find(text)] == [
        (CARD, "4111 1111 1111 1111"), (IBAN, "DE89370400440532013000"),
        (SSN, "536-90-4399"), (PHONE, "+1 415-555-0132")]
    # the value of `password=` is an address too: equal spans, the SECRET ranks first
    assert _scrub("password=bob@example.com") == ("password=<SECRET_1>", {SECRET: 1})


def test_types_limits_what_is_replaced() -> None:
    text = "bob@example.com +1 415-555-0132 10.0.0.1"
    assert _scrub(text, types=frozenset({EMAIL})) == ("<EMAIL_1> +1 415-555-0132 10.0.0.1", {EMAIL: 1})
    assert _scrub(text, types={IP, PHONE}) == ("bob@example.com <PHONE_1> <IP_1>", {PHONE: 1, IP: 1})


def test_the_default_region_reads_numbers_without_country_code() -> None:
    assert _scrub("ruf 030 123456 an") == ("ruf 030 123456 an", {})
    assert _scrub("ruf 030 123456 an", region="DE") == ("ruf <PHONE_1> an", {PHONE: 1})


# -- what stays ------------------------------------------------------------------------------------

TELEMETRY = [
    "2024-06-10T12:30:45Z sensor pump-0042 reading 21.5",
    "2024-06-10 12:30:45.123 INFO started v2.14.1 build 10.0.19041.1",
    "version 1.2.3.4-beta on gw-17 port 8443, firmware 3.0.12",
    "request 123e4567-e89b-12d3-a456-426614174000 done in 12.5 ms",
    "sha256 9f86d081884c7d659a2fea0c55ad015a9c4f08a5fe2f4d1a0e0e6f2b9b3c6a1e",
    "commit 3f2a9c1e5b7d8f0a1c3e5b7d9f1a3c5e7b9d1f3a",
    "ts=1718035200 ts_ms=1718035200123 elapsed 00:01:23.456 at 12:30:45",
    "order id 2125550123, order #5551234567, ORD-2024-000123, seq=4155550132",
    "MAC 00:1A:2B:3C:4D:5E, node-7f3a2b1c on rack 12",
    "latency_ms=12.5 p99=45.25 count=1234567 ratio 3.14159265",
    "probabilities 0.1234, 0.8766 and readings 21.5 22.7 23.1 24.8",
    "HandleIncomingConnectionRequest2Async failed; Pump_Station_07_Flow_Rate_Sensor_B ok",
    "max_tokens: 512, the password policy requires 12 chars",
    "valve opened; pressure_kpa nominal; temp_c 21.53",
    "",
]


@pytest.mark.parametrize("text", TELEMETRY)
def test_ordinary_telemetry_is_left_alone(text: str) -> None:
    out, counts = _scrub(text)
    assert counts == {}
    assert out is text


@pytest.mark.parametrize("text", [
    "order 4111111111111112 shipped",  # 16 digits, Luhn fails
    "card 4111 1111 1111 1112",
    "id 1111111111111117",  # Luhn-valid, but 1 is no payment card's first digit
    "iban DE88 3704 0044 0532 0130 00",  # mod-97 fails
    "iban XX89 3704 0044 0532 0130 00",  # no such country
    "ssn 000-12-3456 666-12-3456 912-34-5678 123-00-4567 123-45-0000 078-05-1120",
    "ip 256.1.1.1 and 192.168.01.1 and 1:2:3:4:5:6:7:8:9",
    "pos 95.12345, 10.12345 and 45.12345, 190.12345",  # latitude, then longitude out of range
    "pos 45.123, 10.123",  # too few decimals to be a location
    "phone 555-0132, +1 123-456-7890",  # too short; area code 123 is not assigned
    "aws AKIAIOSFODNN7EXAMPL and ghp_short",  # one character short, and far too short
])
def test_invalid_values_are_not_replaced(text: str) -> None:
    assert _scrub(text) == (text, {})


# -- placeholders --------------------------------------------------------------------------------


def test_placeholders_are_stable_across_calls_and_formats() -> None:
    ph = Placeholders()
    assert _scrub("from alice@example.com", ph) == ("from <EMAIL_1>", {EMAIL: 1})
    assert _scrub("to bob@example.com", ph) == ("to <EMAIL_2>", {EMAIL: 1})
    assert _scrub("from ALICE@Example.COM again", ph) == ("from <EMAIL_1> again", {EMAIL: 1})
    assert _scrub("sms 415.555.0132", ph) == ("sms <PHONE_1>", {PHONE: 1})
    assert _scrub("call +14155550132", ph) == ("call <PHONE_1>", {PHONE: 1})
    assert ph.issued == {EMAIL: 2, PHONE: 1}


def test_each_key_numbers_its_own_values() -> None:
    a, b = Placeholders(), Placeholders()
    assert _scrub("x@example.com y@example.com", a)[0] == "<EMAIL_1> <EMAIL_2>"
    assert _scrub("y@example.com", b)[0] == "<EMAIL_1>"
    assert _scrub("y@example.com", a)[0] == "<EMAIL_2>"


def test_placeholders_hold_keyed_digests_never_values() -> None:
    a, b = Placeholders(), Placeholders()
    scrub("bob@example.com 536-90-4399", a, b"key-one")
    scrub("bob@example.com 536-90-4399", b, b"key-two")
    wire = msgspec.msgpack.encode(a)
    for value in (b"bob@example.com", b"536904399", b"536-90-4399"):
        assert value not in wire
    assert len(a.numbers) == 2
    assert all(re.fullmatch(r"(EMAIL|SSN):[0-9a-f]{16}", slot) for slot in a.numbers)
    # another key gives other digests: nobody holding one key's state can match another's
    assert set(a.numbers).isdisjoint(b.numbers)
    assert list(a.numbers.values()) == list(b.numbers.values()) == [1, 1]


def test_placeholders_are_bounded_and_never_reuse_a_number() -> None:
    ph = Placeholders(limit=3)
    for name in ("a", "b", "c"):
        scrub(f"{name}@example.com", ph, KEY)
    assert _scrub("a@example.com", ph)[0] == "<EMAIL_1>"  # a is now the most recently seen
    assert _scrub("d@example.com", ph)[0] == "<EMAIL_4>"  # b, least recently seen, retired
    assert len(ph.numbers) == 3
    assert _scrub("b@example.com", ph)[0] == "<EMAIL_5>"  # back, with a new number (c retired)
    assert _scrub("a@example.com d@example.com", ph)[0] == "<EMAIL_1> <EMAIL_4>"
    assert sorted(ph.numbers.values()) == [1, 4, 5]
    assert ph.issued == {EMAIL: 5}


def test_placeholders_survive_the_state_codec_in_order() -> None:
    ph = Placeholders()
    scrub("c@example.com a@example.com 10.0.0.1 c@example.com", ph, KEY)
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(ph), type=Placeholders)
    assert again == ph
    assert list(again.numbers.values()) == [2, 1, 1]  # a, 10.0.0.1, then c (seen last)
    assert msgspec.json.decode(msgspec.json.encode(ph), type=Placeholders) == ph
    with pytest.raises(ValueError, match="Placeholders.limit must be at least 1, got 0"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"limit": 0}), type=Placeholders)


# -- nested values ---------------------------------------------------------------------------------


def test_scrub_value_walks_keys_values_lists_and_tuples() -> None:
    ph, counts = Placeholders(), {}
    shared = {"unit": "kPa", "v": [1.5, 2.5]}
    event = {
        "temp": 21.5, "ok": True, "n": None, "unit": shared,
        "note": "paged bob@example.com",
        "bob@example.com": 3,
        "hops": ["10.0.0.1", 4, ("10.0.0.2", "lan")],
        "db_password": "hunter2",
        "secret_santa": "",
    }
    out = scrub_value(event, ph, KEY, counts=counts)
    assert out == {
        "temp": 21.5, "ok": True, "n": None, "unit": {"unit": "kPa", "v": [1.5, 2.5]},
        "note": "paged <EMAIL_1>",
        "<EMAIL_1>": 3,
        "hops": ["<IP_1>", 4, ("<IP_2>", "lan")],
        "db_password": "<SECRET_1>",
        "secret_santa": "",
    }
    assert counts == {EMAIL: 2, IP: 2, SECRET: 1}
    assert out["unit"] is shared  # unchanged containers are shared, not copied
    assert event["note"] == "paged bob@example.com"  # the input is never changed


def test_scrub_value_returns_the_same_object_when_nothing_changes() -> None:
    ph = Placeholders()
    floats = {"temp": 21.5, "pressure_kpa": 101.3, "rpm": 1200, "ok": True, "err": None}
    mixed = {"status": "running", "device": "pump-0042", "readings": [1.0, 2.0], "at": {"x": 1}}
    for event in (floats, mixed, floats, mixed):  # second time round: the caches answer
        assert scrub_value(event, ph, KEY) is event
    for value in (3.5, 7, None, "plain", ["a", 1], ("b",)):
        assert scrub_value(value, ph, KEY) is value
    assert ph == Placeholders()


def test_events_of_numbers_under_known_field_names_never_reach_the_detectors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ph = Placeholders()
    first = {"temp_c": 21.5, "rpm": 1200, "status": "idle"}
    assert scrub_value(first, ph, KEY) is first  # learns the field names and "idle"

    def detect(*args: object) -> list:
        raise AssertionError("find called")

    monkeypatch.setattr(pii, "find", detect)
    for event in ({"temp_c": 22.0, "rpm": 1300}, {"rpm": 0, "temp_c": -4.5, "status": "idle"}):
        assert scrub_value(event, ph, KEY) is event
    with pytest.raises(AssertionError, match="find called"):
        scrub_value({"temp_c": 1.0, "name_no_other_test_uses": 1.0}, ph, KEY)  # a new field name


def test_scrub_value_refuses_too_deep_values_and_leaves_state_as_it_was() -> None:
    ph = Placeholders()
    scrub("a@example.com", ph, KEY)
    before = msgspec.msgpack.encode(ph)
    deep: list = ["b@example.com"]
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    counts = {EMAIL: 7}
    event = {"first": "c@example.com 10.0.0.1", "deep": deep}
    msg = f"value nested deeper than {MAX_DEPTH} levels; refusing to pass it unscrubbed"
    with pytest.raises(ValueError, match=re.escape(msg)):
        scrub_value(event, ph, KEY, counts=counts)
    assert msgspec.msgpack.encode(ph) == before
    assert counts == {EMAIL: 7}


def test_bad_arguments_get_clear_errors() -> None:
    ph = Placeholders()
    with pytest.raises(TypeError, match="the placeholder key must be non-empty bytes, got str"):
        scrub("x", ph, "key")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the placeholder key must be non-empty bytes, got bytes"):
        scrub_value({"a": 1.0}, ph, b"")
    with pytest.raises(ValueError, match=re.escape("unknown PII types ['NAME']; known: ['SECRET'")):
        scrub("x", ph, KEY, types={"EMAIL", "NAME"})
    with pytest.raises(ValueError, match="unknown phone region 'XX': use an ISO 3166 code"):
        scrub_value({"a": "x"}, ph, KEY, region="XX")
    with pytest.raises(TypeError, match="scrub takes a str, got bytes"):
        scrub(b"bob@example.com", ph, KEY)  # type: ignore[arg-type]


def test_long_and_hostile_texts() -> None:
    # runs each detector's candidate regex could chew on: all finish (in linear time)
    blob = "".join(random.Random(0).choices(string.ascii_letters + string.digits + "+/", k=20000))
    texts = {
        "1 2 3 4 5 6 7 8 9 " * 300: {}, "a" * 20000 + "@": {}, ":" * 5000 + "1": {},
        "Ab1+" * 5000: {},  # long, but four characters over and over: not random-looking
        blob: {SECRET: 1}, "-----BEGIN PRIVATE KEY-----" + "A" * 20000: {SECRET: 1},
        "password=" * 2000: {SECRET: 1}, "a@" * 10000: {}, "1." * 10000: {},
        "415-555-0132 " * 300: {PHONE: 300}, "x1@ab.io 10.0.0.1 " * 300: {EMAIL: 300, IP: 300},
    }
    for text, counts in texts.items():
        assert _scrub(text)[1] == counts


def test_module_examples() -> None:
    assert doctest.testmod(pii).failed == 0


def test_benchmark_runs_and_its_numbers_add_up(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pii_detection.py"
    spec = importlib.util.spec_from_file_location("_bench_pii_detection", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "pii.json"
    result = bench.main(["--sentences", "150", "--events", "500", "--repeat", "1",
                         "--out", str(out), "--quiet"])
    assert json.loads(out.read_text()) == result
    # the same seed plants the same corpus
    assert bench.corpus(150, result["seed"]) == bench.corpus(150, result["seed"])
    for kind, row in result["detection"].items():
        assert row["planted"] == row["true_positives"] + row["misses"], kind
        assert row["found"] == row["true_positives"] + row["false_positives"], kind
        assert row["planted"] > 0, kind
    assert result["detection"][CARD]["recall"] == 1.0
    for name in ("floats_8", "short_strings_recurring", "short_string_new_each_event"):
        assert result["cost"][name]["scrub_value_us"] > 0


# -- generated labelled texts: recall 1.0 where validity is a checksum or a format -------------------


def _luhn_complete(body: str) -> str:
    return body + luhn.calc_check_digit(body)


cards = st.one_of(
    st.from_regex(r"4[0-9]{14}", fullmatch=True).map(_luhn_complete),  # Visa, 16
    st.from_regex(r"5[1-5][0-9]{13}", fullmatch=True).map(_luhn_complete),  # Mastercard
    st.from_regex(r"3[47][0-9]{12}", fullmatch=True).map(_luhn_complete),  # Amex, 15
    st.from_regex(r"6011[0-9]{11}", fullmatch=True).map(_luhn_complete),  # Discover
).flatmap(lambda n: st.sampled_from([n, " ".join(n[i:i + 4] for i in range(0, 16, 4))]
                                    if len(n) == 16 else [n, f"{n[:4]}-{n[4:10]}-{n[10:]}"]))


def _iban(country_bban: tuple[str, str]) -> str:
    country, bban = country_bban
    number = country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban
    return number


ibans = st.one_of(
    st.tuples(st.just("DE"), st.from_regex(r"[0-9]{18}", fullmatch=True)),
    st.tuples(st.just("GB"), st.from_regex(r"[A-Z]{4}[0-9]{14}", fullmatch=True)),
    st.tuples(st.just("NL"), st.from_regex(r"[A-Z]{4}[0-9]{10}", fullmatch=True)),
).map(_iban).filter(stdnum_iban.is_valid).flatmap(
    lambda n: st.sampled_from([n, " ".join(n[i:i + 4] for i in range(0, len(n), 4))]))

ssns = st.tuples(st.integers(1, 899).filter(lambda a: a != 666), st.integers(1, 99),
                 st.integers(1, 9999), st.sampled_from("- ")).map(
    lambda t: f"{t[0]:03d}{t[3]}{t[1]:02d}{t[3]}{t[2]:04d}").filter(
    lambda s: stdnum_ssn.is_valid(s.replace(" ", "-")))

emails = st.tuples(st.from_regex(r"[a-z][a-z0-9._+]{0,12}[a-z0-9]", fullmatch=True),
                   st.lists(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), min_size=1, max_size=3),
                   st.from_regex(r"[a-z]{2,6}", fullmatch=True)).map(
    lambda t: f"{t[0]}@{'.'.join(t[1])}.{t[2]}")

ips = st.ip_addresses().map(str)

coordinates = st.tuples(st.floats(-90, 90), st.floats(-180, 180), st.integers(4, 7), st.booleans()).filter(
    lambda t: abs(t[0]) >= 1 or abs(t[1]) >= 1).map(
    lambda t: f"{abs(t[0]):.{t[2]}f} {'NS'[t[0] < 0]}, {abs(t[1]):.{t[2]}f} {'EW'[t[1] < 0]}" if t[3]
    else f"{t[0]:.{t[2]}f}, {t[1]:.{t[2]}f}")

_US_FORMATS = ("({a}) {e}-{s}", "{a}-{e}-{s}", "+1 {a} {e} {s}", "{a}.{e}.{s}", "+1-{a}-{e}-{s}")
_FOREIGN = [phonenumbers.format_number(phonenumbers.example_number(r),
                                       phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            for r in ("GB", "DE", "FR", "JP", "BR", "AU", "IN")]
phones = st.one_of(
    st.tuples(st.sampled_from(_US_FORMATS), st.sampled_from(["212", "415", "617", "312", "206"]),
              st.integers(200, 999), st.integers(0, 9999)).map(
        lambda t: t[0].format(a=t[1], e=t[2], s=f"{t[3]:04d}")),
    st.sampled_from(_FOREIGN),
).filter(lambda p: phonenumbers.is_valid_number(phonenumbers.parse(p, "US")))

secrets = st.one_of(
    st.from_regex(r"AKIA[A-Z0-9]{16}", fullmatch=True),
    st.from_regex(r"gh[pousr]_[A-Za-z0-9]{36}", fullmatch=True),
    st.from_regex(r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}", fullmatch=True),
    st.from_regex(r"xox[bpa]-[0-9]{10,13}-[A-Za-z0-9]{10,24}", fullmatch=True),
    st.from_regex(r"sk-(proj-)?[A-Za-z0-9]{20,48}", fullmatch=True),
    st.from_regex(r"sk_live_[A-Za-z0-9]{24}", fullmatch=True),
    st.from_regex(r"AIza[0-9A-Za-z_-]{35}", fullmatch=True),
    st.from_regex(r"eyJ[A-Za-z0-9_-]{10,30}\.eyJ[A-Za-z0-9_-]{10,60}\.[A-Za-z0-9_-]{20,43}",
                  fullmatch=True),
)

PLANTED = {EMAIL: emails, PHONE: phones, IP: ips, CARD: cards, IBAN: ibans, SSN: ssns,
           GPS: coordinates, SECRET: secrets}
assert set(PLANTED) == ALL
FILLER = st.lists(st.sampled_from(["device", "reported", "value", "from", "at", "sensor", "ok",
                                   "contact", "user", "left", "the", "site"]), min_size=1, max_size=3)
planted = st.sampled_from(sorted(PLANTED)).flatmap(lambda k: st.tuples(st.just(k), PLANTED[k]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.filter_too_much])
@given(st.lists(st.tuples(FILLER, planted), min_size=1, max_size=6), FILLER)
def test_generated_values_are_all_found(items: list[tuple[list[str], tuple[str, str]]],
                                        tail: list[str]) -> None:
    parts, pattern = [], []
    for words, (kind, value) in items:
        parts += [*words, value]
        pattern += [*map(re.escape, words), f"<{kind}_[0-9]+>"]
    parts += tail
    pattern += map(re.escape, tail)
    ph = Placeholders()
    out, counts = scrub(" ".join(parts), ph, KEY)
    assert re.fullmatch(" ".join(pattern), out), out
    assert counts == Counter(kind for _, (kind, _v) in items)
    # a value that recurs gets the same placeholder each time
    placed = re.findall(r"<[A-Z]+_[0-9]+>", out)
    ref_of: dict[str, str] = {}
    for (_words, (kind, value)), ref in zip(items, placed, strict=True):
        assert ref.startswith(f"<{kind}_")
        assert ref_of.setdefault(value, ref) == ref

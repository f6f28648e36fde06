"""PII detection quality on a generated, labelled corpus, and what scrubbing costs per event.

**Corpus.** The script generates it, seeded. It is made of log and telemetry sentences from
fixed templates. Each sentence holds planted values of the eight kinds (`ponder.operators.pii`)
with their exact character spans, and hard negatives with no label: timestamps (ISO, Unix,
milliseconds), UUIDs, version and build strings, hex hashes, order ids and look-alike numbers
(Luhn-invalid or non-card 16-digit runs, bare 10-digit ids, 9-digit runs, `000-` SSNs), float
pairs and lists, MAC addresses, durations, sensor and pod names, and camel-case identifiers.

**Scoring.** `find` runs on each sentence. A found span is a true positive when it has the
same kind as an unmatched planted span and overlaps it. Each planted span is matched at most
once. Precision and recall are given per kind, with the exact-boundary share of the matches
and a few false positives and misses quoted.

**Cost.** Measured in the same run, in µs per event, against a loop that does not call
`scrub_value`. Events: a dict of 8 floats; a dict with a few short strings that recur from
event to event (field names and status words hit the clean-string cache); one with a short
string that changes every event (no cache hit); and the corpus sentences through `scrub`.

    python benchmarks/pii_detection.py                  # -> results/pii_detection.json
    python benchmarks/pii_detection.py --sentences 500 --events 20000 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import platform
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

from ponder.operators.pii import KINDS, Placeholders, find, scrub, scrub_value

RESULTS = Path(__file__).resolve().parent / "results"
KEY = b"benchmark-placeholder-key"
B62 = string.ascii_letters + string.digits


# -- planted values: valid by each kind's own rule -------------------------------------------------


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def email(rng: random.Random) -> str:
    first = rng.choice(["alice", "bob", "carol", "dmitri", "eve", "farah", "li", "noah"])
    last = rng.choice(["smith", "ng", "okafor", "garcia", "mueller", "tanaka"])
    sep = rng.choice([".", "_", ""])
    domain = rng.choice(["example.com", "mail.example.org", "corp.example.co.uk", "ops.example.io"])
    local = f"{first}{sep}{last}{rng.randint(1, 99) if rng.random() < 0.4 else ''}"
    return f"{local if rng.random() < 0.8 else local.capitalize()}@{domain}"


_US_FORMATS = ("({a}) {e}-{s}", "{a}-{e}-{s}", "+1 {a} {e} {s}", "{a}.{e}.{s}", "+1-{a}-{e}-{s}",
               "{a} {e} {s}", "+1{a}{e}{s}")
_REGIONS = ("GB", "DE", "FR", "JP", "BR", "AU", "IN", "ES")


def phone(rng: random.Random) -> str:
    if rng.random() < 0.6:
        fmt = rng.choice(_US_FORMATS)
        area = rng.choice(["212", "415", "617", "312", "206", "303", "512", "646"])
        return fmt.format(a=area, e=rng.randint(200, 999), s=f"{rng.randint(0, 9999):04d}")
    while True:  # another country's example number, its last digits varied, kept when valid
        ex = phonenumbers.example_number(rng.choice(_REGIONS))
        national = str(ex.national_number)
        ex.national_number = int(national[:-3] + _digits(rng, 3))
        if phonenumbers.is_valid_number(ex):
            if rng.random() < 0.25:  # dialled from the US: 011 44 20 …
                return phonenumbers.format_out_of_country_calling_number(ex, "US")
            return phonenumbers.format_number(ex, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    return str(ipaddress.IPv6Address((0x2001_0db8 << 96) | rng.getrandbits(64)))


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15),
                                 ("37", 15), ("6011", 16), ("4", 19)])
    body = prefix + _digits(rng, length - len(prefix) - 1)
    number = body + luhn.calc_check_digit(body)
    style = rng.random()
    if style < 0.4:
        return number
    sep = rng.choice(" -")
    if length == 15:
        return f"{number[:4]}{sep}{number[4:10]}{sep}{number[10:]}"
    return sep.join(number[i:i + 4] for i in range(0, length, 4))


_IBAN_BBAN = {"DE": lambda r: _digits(r, 18),
              "GB": lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(4)) + _digits(r, 14),
              "NL": lambda r: "".join(r.choice(string.ascii_uppercase) for _ in range(4)) + _digits(r, 10),
              "AT": lambda r: _digits(r, 16), "CH": lambda r: _digits(r, 17)}


def iban(rng: random.Random) -> str:
    while True:
        country = rng.choice(sorted(_IBAN_BBAN))
        bban = _IBAN_BBAN[country](rng)
        number = country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban
        if stdnum_iban.is_valid(number):
            break
    if rng.random() < 0.5:
        return number
    return " ".join(number[i:i + 4] for i in range(0, len(number), 4))


def ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        number = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if stdnum_ssn.is_valid(number):
            return number


def gps(rng: random.Random) -> str:
    places = rng.randint(4, 6)
    lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
    if rng.random() < 0.25:
        return (f"{abs(lat):.{places}f}° {'N' if lat >= 0 else 'S'}, "
                f"{abs(lon):.{places}f}° {'E' if lon >= 0 else 'W'}")
    sep = rng.choice([", ", ",", " , "])
    return f"{lat:.{places}f}{sep}{lon:.{places}f}"


def _token(rng: random.Random, n: int, alphabet: str = B62) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


_SECRETS: list[Callable[[random.Random], str]] = [
    lambda r: "AKIA" + _token(r, 16, string.ascii_uppercase + string.digits),
    lambda r: "ghp_" + _token(r, 36),
    lambda r: "github_pat_" + _token(r, 22) + "_" + _token(r, 59),
    lambda r: f"xoxb-{_digits(r, 12)}-{_digits(r, 12)}-{_token(r, 24)}",
    lambda r: "sk-proj-" + _token(r, 40),
    lambda r: "sk_live_" + _token(r, 24),
    lambda r: "AIza" + _token(r, 35, B62 + "_-"),
    lambda r: f"eyJhbGciOiJIUzI1NiJ9.eyJ{_token(r, 30)}.{_token(r, 43, B62 + '_-')}",
    lambda r: _token(r, r.randint(32, 48), B62 + "+/"),  # a bare high-entropy key
    lambda r: ("-----BEGIN PRIVATE KEY-----\n" + "\n".join(_token(r, 64, B62 + "+/") for _ in range(4))
               + "\n-----END PRIVATE KEY-----"),
]


def secret(rng: random.Random) -> str:
    return rng.choice(_SECRETS)(rng)


# -- hard negatives: look like a value of some kind, are not --------------------------------------


def _iso(rng: random.Random) -> str:
    return (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z")


def _luhn_invalid_16(rng: random.Random) -> str:
    body = rng.choice("3456") + _digits(rng, 14)
    return body + str((int(luhn.calc_check_digit(body)) + rng.randint(1, 9)) % 10)


NEGATIVES: list[Callable[[random.Random], str]] = [
    _iso,
    lambda r: str(r.randint(1_600_000_000, 1_800_000_000)),  # Unix seconds
    lambda r: str(r.randint(1_600_000_000_000, 1_800_000_000_000)),  # Unix milliseconds
    lambda r: f"{r.getrandbits(128):032x}"[:8] + "-" + "-".join(
        f"{r.getrandbits(16):04x}" for _ in range(3)) + f"-{r.getrandbits(48):012x}",  # UUID
    lambda r: f"v{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 99)}",
    lambda r: f"build 10.0.{r.randint(10000, 22000)}.{r.randint(1, 999)}",
    lambda r: f"version {r.randint(1, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 99)}",
    lambda r: f"{r.getrandbits(160):040x}",  # sha1 / git commit
    lambda r: f"{r.getrandbits(256):064x}",  # sha256
    lambda r: f"ORD-{r.randint(2019, 2025)}-{r.randint(0, 999999):06d}",
    lambda r: f"order {r.randint(2_000_000_000, 9_999_999_999)}",
    lambda r: f"invoice #{r.randint(2_000_000_000, 9_999_999_999)}",
    lambda r: f"tracking {r.randint(2_000_000_000, 9_999_999_999)}",  # bare 10 digits, no id label
    _luhn_invalid_16,
    lambda r: "1" + _digits(r, 15),  # 16 digits that no card starts with
    lambda r: _digits(r, 9),
    lambda r: f"000-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
    lambda r: f"{r.uniform(-40, 60):.2f}, {r.uniform(0, 100):.2f}",
    lambda r: f"{r.random():.4f}, {r.random():.4f}",
    lambda r: f"{r.uniform(10, 40):.5f}, {r.uniform(10, 40):.5f}",  # reads as a place: counted
    lambda r: " ".join(f"{r.uniform(0, 100):.1f}" for _ in range(5)),
    lambda r: ":".join(f"{r.getrandbits(8):02X}" for _ in range(6)),  # MAC address
    lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999):03d}",
    lambda r: f"pump-{r.randint(0, 9999):04d}",
    lambda r: f"api-{r.getrandbits(36):09x}-{_token(r, 5, string.ascii_lowercase + string.digits)}",
    lambda r: r.choice(["HandleIncomingConnectionRequest2Async", "Pump_Station_07_Flow_Rate_B",
                        "org/apache/kafka/Consumer2Thread", "MyApplication_Production_Cluster_01"]),
    lambda r: f"max_tokens: {r.randint(64, 4096)}",
]

# template field -> generator; the field's part before "_" is the kind
PLANT: dict[str, Callable[[random.Random], str]] = {
    "EMAIL": email, "PHONE": phone, "IP": ip, "CARD": card, "IBAN": iban, "SSN": ssn,
    "GPS": gps, "SECRET": secret,
    "SSN_BARE": lambda r: ssn(r).replace("-", ""),  # nine digits, right after "SSN"
    "SECRET_URL": lambda r: _token(r, r.randint(12, 24)),  # a DSN password (URL-safe)
    "SECRET_AWS": lambda r: _token(r, 40, B62 + "+/"),  # an AWS secret access key
}

# {kind} plants a value of that kind; {neg} a hard negative; {ts} a timestamp (also a negative)
TEMPLATES = [
    "{ts} INFO user {EMAIL} logged in from {IP} ({neg})",
    "{ts} WARN pump-0042 pressure 101.3 kPa; on-call {PHONE}, ref {neg}",
    "payment with card {CARD} declined for {neg} at {ts}",
    "refund of 42.50 EUR to {IBAN} queued; batch {neg}",
    "applicant SSN {SSN} verified by {EMAIL}",
    "truck TX-881 at {GPS} speed 64.2 km/h, {neg}",
    "deploy {neg} used token {SECRET} from {IP}",
    "{ts} ERROR auth failed password={SECRET} for {EMAIL} from {IP}",
    '{{"api_key": "{SECRET}", "host": "{IP}", "build": "{neg}"}}',
    "Authorization: Bearer {SECRET} request {neg}",
    "sms sent to {PHONE} ({neg}) at {ts}",
    "contact {EMAIL} or {PHONE} about ticket {neg}",
    "gateway {IP} forwarded {neg} for {IP}",
    "{ts} metrics {neg} {neg} ok",
    "sensor temp-7 reading {neg} status nominal, {neg}",
    "customer {EMAIL} updated card {CARD} and IBAN {IBAN}",
    "last fix {GPS} reported by {neg} at {ts}",
    "dsn postgres://app:{SECRET_URL}@db.internal:5432/orders, {neg}",
    "mail from Dana Okafor <{EMAIL}> re: {neg}",
    "W-9 received, SSN {SSN_BARE}, filed {ts}",
    "aws_secret_access_key = {SECRET_AWS} region us-east-1 build {neg}",
    "route via {IP}/24 then {IP}, hop {neg}",
    "{ts} node {neg} restarted after {neg}",
    "order {neg} shipped to {GPS}; customer phone {PHONE}",
]


def corpus(n: int, seed: int) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """`n` sentences with the spans of what was planted in them: (start, end, kind)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        text, spans, pos = [], [], 0
        for literal, field, _spec, _conv in string.Formatter().parse(template):
            text.append(literal)
            pos += len(literal)
            if field is None:
                continue
            if field in PLANT:
                value = PLANT[field](rng)
                spans.append((pos, pos + len(value), field.split("_")[0]))
            else:
                value = _iso(rng) if field == "ts" else rng.choice(NEGATIVES)(rng)
            text.append(value)
            pos += len(value)
        out.append(("".join(text), spans))
    return out


# -- scoring -----------------------------------------------------------------------------------


def score(sentences: list[tuple[str, list[tuple[int, int, str]]]]) -> dict[str, Any]:
    stats = {k: {"planted": 0, "found": 0, "tp": 0, "exact": 0, "fp": [], "fn": []} for k in KINDS}
    for text, gold in sentences:
        found = find(text)
        used = [False] * len(gold)
        for kind in {g[2] for g in gold}:
            stats[kind]["planted"] += sum(1 for g in gold if g[2] == kind)
        for s in found:
            st = stats[s.kind]
            st["found"] += 1
            for i, (a, b, kind) in enumerate(gold):
                if not used[i] and kind == s.kind and s.start < b and a < s.end:
                    used[i] = True
                    st["tp"] += 1
                    st["exact"] += (s.start, s.end) == (a, b)
                    break
            else:
                st["fp"].append(text[s.start:s.end])
        for i, (a, b, kind) in enumerate(gold):
            if not used[i]:
                stats[kind]["fn"].append(text[a:b])
    table = {}
    for kind, st in stats.items():
        table[kind] = {
            "planted": st["planted"], "found": st["found"], "true_positives": st["tp"],
            "precision": round(st["tp"] / st["found"], 4) if st["found"] else None,
            "recall": round(st["tp"] / st["planted"], 4) if st["planted"] else None,
            "exact_boundaries": round(st["exact"] / st["tp"], 4) if st["tp"] else None,
            "false_positives": len(st["fp"]), "misses": len(st["fn"]),
            "false_positive_examples": sorted(set(st["fp"]))[:6],
            "miss_examples": sorted(set(st["fn"]))[:6],
        }
    return table


# -- cost -------------------------------------------------------------------------------------------


def _per_event_us(events: list[Any], fn: Callable[[Any], Any] | None, repeat: int) -> float:
    """Median over `repeat` passes of the µs per event of a loop over `events`."""
    times = []
    for _ in range(repeat):
        if fn is None:
            t0 = time.perf_counter()
            for e in events:
                _ = e
            times.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            for e in events:
                fn(e)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(events) * 1e6


def cost(n: int, repeat: int, sentences: list[str]) -> dict[str, Any]:
    rng = random.Random(1)
    ph = Placeholders()

    def call(e: Any) -> Any:
        return scrub_value(e, ph, KEY)

    fields = ["temp_c", "pressure_kpa", "flow_lpm", "vibration_mm_s", "rpm", "voltage",
              "current_a", "humidity"]
    floats = [{f: rng.uniform(0, 100) for f in fields} for _ in range(n)]
    short = [{"temp_c": rng.uniform(0, 100), "status": rng.choice(["running", "idle", "fault"]),
              "device": rng.choice(["pump-0042", "pump-0043", "valve-7"]), "mode": "auto"}
             for _ in range(n)]
    fresh = [{"temp_c": rng.uniform(0, 100), "status": "running", "note": f"cycle {i} done"}
             for i in range(n)]
    base = _per_event_us(floats, None, repeat)
    out = {"events": n, "repeat": repeat, "no_call_us": round(base, 3)}
    for name, events in (("floats_8", floats), ("short_strings_recurring", short),
                         ("short_string_new_each_event", fresh)):
        call(events[0])  # first sight fills the caches, as the first event of a stream would
        total = _per_event_us(events, call, repeat)
        out[name] = {"scrub_value_us": round(total, 3), "overhead_us": round(total - base, 3)}
    k = min(len(sentences), 2000)
    per = _per_event_us(sentences[:k], lambda s: scrub(s, ph, KEY), 1)
    out["corpus_sentence_scrub_us"] = round(per, 1)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'kind':<7} {'planted':>7} {'found':>6} {'prec':>7} {'recall':>7} {'exact':>6}"]
    for kind, r in result["detection"].items():
        p = "-" if r["precision"] is None else f"{r['precision']:.4f}"
        rc = "-" if r["recall"] is None else f"{r['recall']:.4f}"
        ex = "-" if r["exact_boundaries"] is None else f"{r['exact_boundaries']:.3f}"
        lines.append(f"{kind:<7} {r['planted']:>7} {r['found']:>6} {p:>7} {rc:>7} {ex:>6}")
    c = result["cost"]
    lines.append(f"\nper event (µs), loop without the call: {c['no_call_us']}")
    for name in ("floats_8", "short_strings_recurring", "short_string_new_each_event"):
        lines.append(f"  {name:<30} {c[name]['scrub_value_us']:>8}  (+{c[name]['overhead_us']})")
    lines.append(f"  {'corpus sentence via scrub':<30} {c['corpus_sentence_scrub_us']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--events", type=int, default=100_000, help="events per cost measurement")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "pii_detection.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    sentences = corpus(args.sentences, args.seed)
    t0 = time.perf_counter()
    detection = score(sentences)
    detect_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "benchmark": "pii_detection",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # others' work on the same cores
        "phonenumbers": phonenumbers.__version__,
        "seed": args.seed,
        "sentences": args.sentences,
        "match_rule": "same kind and overlapping span; each planted span matched once",
        "detect_s": round(detect_s, 3),
        "detection": detection,
        "cost": cost(args.events, args.repeat, [s for s, _ in sentences]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(table(result))
        print(f"\nwrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

"""Find personal data and secrets inside string values, and swap in typed placeholders.

Eight kinds are found in free text. Each uses a maintained library where one exists for the
kind. Where none does, a regex finds candidates and a checksum or range check accepts them:

* EMAIL: regex (the addresses used in practice, not all of RFC 5322). Validators such as
  `email-validator` check one string you already have; they do not find addresses in text.
* PHONE: `phonenumbers` (Google's libphonenumber metadata). Its `PhoneNumberMatcher` keeps
  valid numbers only (`Leniency.VALID`), and a number without a country code is read in the
  caller's default region. The matcher costs about 100 µs per call, so a regex first picks
  out runs of at least 7 digits and phone punctuation. A run goes to the matcher unless it
  is a date, lies inside a more specific match, is part of an id (`ORD-2024-000123`), or is
  a bare number right after an id label (`order 2125550123`). Any other bare number that is
  a valid number in the region is read as a phone number: nothing in free text tells it
  from an id.
* IP: regex candidates for IPv4 and IPv6, kept when the stdlib `ipaddress` parses them.
  Leading zeros and octets over 255 are refused, so `v1.2.3` or `10.0.19041.1` never match.
* CARD: 13-19 digits, either unbroken or grouped by spaces or dashes (4-4-4-4[-3] or
  4-6-4/5). The first digit must be 2-6 (ISO/IEC 7812 gives those to payment cards), and
  the number must pass `stdnum.luhn`. A millisecond timestamp starts with 1, and a run that
  fails Luhn stays as it is.
* IBAN: regex candidates (country, check digits, groups of four) kept when `stdnum.iban`
  validates them: mod-97 check, the country's length and BBAN layout, and the national
  check where stdnum has one. Upper case only.
* SSN (US): `NNN-NN-NNNN` or `NNN NN NNNN`, or nine digits right after "SSN" or "social
  security", kept when `stdnum.us.ssn` accepts them (no area 000, 666 or 9xx, no group 00,
  no serial 0000, not on the list of published numbers). Bare nine-digit runs elsewhere look
  like order ids and are left alone.
* GPS: a decimal `lat, lon` pair (signed, or with N/S and E/W) with at least 4 decimals
  each (about 11 m) and in range. Pairs with both parts under 1 are skipped: that spot is
  open sea in the Gulf of Guinea, and telemetry is full of probability pairs like
  `0.1234, 0.8766`. Other float pairs in range (`21.53412, 22.10000`) do read as places.
* SECRET: well-known key formats (AWS `AKIA…`, GitHub `ghp_…`/`github_pat_…`, Slack
  `xox?-…`, OpenAI/Anthropic `sk-…`, Stripe `sk_live_…`, Google `AIza…`), JWTs
  (`eyJ….eyJ….sig`), PEM private key blocks, the value in `password=…`/`"api_key": "…"`
  and `Bearer …`, the password in `scheme://user:pass@host`, and any long high-entropy token
  (at least 24 characters that mix upper case, lower case and digits; hex hashes and UUIDs
  have only one letter case). `detect-secrets` and `trufflehog` work on files and commits,
  not on strings, so these patterns are written here, from their published formats.
  `scrub_value` also treats a whole string as a SECRET when its field name says so
  (`password`, `api_key`, `token`, …).

Overlaps resolve one way only. A phone number yields to any span of another kind that it
overlaps: the matcher reads numbers into any run of digits, while the other kinds have a
checksum or a strict shape. Among the rest the longest span wins. On a tie the more specific
kind wins, in the order of `KINDS` (SECRET first). So a card number is never also read as a
phone number, `10.1.2.0/24` is an address and not a phone, and an IBAN is never read as a
card.

A value is replaced by `<KIND_n>`. `n` stays the same for the same value within one
`Placeholders`, which is one per stream key, so a model can still see that an address comes
back. `Placeholders` never holds a value. It holds HMAC-SHA256(key, kind + value) cut to 64
bits: phone numbers and SSNs come from small spaces, so a hash without a key could be reversed
by trying every value. It keeps at most `limit` values (default 256). When full, it drops the
value seen least recently. Numbers keep counting up and are never given out again: a dropped
value that comes back gets a new number, never a number another value had.

>>> ph = Placeholders()
>>> scrub("mail bob@example.com or Bob@Example.com, not 4111 1111 1111 1112", ph, b"k")
('mail <EMAIL_1> or <EMAIL_1>, not 4111 1111 1111 1112', {'EMAIL': 2})
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.us import ssn as _ssn

__all__ = [
    "EMAIL", "PHONE", "IP", "CARD", "IBAN", "SSN", "GPS", "SECRET", "KINDS", "ALL",
    "DEFAULT_REGION", "MAX_DEPTH", "Span", "Placeholders", "find", "scrub", "scrub_value",
]

EMAIL, PHONE, IP, CARD, IBAN, SSN, GPS, SECRET = (
    "EMAIL", "PHONE", "IP", "CARD", "IBAN", "SSN", "GPS", "SECRET")
# Most specific first: this order breaks ties between spans of equal length.
KINDS = (SECRET, CARD, IBAN, SSN, EMAIL, IP, GPS, PHONE)
ALL = frozenset(KINDS)
_RANK = {kind: i for i, kind in enumerate(KINDS)}
DEFAULT_REGION = "US"
# Nesting scrub_value follows. Deeper values are refused, never passed through (the runtime's
# decoder already refuses records nested deeper than 32).
MAX_DEPTH = 64


class Span(NamedTuple):
    """One finding: `text[start:end]` is a `kind`; `canonical` is what its placeholder keys on
    (the same address in another case, or a number in another format, is the same value)."""

    start: int
    end: int
    kind: str
    canonical: str


# -- detectors: each yields the spans of one kind ------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")


_URL_USER = re.compile(r"://[^\s:/@]+:[^\s@]*$")


def _emails(text: str, region: str) -> Iterator[Span]:
    if "@" in text:
        for m in _EMAIL.finditer(text):
            if not _URL_USER.search(text, max(0, m.start() - 64), m.start()):
                # (`scheme://user:pass@host` holds a password, found as a SECRET, not an address)
                yield Span(m.start(), m.end(), EMAIL, m.group().lower())


# Not after "version ", not before "-beta": a four-part version of small numbers parses as an
# address, and those are the two places it shows.
_IPV4 = re.compile(r"(?<![\w.])(?<![Vv]ersion )(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d|-\w)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:])")


def _ips(text: str, region: str) -> Iterator[Span]:
    if "." in text:
        for m in _IPV4.finditer(text):
            yield from _ip_span(m)
    if text.count(":") >= 2:
        for m in _IPV6.finditer(text):
            yield from _ip_span(m)


def _ip_span(m: re.Match[str]) -> Iterator[Span]:
    try:
        addr = ipaddress.ip_address(m.group())
    except ValueError:  # times like 12:30:45, MAC addresses, 999.1.1.1
        return
    yield Span(m.start(), m.end(), IP, addr.compressed)


_CARD = re.compile(
    r"(?<![\w.-])(?:\d{13,19}"
    r"|\d{4}(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{3})?"
    r"|\d{4}(?P<t>[ -])\d{6}(?P=t)\d{4,5})(?![\w]|[.-]\d)")


def _cards(text: str, region: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        digits = m.group().replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn.is_valid(digits):
            yield Span(m.start(), m.end(), CARD, digits)


_IBAN = re.compile(r"(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?!\w)")


def _ibans(text: str, region: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        cand = m.group()
        # A printed IBAN may be followed by a short upper-case word ("… 00 EUR"): drop
        # trailing groups until it validates.
        while not _iban.is_valid(cand):
            cut = cand.rfind(" ")
            if cut < 0:
                break
            cand = cand[:cut]
        else:
            yield Span(m.start(), m.start() + len(cand), IBAN, _iban.compact(cand))


_SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
_SSN_NAMED = re.compile(r"(?i:\bssn|\bsocial security(?: number| no\.?)?)[\s:#=\"'-]{1,4}(\d{9})(?!\w)")


def _ssns(text: str, region: str) -> Iterator[Span]:
    for m in _SSN.finditer(text):
        number = f"{m[1]}-{m[3]}-{m[4]}"
        if _ssn.is_valid(number):
            yield Span(m.start(), m.end(), SSN, number.replace("-", ""))
    for m in _SSN_NAMED.finditer(text):
        if _ssn.is_valid(m[1]):
            yield Span(m.start(1), m.end(1), SSN, m[1])


_GPS = re.compile(
    r"(?<![\w.+-])([-+]?\d{1,2}\.\d{4,})°?(?:\s?([NS]))?\s*,\s*"
    r"([-+]?\d{1,3}\.\d{4,})°?(?:\s?([EW])(?!\w))?(?!\w|\.\d)")


def _coordinates(text: str, region: str) -> Iterator[Span]:
    for m in _GPS.finditer(text):
        lat, lon = float(m[1]), float(m[3])
        lat, lon = (-lat if m[2] == "S" else lat), (-lon if m[4] == "W" else lon)
        if abs(lat) <= 90 and abs(lon) <= 180 and (abs(lat) >= 1 or abs(lon) >= 1):
            yield Span(m.start(), m.end(), GPS, f"{lat:.6f},{lon:.6f}")


# A run of digits and phone punctuation, not right after `word-` (`ORD-2024-000123` is an id).
# The matcher reads a long run (a list of numbers) in linear time, finding each number.
_PHONE_RUN = re.compile(r"(?<![\w.+])(?<!\w-)\+?\(?\d[\d ().\-/]{5,}\d(?![\w:])")
_DATE = re.compile(r"\d{4}([-/.])\d{1,2}\1\d{1,2}|\d{1,2}([-/.])\d{1,2}\2\d{2,4}")
_COUNTRY_CODE = re.compile(r"(?:\+\d{1,3}|\(\+\d{1,3}\))[ .-]?$")
_ID_LABEL = re.compile(
    r"\b(?:id|order|invoice|ref|seq|txn|transaction|serial|ticket|build|pid|job|batch|offset"
    r"|account|count)(?:[ _-]?(?:id|no\.?|number))?[\"']?\s*[#:=]?\s*[\"']?$", re.IGNORECASE)


def _phones(text: str, region: str, taken: list[Span]) -> Iterator[Span]:
    for m in _PHONE_RUN.finditer(text):
        run = m.group()
        if sum(c.isdigit() for c in run) < 7 or _DATE.fullmatch(run):
            continue
        start = m.start()
        if run.isdigit() and _ID_LABEL.search(text, max(0, start - 24), start):
            continue  # "order 2125550123": a bare number right after an id label is that id
        if any(s.start <= start and m.end() <= s.end for s in taken):
            continue  # already a card, an SSN, an IBAN…: skip the slow matcher
        for pm in phonenumbers.PhoneNumberMatcher(run, region, leniency=phonenumbers.Leniency.VALID):
            begin, number = pm.start, pm.number
            # Digits after a number ("+1 415-555-0132 10.0.0.1") make the matcher drop its
            # country code; take the code back when the number with it is valid.
            code = _COUNTRY_CODE.search(run, 0, begin)
            if code is not None:
                whole = _valid_number(run[code.start():pm.end], region)
                if whole is not None:
                    begin, number = code.start(), whole
            a, b = start + begin, start + pm.end
            if any(s.start < b and a < s.end for s in taken):
                continue  # digits of an address, a card…: the matcher reads too much into them
            e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
            yield Span(a, b, PHONE, e164)


def _valid_number(text: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(number) else None


_KNOWN_TOKENS = re.compile(
    r"(?<![\w-])(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic (sk-ant-…)
    r"|[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWT
    r")(?![\w-])")
_PEM = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[A-Za-z0-9+/=\s\\:,-]*)")
# Field names that announce a secret: any identifier ending in one of these words.
_SECRET_NAME = re.compile(
    r"[\w-]*?(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key|credentials?)", re.IGNORECASE)
_NAME_WORDS = ("pass", "secret", "token", "key", "credential")  # one is in every secret name
_ASSIGNED = re.compile(  # `password=…`, `"api_key": "…"`: the value
    r"(?<![\w-])" + _SECRET_NAME.pattern + r"[\"']?\s*[:=]\s*[\"']?([^\s\"',;&<>]{3,})",
    re.IGNORECASE)
_BEARER = re.compile(r"(?i:\bbearer|\bauthorization:\s*basic)\s+([A-Za-z0-9._~+/-]{8,}=*)")
_URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s@]+)@")
_TOKEN = re.compile(r"(?<![\w+/-])[A-Za-z0-9+/_-]{24,}={0,3}(?![\w+/=-])")


_WORD = re.compile(r"[a-z]{4,}|[A-Z][a-z]{3,}")


def _random_looking(token: str) -> bool:
    """Whether `token` mixes cases and digits and is as varied as random text of its length.

    A random base62 string of 24-64 characters stays above log2(n) - 1 bits per character,
    and fewer than 1 in 200 have most of their characters in runs of 4+ lower-case letters.
    Identifiers made of words (`Pump_Station_07_Flow_Rate`, `HandleRequest2Async`) fail one
    test or the other."""
    if token.islower() or token.isupper() or not any(c.isdigit() for c in token):
        return False
    n = len(token)
    if sum(len(w) for w in _WORD.findall(token)) >= 0.6 * n:
        return False
    bits = -sum(k / n * math.log2(k / n) for k in Counter(token).values())
    return bits >= math.log2(min(n, 48)) - 1.0


def _secrets(text: str, region: str) -> Iterator[Span]:
    # (pattern, the group replaced): each only where the text holds what it needs
    low = text.lower()
    found: list[tuple[re.Pattern[str], int]] = []
    if len(text) >= 15:
        found.append((_KNOWN_TOKENS, 0))
    if "bearer" in low or "authorization" in low:
        found.append((_BEARER, 1))
    if ("=" in text or ":" in text) and any(w in low for w in _NAME_WORDS):
        found.append((_ASSIGNED, 1))
    if "://" in text:
        found.append((_URL_PASSWORD, 1))
    if "-----BEGIN" in text:
        found.append((_PEM, 0))
    for pattern, group in found:
        for m in pattern.finditer(text):
            yield Span(m.start(group), m.end(group), SECRET, m[group])
    if len(text) >= 24:
        for m in _TOKEN.finditer(text):
            if _random_looking(m.group()):
                yield Span(m.start(), m.end(), SECRET, m.group())


# (kind, detector, the shortest text it can match, the fewest digits that text holds)
_DETECTORS = ((SECRET, _secrets, 9, 0), (CARD, _cards, 13, 13), (IBAN, _ibans, 15, 2),
              (SSN, _ssns, 9, 9), (EMAIL, _emails, 6, 0), (IP, _ips, 3, 0),
              (GPS, _coordinates, 13, 10))


def find(text: str, types: frozenset[str] = ALL, region: str = DEFAULT_REGION) -> list[Span]:
    """The non-overlapping spans of `types` in `text`, in text order.

    >>> [s.kind for s in find("card 4111-1111-1111-1111, ssn 536-90-4399")]
    ['CARD', 'SSN']
    """
    n = len(text)
    digits = sum(map(text.count, "0123456789"))  # ten C-speed passes: cheaper than a regex
    found: list[Span] = []
    for kind, detect, shortest, fewest_digits in _DETECTORS:
        if n >= shortest and digits >= fewest_digits and kind in types:
            found.extend(detect(text, region))
    if digits >= 7 and PHONE in types:
        found.extend(_phones(text, region, found))
    if len(found) > 1:
        found = _resolve(found)
    return found


def _resolve(spans: list[Span]) -> list[Span]:
    """Keep the longest span of each overlap (ties: the more specific kind, then the earlier)."""
    spans.sort(key=lambda s: (s.start - s.end, _RANK[s.kind], s.start))
    kept: list[Span] = []
    for s in spans:
        if all(s.end <= k.start or k.end <= s.start for k in kept):
            kept.append(s)
    kept.sort()
    return kept


# -- placeholders: per-key numbering of digests --------------------------------------------------


class Placeholders(msgspec.Struct, omit_defaults=True):
    """Which number each value got, for one stream key; lives in that key's persisted state.

    Holds keyed digests only, never a value. `numbers` maps `"KIND:digest"` to its number,
    least recently seen first (msgpack keeps that order). `issued` is the last number given
    out per kind. Past `limit` entries the least recently seen is dropped. Its number is not
    given out again.
    """

    numbers: dict[str, int] = msgspec.field(default_factory=dict)
    issued: dict[str, int] = msgspec.field(default_factory=dict)
    limit: int = 256

    def __post_init__(self) -> None:
        if self.limit < 1:
            msg = f"Placeholders.limit must be at least 1, got {self.limit}"
            raise ValueError(msg)

    def number(self, kind: str, digest: str) -> int:
        """The number of the value with `digest`, a new one if it is not held."""
        slot = f"{kind}:{digest}"
        n = self.numbers.pop(slot, None)  # popped and put back: now the most recently seen
        if n is None:
            n = self.issued.get(kind, 0) + 1
            self.issued[kind] = n
            while len(self.numbers) >= self.limit:
                del self.numbers[next(iter(self.numbers))]
        self.numbers[slot] = n
        return n


def _digest(key: bytes, kind: str, canonical: str) -> str:
    data = f"{kind}\0{canonical}".encode("utf-8", "surrogatepass")
    return hmac.new(key, data, hashlib.sha256).digest()[:8].hex()


# -- scrubbing -----------------------------------------------------------------------------------


def _check(key: bytes, types: frozenset[str], region: str) -> frozenset[str]:
    if not isinstance(key, bytes) or not key:
        msg = f"the placeholder key must be non-empty bytes, got {type(key).__name__}"
        raise TypeError(msg)
    if not isinstance(types, frozenset):
        types = frozenset(types)
    if not types <= ALL:
        msg = f"unknown PII types {sorted(types - ALL)}; known: {list(KINDS)}"
        raise ValueError(msg)
    if not isinstance(region, str) or PHONE in types and region not in phonenumbers.SUPPORTED_REGIONS:
        msg = f"unknown phone region {region!r}: use an ISO 3166 code such as 'US' or 'DE'"
        raise ValueError(msg)
    return types


def scrub(text: str, placeholders: Placeholders, key: bytes, types: frozenset[str] = ALL,
          region: str = DEFAULT_REGION) -> tuple[str, dict[str, int]]:
    """`text` with each finding replaced by its placeholder, and the count replaced per kind.
    `text` itself comes back when nothing was found."""
    if not isinstance(text, str):
        msg = f"scrub takes a str, got {type(text).__name__}"
        raise TypeError(msg)
    types = _check(key, types, region)
    counts: dict[str, int] = {}
    return _replace(text, find(text, types, region), placeholders, key, counts), counts


def _replace(text: str, spans: list[Span], placeholders: Placeholders, key: bytes,
             counts: dict[str, int]) -> str:
    if not spans:
        return text
    parts, pos = [], 0
    for s in spans:
        n = placeholders.number(s.kind, _digest(key, s.kind, s.canonical))
        parts += (text[pos:s.start], f"<{s.kind}_{n}>")
        pos = s.end
        counts[s.kind] = counts.get(s.kind, 0) + 1
    parts.append(text[pos:])
    return "".join(parts)


# Short strings found clean, per (types, region): field names and status words recur in every
# event, and finding them clean again would cost microseconds each. Cleared when full.
_CLEAN: dict[tuple[frozenset[str], str], set[str]] = {}
_PLAIN_NAMES: set[str] = set()  # field names known not to announce a secret
_CLEAN_SHORT = 64
_CLEAN_MAX = 4096
_ATOMS = frozenset((float, int, bool, type(None)))


def _remember(known: set[str], s: str) -> None:
    if len(s) <= _CLEAN_SHORT:
        if len(known) >= _CLEAN_MAX:
            known.clear()
        known.add(s)


def _names_secret(name: str) -> bool:
    """Whether a field called `name` holds a secret (`password`, `db_api_key`, …)."""
    if name in _PLAIN_NAMES:
        return False
    if _SECRET_NAME.fullmatch(name):
        return True
    _remember(_PLAIN_NAMES, name)
    return False


def _unchanged(obj: dict[Any, Any], clean: set[str]) -> bool:
    """Whether scrubbing `obj` changes nothing, judged from the caches alone (False: walk it).
    True for the usual event: numbers and known short strings under field names seen before."""
    if not clean.issuperset(obj):
        return False
    if _ATOMS.issuperset(map(type, obj.values())):
        return True
    for k, v in obj.items():
        tv = type(v)
        if tv is str:
            if v not in clean or k not in _PLAIN_NAMES:
                return False
        elif tv not in _ATOMS:
            return False
    return True


class _Walk:
    """One scrub_value call: its settings, and the state to restore if it fails."""

    def __init__(self, placeholders: Placeholders, key: bytes, types: frozenset[str],
                 region: str, clean: set[str], counts: dict[str, int]) -> None:
        self.placeholders, self.key, self.types, self.region = placeholders, key, types, region
        self.clean, self.counts = clean, counts
        self.saved: tuple[dict[str, int], dict[str, int], dict[str, int]] | None = None

    def text(self, s: str) -> str:
        if s in self.clean:
            return s
        spans = find(s, self.types, self.region)
        if not spans:
            _remember(self.clean, s)
            return s
        return self.replace(s, spans)

    def secret(self, s: str) -> str:
        """A value whose field name says it is a secret: replaced whole."""
        return self.replace(s, [Span(0, len(s), SECRET, s)]) if s and SECRET in self.types else s

    def replace(self, s: str, spans: list[Span]) -> str:
        if self.saved is None:  # first change in this call: keep what to restore
            ph = self.placeholders
            self.saved = (dict(ph.numbers), dict(ph.issued), dict(self.counts))
        return _replace(s, spans, self.placeholders, self.key, self.counts)

    def rollback(self) -> None:
        if self.saved is not None:
            numbers, issued, counts = self.saved
            self.placeholders.numbers, self.placeholders.issued = numbers, issued
            self.counts.clear()
            self.counts.update(counts)

    def value(self, obj: Any, depth: int) -> Any:
        t = type(obj)
        if t is str:
            return self.text(obj)
        if t is dict:
            return self.mapping(obj, depth)
        if t is list or t is tuple:
            return self.sequence(obj, depth)
        return obj  # numbers, bytes, other objects: nothing to read as text

    def mapping(self, obj: dict[Any, Any], depth: int) -> dict[Any, Any]:
        if depth >= MAX_DEPTH:
            msg = f"value nested deeper than {MAX_DEPTH} levels; refusing to pass it unscrubbed"
            raise ValueError(msg)
        clean, out = self.clean, None
        for i, (k, v) in enumerate(obj.items()):
            nk = k if type(k) is not str or k in clean else self.text(k)
            tv = type(v)
            if tv in _ATOMS:
                nv = v
            elif tv is str and type(k) is str and _names_secret(k):
                nv = self.secret(v)
            else:
                nv = self.value(v, depth + 1)
            if out is None and (nk is not k or nv is not v):
                out = dict(list(obj.items())[:i])  # first change: copy what came before
            if out is not None:
                out[nk] = nv
        return obj if out is None else out

    def sequence(self, obj: list[Any] | tuple[Any, ...], depth: int) -> list[Any] | tuple[Any, ...]:
        if depth >= MAX_DEPTH:
            msg = f"value nested deeper than {MAX_DEPTH} levels; refusing to pass it unscrubbed"
            raise ValueError(msg)
        out = None
        for i, v in enumerate(obj):
            nv = v if type(v) in _ATOMS else self.value(v, depth + 1)
            if out is None and nv is not v:
                out = list(obj[:i])
            if out is not None:
                out.append(nv)
        if out is None:
            return obj
        return tuple(out) if type(obj) is tuple else out


def scrub_value(obj: Any, placeholders: Placeholders, key: bytes, types: frozenset[str] = ALL,
                region: str = DEFAULT_REGION, counts: dict[str, int] | None = None) -> Any:
    """`obj` with every string in it scrubbed: dict values and keys, list and tuple items,
    nested up to `MAX_DEPTH`. Containers that changed are copied and the rest are shared.
    `obj` itself comes back when nothing changed. Counts per kind are added to `counts` if
    given. All or nothing: on an error `placeholders` and `counts` are left as they were.

    >>> ph = Placeholders()
    >>> scrub_value({"t": 21.5, "note": "from 10.0.0.7", "api_key": "hunter2"}, ph, b"k")
    {'t': 21.5, 'note': 'from <IP_1>', 'api_key': '<SECRET_1>'}
    """
    if type(key) is not bytes or not key:
        _check(key, types, region)
    # present once this (types, region) was checked
    clean = _CLEAN.get((types, region)) if type(types) is frozenset and type(region) is str else None
    if clean is None:
        types = _check(key, types, region)
        clean = _CLEAN.setdefault((types, region), set())
    if type(obj) is dict and _unchanged(obj, clean):
        return obj
    walk = _Walk(placeholders, key, types, region, clean, {} if counts is None else counts)
    try:
        return walk.value(obj, 0)
    except BaseException:
        walk.rollback()
        raise

"""Decode: raw records into Events, or into dead letters that say why and where.

A record is untrusted. Whatever is wrong with it (not JSON, not an object, wrong types for the
pipeline's schema, no key, no usable time, nested too deep, a number no float can hold) becomes
a DeadLetter carrying the error and the record's source position, and the stream moves on. Any
other exception while decoding one record is that record's dead letter too, its reason naming
the exception type and the position.

What an Event promises the operators after it, which they rely on rather than check again:

* `ts` is in [0, `MAX_TS`) seconds (1970 up to the year 10000) and at most `max_skew_s` ahead
  of the decoder's clock. Historical times are fine: replays and NAB data are years old.
* `payload` maps str field names to JSON values: str (valid UTF-8), bool, None, int, float, and
  lists/dicts of them. A top-level float is finite: NaN and ±inf (which only parsed records such
  as CSV cells can carry) become None, a missing value. A top-level int is within the signed
  64-bit range: larger ones become floats, as most JSON readers make of them, and ones beyond the
  float range are dead letters, like JSON numbers beyond it already are.
* arrays and objects nest at most `MAX_DEPTH` levels, the record's own object counting as one,
  so nothing downstream (encoding, rendering, the state store) recurses without bound.
* with an image policy (ponder/images.py), each image field present is a validated image in
  `images`, and its payload value is the image's reference (`image sha256:… 64x48 png`), so no
  pixels go further than the request an escalation makes. An image that is refused (not
  decodable, too large, a path outside the allowed directories, not a string) makes the
  record a dead letter naming the field and why; a field that is missing or null is no image.
"""

from __future__ import annotations

import math
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

import msgspec

from ponder.connectors.base import Record
from ponder.images import Image, ImagePolicy
from ponder.types import TENANT_SEP, DeadLetter, Event

__all__ = ["Decoder", "MAX_DEPTH", "MAX_KEY", "MAX_TS"]

MAX_DEPTH = 32  # levels of arrays/objects in a record, its own object included
MAX_KEY = 1024  # characters of a stream key: every state write and lookup carries it
MAX_TENANT = 128  # characters of a tenant name: it labels metrics and ledgers
MAX_TS = 253402300800.0  # 10000-01-01T00:00:00Z: past any date ISO-8601 (and gmtime) can show

_RAW_LIMIT = 2000
_REASON_LIMIT = 500
_INT64 = 2**63  # msgpack, which persists key state, holds ints in [-2**63, 2**64)
_FLOAT_MAX = sys.float_info.max
_PLAIN = frozenset({str, int, float, bool, type(None)})
# a JSON string, escapes included; possessive, so a stray quote cannot make it backtrack
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.S)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


class _Invalid(ValueError):
    """A record that breaks one of the promises above; the message is the dead letter's reason."""


def _raw(value: bytes | dict[str, Any]) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:_RAW_LIMIT]).decode("utf-8", errors="replace")
    try:
        return msgspec.json.encode(value)[:_RAW_LIMIT].decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - cyclic, too deep, odd types: still show something
        try:
            return repr(value)[:_RAW_LIMIT]
        except Exception:  # noqa: BLE001
            return f"<unprintable {type(value).__name__}>"


def _too_deep(raw: bytes) -> bool:
    """Whether JSON text nests arrays/objects deeper than MAX_DEPTH, found without parsing it:
    the parser recurses once per level, so a deep enough record would raise RecursionError (or,
    under a raised recursion limit, overflow the C stack) before it could say what is wrong."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False  # the common case: too few openers to nest that deep
    depth = 0
    # brackets inside strings do not nest; what is left of malformed text only needs to be
    # right up to where the parser would stop
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _plain(obj: dict[Any, Any]) -> bool:
    """Whether a parsed record (a CSV row) is flat JSON already: str names, scalar values, text
    that is valid UTF-8. Anything else goes through JSON, which checks it like a wire record."""
    for k, v in obj.items():
        if type(k) is not str or type(v) not in _PLAIN:
            return False
        for s in (k, v) if type(v) is str else (k,):
            if not s.isascii():
                try:
                    s.encode()
                except UnicodeEncodeError:  # a lone surrogate: no store or sink could write it
                    return False
    return True


def _time(v: Any) -> float:
    if isinstance(v, bool):
        msg = f"expected a number or ISO-8601 string, got {v!r}"
        raise ValueError(msg)
    if isinstance(v, (int, float)):
        t = float(v)
        # epoch milliseconds are common on the wire; seconds are what ponder uses
        if t > 1e11:
            t /= 1000.0
    elif isinstance(v, str):
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        t = d.timestamp()
    else:
        msg = f"expected a number or ISO-8601 string, got {type(v).__name__}"
        raise ValueError(msg)
    if not math.isfinite(t):
        msg = f"time {v!r} is not finite"
        raise ValueError(msg)
    return t


class Decoder:
    """Turn Records into Events for one pipeline.

    :param key: payload field holding the stream key; a record's out-of-band key (a Kafka
        message key) is used only when the payload has none.
    :param time: payload field holding event time (epoch s/ms or ISO-8601), else the record's
        out-of-band time; None (and no out-of-band time) stamps the ingestion time.
    :param schema: optional msgspec Struct the payload must validate against.
    :param now: the clock event times are checked against (and ingestion time stamped with).
    :param max_skew_s: how far ahead of `now` an event time may be; later ones are dead
        letters (a producer with a broken clock, milliseconds sent as microseconds). None
        leaves only the fixed bounds: no time before 1970, none from the year 10000 on.
    :param tenant: payload field holding the tenant, or `header:NAME` for a record header;
        None: one tenant. With tenants the event's key is tenant-scoped (types.Event), and a
        record without a usable tenant is a dead letter: its cost could not be attributed.
    :param images: which fields carry images and what an image may be (ponder/images.py).
    """

    def __init__(self, key: str, time: str | None = "ts", schema: type | None = None,
                 now: Callable[[], float] = time.time, max_skew_s: float | None = 86400.0,
                 tenant: str | None = None, images: ImagePolicy | None = None) -> None:
        why = images.problem() if images is not None else None
        if why is not None:
            msg = f"Decoder: {why}"
            raise ValueError(msg)
        self.images = images
        if max_skew_s is not None and not 0.0 <= max_skew_s < math.inf:
            msg = f"Decoder: max_skew_s must be None or a finite number >= 0, got {max_skew_s!r}"
            raise ValueError(msg)
        self.key = key
        self.tenant = tenant
        self._tenant_header = tenant[len("header:") :] if tenant and tenant.startswith("header:") else None
        self.time = time
        self.schema = schema
        self.max_skew_s = max_skew_s
        self._now = now
        self._json = msgspec.json.Decoder(schema) if schema is not None else msgspec.json.Decoder()
        self._fields = tuple(schema.__struct_fields__) if schema is not None else ()

    def __call__(self, rec: Record) -> Event | DeadLetter:
        if rec.error is not None:
            return DeadLetter(rec.error, rec.source, _raw(rec.value))
        try:
            return self._decode(rec)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - one bad record must never stop the stream
            reason = f"{type(e).__name__} while decoding {rec.source}: {e}"
        return DeadLetter(reason[:_REASON_LIMIT], rec.source, _raw(rec.value))

    def _decode(self, rec: Record) -> Event:
        obj = self._parse(rec.value)
        # the payload's own fields win over out-of-band ones (a Kafka message key), and are
        # always taken out, so a key's context is the same whichever way its events arrive
        key = obj.pop(self.key, None)
        if key is None:
            key = rec.key
        if key is None or isinstance(key, (dict, list, bool)) or key == "":
            why = "missing" if key is None else f"not a usable key: {key!r}"
            raise _Invalid(f"key field {self.key!r} {why}"[:300])
        key = str(key)
        if len(key) > MAX_KEY:
            msg = f"key field {self.key!r} longer than {MAX_KEY} characters: {key[:40]!r}…"
            raise _Invalid(msg)
        v = obj.pop(self.time, None) if self.time is not None else None
        if v is not None:
            try:
                ts = self._bounded(_time(v), v)
            except (ValueError, OverflowError) as e:
                raise _Invalid(f"time field {self.time!r}: {e}") from None
        elif rec.ts is not None:
            # already seconds (the connector read it as such): checked, never rescaled
            ts = float(rec.ts)
            try:
                if not math.isfinite(ts):
                    msg = f"time {rec.ts!r} is not finite"
                    raise _Invalid(msg)
                ts = self._bounded(ts, rec.ts)
            except _Invalid as e:
                raise _Invalid(f"record time: {e}") from None
        elif self.time is None:
            ts = self._now()
        else:
            raise _Invalid(f"time field {self.time!r} missing")
        for name, x in obj.items():
            t = type(x)
            if t is float:
                if x - x != 0.0:  # NaN or ±inf: not a reading, so a missing one
                    obj[name] = None
            elif t is int and not -_INT64 <= x < _INT64:
                if not -_FLOAT_MAX <= x <= _FLOAT_MAX:
                    msg = f"field {name!r}: integer beyond the float range (±{_FLOAT_MAX:.2g})"
                    raise _Invalid(msg)
                obj[name] = float(x)
        images = self._images(obj) if self.images is not None else ()
        if self.tenant is None:
            return Event(key, ts, obj, rec.source, rec.headers, images=images)
        tenant = self._tenant_of(obj, rec)
        return Event(tenant + TENANT_SEP + key, ts, obj, rec.source, rec.headers, tenant, images)

    def _images(self, obj: dict[str, Any]) -> tuple[Image, ...]:
        """Parse the image fields, each replaced in `obj` by its reference."""
        out = []
        for name in self.images.fields:
            v = obj.get(name)
            if v is None:
                continue
            img = self.images.parse(v, name)  # ImageError (a ValueError): the record's dead letter
            obj[name] = img.ref
            out.append(img)
        return tuple(out)

    def _tenant_of(self, obj: dict[str, Any], rec: Record) -> str:
        where = f"header {self._tenant_header!r}" if self._tenant_header else f"tenant field {self.tenant!r}"
        t = rec.headers.get(self._tenant_header) if self._tenant_header else obj.pop(self.tenant, None)
        if t is None or isinstance(t, (dict, list, bool, float)) or t == "":
            why = "missing" if t is None else f"not a usable tenant: {t!r}"
            raise _Invalid(f"{where} {why}"[:300])
        t = str(t)
        if len(t) > MAX_TENANT or TENANT_SEP in t:
            msg = f"{where}: a tenant is at most {MAX_TENANT} characters without \\x1f, got {t[:40]!r}"
            raise _Invalid(msg)
        return t

    def _bounded(self, t: float, v: Any) -> float:
        if t < 0.0:
            msg = f"time {v!r} is before 1970-01-01 (negative epoch time)"
            raise _Invalid(msg)
        if t >= MAX_TS:
            msg = f"time {v!r} is past the year 9999"
            raise _Invalid(msg)
        if self.max_skew_s is not None:
            ahead = t - self._now()
            if ahead > self.max_skew_s:
                msg = (f"time {v!r} is {ahead:.0f}s ahead of the clock, more than "
                       f"max_skew_s={self.max_skew_s:g}")
                raise _Invalid(msg)
        return t

    def _parse(self, value: bytes | str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, dict):
            if _plain(value):
                if self.schema is not None:
                    s = msgspec.convert(value, self.schema)
                    return {f: getattr(s, f) for f in self._fields}
                return dict(value)
            # nested values, odd types (tuples, datetimes), non-str names: checked as JSON text
            try:
                value = msgspec.json.encode(value)
            except RecursionError:
                msg = f"nested deeper than {MAX_DEPTH} levels (or cyclic)"
                raise _Invalid(msg) from None
            except (TypeError, msgspec.EncodeError) as e:
                raise _Invalid(f"not JSON: {e}") from None
        elif isinstance(value, str):
            value = value.encode("utf-8", errors="surrogatepass")  # a surrogate fails as JSON below
        elif not isinstance(value, bytes):
            value = bytes(value)
        if _too_deep(value):
            msg = f"nested deeper than {MAX_DEPTH} levels"
            raise _Invalid(msg)
        if self.schema is not None:
            s = self._json.decode(value)
            return {f: getattr(s, f) for f in self._fields}
        obj = self._json.decode(value)
        if not isinstance(obj, dict):
            msg = f"expected a JSON object, got {type(obj).__name__}"
            raise _Invalid(msg)
        return obj

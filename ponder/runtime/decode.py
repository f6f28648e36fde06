"""Decode: raw records into Events, or into dead letters that say why and where.

A record is untrusted. Whatever is wrong with it (not JSON, not an object, wrong types for the
pipeline's schema, no key, no usable time) becomes a DeadLetter carrying the error and the
record's source position, and the stream moves on.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any, Callable

import msgspec

from ponder.connectors.base import Record
from ponder.types import DeadLetter, Event

__all__ = ["Decoder"]

_RAW_LIMIT = 2000


def _raw(value: bytes | dict[str, Any]) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:_RAW_LIMIT]).decode("utf-8", errors="replace")
    try:
        return msgspec.json.encode(value)[:_RAW_LIMIT].decode("utf-8", errors="replace")
    except (TypeError, msgspec.EncodeError):
        return repr(value)[:_RAW_LIMIT]


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
    """

    def __init__(self, key: str, time: str | None = "ts", schema: type | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.key = key
        self.time = time
        self.schema = schema
        self._now = now
        self._json = msgspec.json.Decoder(schema) if schema is not None else msgspec.json.Decoder()
        self._fields = tuple(schema.__struct_fields__) if schema is not None else ()

    def __call__(self, rec: Record) -> Event | DeadLetter:
        if rec.error is not None:
            return DeadLetter(rec.error, rec.source, _raw(rec.value))
        try:
            obj = self._parse(rec.value)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            return DeadLetter(str(e), rec.source, _raw(rec.value))
        # the payload's own fields win over out-of-band ones (a Kafka message key), and are
        # always taken out, so a key's context is the same whichever way its events arrive
        key = obj.pop(self.key, None)
        if key is None:
            key = rec.key
        if key is None or isinstance(key, (dict, list, bool)) or key == "":
            why = "missing" if key is None else f"not a usable key: {key!r}"
            return DeadLetter(f"key field {self.key!r} {why}"[:300], rec.source, _raw(rec.value))
        key = str(key)
        v = obj.pop(self.time, None) if self.time is not None else None
        if v is not None:
            try:
                ts = _time(v)
            except (ValueError, OverflowError) as e:
                return DeadLetter(f"time field {self.time!r}: {e}", rec.source, _raw(rec.value))
        elif rec.ts is not None:
            ts = rec.ts
        elif self.time is None:
            ts = self._now()
        else:
            return DeadLetter(f"time field {self.time!r} missing", rec.source, _raw(rec.value))
        return Event(key, ts, obj, rec.source, rec.headers)

    def _parse(self, value: bytes | dict[str, Any]) -> dict[str, Any]:
        if self.schema is not None:
            s = (self._json.decode(value) if isinstance(value, (bytes, bytearray, memoryview, str))
                 else msgspec.convert(value, self.schema))
            return {f: getattr(s, f) for f in self._fields}
        obj = self._json.decode(value) if isinstance(value, (bytes, bytearray, memoryview, str)) else dict(value)
        if not isinstance(obj, dict):
            msg = f"expected a JSON object, got {type(obj).__name__}"
            raise ValueError(msg)
        return obj

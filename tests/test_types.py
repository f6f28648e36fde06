"""Wire types: deterministic ids, codecs, decision schema."""

from __future__ import annotations

import json

import msgspec
import pytest

from ponder import types as t


def test_decision_id_is_deterministic_and_position_sensitive():
    a = t.decision_id("dev-1", t.SourcePos("events", 3, 42))
    assert a == t.decision_id("dev-1", t.SourcePos("events", 3, 42))
    assert len(a) == 32 and int(a, 16) >= 0
    others = {
        t.decision_id("dev-2", t.SourcePos("events", 3, 42)),
        t.decision_id("dev-1", t.SourcePos("events", 4, 42)),
        t.decision_id("dev-1", t.SourcePos("events", 3, 43)),
        t.decision_id("dev-1", t.SourcePos("other", 3, 42)),
        # separators inside keys must not collide with another split
        t.decision_id("dev-1|events", t.SourcePos("", 3, 42)),
    }
    assert a not in others and len(others) == 5


def _decision() -> t.Decision:
    src = t.SourcePos("events", 1, 7)
    return t.Decision(
        decision_id=t.decision_id("k", src), key="k", action="alert", severity="high", reason="r",
        confidence=0.75, tier="reflex", model="reflex", usage=t.Usage(10, 4, 3, 0.001),
        latency_ms=1.5, degraded=False, evidence={"temp": 99.5}, ts=12.0, source=src,
        trace=t.Trace(0.9, [t.Finding("spike", "temp", 0.9, 99.5, 20.0, "x")], ["reflex"],
                      [t.Span("reflex", 0.1)], []))


def test_decision_roundtrips_json_and_msgpack():
    d = _decision()
    assert t.decision_json.decode(t.json_encoder.encode(d)) == d
    assert t.decision_msgpack.decode(t.msgpack_encoder.encode(d)) == d
    # source positions are compact arrays on the wire
    assert json.loads(t.json_encoder.encode(d))["source"] == ["events", 1, 7, 0]


def test_old_records_without_new_fields_still_decode():
    d = json.loads(t.json_encoder.encode(_decision()))
    for optional in ("ts", "source", "trace", "headers"):
        d.pop(optional)
    back = t.decision_json.decode(json.dumps(d))
    assert back.source is None and back.trace is None and back.ts == 0.0


def test_answer_schema_enumerates_allowed_actions():
    s = t.answer_schema(("none", "alert", "shutdown"))
    assert sorted(s["properties"]["action"]["enum"]) == ["alert", "none", "shutdown"]
    assert s["required"] == ["action", "severity", "reason", "confidence"]
    assert s["additionalProperties"] is False
    assert s["properties"]["confidence"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}


def test_answer_type_rejects_other_actions_and_unknown_fields():
    T = t.answer_type(("none", "alert"))
    ok = msgspec.json.decode(b'{"action":"none","severity":"info","reason":"","confidence":0}', type=T)
    assert ok.action == "none"
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'drop_table'"):
        msgspec.json.decode(b'{"action":"drop_table","severity":"info","reason":"","confidence":0}', type=T)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"action":"none","severity":"info","reason":"","confidence":0,"x":1}', type=T)
    with pytest.raises(ValueError, match="at least one allowed action"):
        t.answer_type(())

"""The Kafka sink never drops a record: oversized decisions are shrunk or dead-lettered with the
reason, and a produce error it cannot handle is raised by flush (the worker then stops before
committing). Against the real test broker."""

from __future__ import annotations

import asyncio
import json

import pytest

from kafka_helpers import read_all
from ponder.connectors.base import SinkError
from ponder.connectors.kafka import KafkaSink, ensure_topics
from ponder.types import Decision, SourcePos, Usage, decision_id


def decision(key: str, offset: int, *, reason: str = "ok", evidence: dict | None = None,
             headers: dict | None = None, partition: int = 0) -> Decision:
    src = SourcePos("in", partition, offset)
    return Decision(decision_id(key, src), key, "alert", "high", reason, 0.9, "reflex", "", Usage(), 1.0,
                    False, evidence or {}, source=src, headers=headers or {})


async def _roundtrip(broker: str, name: str, decisions: list[Decision]) -> tuple[list, list, KafkaSink]:
    await ensure_topics(broker, {f"out-{name}": 1, f"dead-{name}": 1})
    sink = KafkaSink(broker, f"out-{name}", f"dead-{name}", max_message_bytes=200_000)
    await sink.start()
    try:
        for d in decisions:
            sink.write(d)
        await sink.flush()
        meta = sink.checkpoint_meta(0, 0)
    finally:
        await sink.stop()
    out = await read_all(broker, f"out-{name}", 1)
    dead = await read_all(broker, f"dead-{name}", 1)
    return out, dead, meta


def test_an_oversized_decision_is_shrunk_with_a_marker(broker):
    big = decision("pump-1", 3, reason="r" * 5000, evidence={"dump": "x" * 300_000},
                   headers={"trace": "h" * 100_000, "tenant": "acme"})
    small = decision("pump-2", 4)
    out, dead, _ = asyncio.run(_roundtrip(broker, "shrink", [big, small]))
    assert dead == []
    assert [r.key for r in out] == [b"pump-1", b"pump-2"]
    d = json.loads(out[0].value)
    assert d["decision_id"] == big.decision_id and d["evidence"]["shrunk"] is True
    assert d["reason"] == "r" * 400 + "…[cut 4600 chars]"
    assert d["evidence"]["dump"] == "x" * 256 + "…[cut 299744 chars]"
    assert d["headers"]["tenant"] == "acme"
    assert dict(out[0].headers)["decision_id"] == big.decision_id.encode()
    assert len(out[0].value) < 200_000


def test_a_decision_that_cannot_shrink_goes_to_the_dead_letters(broker):
    huge_key = "k" * 600_000  # the key is the decision's identity: it is never cut
    after = decision("pump-3", 8)
    out, dead, meta = asyncio.run(_roundtrip(broker, "toolarge", [decision(huge_key, 7), after]))
    assert [r.key for r in out] == [b"pump-3"]
    assert len(dead) == 1
    letter = json.loads(dead[0].value)
    assert letter["source"] == ["in", 0, 7, 0] and letter["stage"] == "sink"
    assert "exceeds the maximum message size (200000 bytes)" in letter["reason"]
    assert dict(dead[0].headers)["dead_letter_id"] == b"in:0:7:sink"
    # both outputs are accounted for where a replay would look for them
    assert meta == {"decisions_from": 0, "dead_from": 0}


def test_a_produce_error_is_raised_by_flush_and_by_later_writes(broker):
    async def go():
        await ensure_topics(broker, {"out-fatal": 1, "dead-fatal": 1})
        sink = KafkaSink(broker, "out-fatal", "dead-fatal")
        await sink.start()
        try:
            sink.write(decision("pump-4", 1, partition=3))  # the output topic has no partition 3
            with pytest.raises(SinkError, match="producing to"):
                await asyncio.wait_for(sink.flush(), 60)
            with pytest.raises(SinkError):
                sink.write(decision("pump-5", 2))
        finally:
            with pytest.raises(SinkError):
                await sink.stop()

    asyncio.run(go())

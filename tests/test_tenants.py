"""Tenants: named by an event field or a header; keys scoped by tenant, so two tenants' keys
of the same name never share state, context or decision ids; decisions carry the tenant; a
record without a usable tenant is a dead letter."""

from __future__ import annotations

import msgspec
import pytest

from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.decode import Decoder
from ponder.types import DeadLetter, Event, SourcePos, Usage

ANSWER = '{"action":"alert","severity":"high","reason":"r","confidence":0.9}'


class Recorder:
    """An engine that records each request's prompt and answers `alert`."""

    name = "recorder"

    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(ANSWER, Usage(10, 0, 5), "m") for _ in requests]


def pipeline(tenant: str | None) -> Pipeline:
    return Pipeline(name="t", key="k", time="ts", actions=("none", "alert"), tenant=tenant,
                    gate=GatePolicy(rules=(Rule("flag", lambda e: bool(e.payload.get("flag"))),)),
                    tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine="reflex", max_batch=1)))


async def test_same_key_in_two_tenants_keeps_separate_state_context_and_ids():
    items = [{"k": "pump-1", "org": org, "ts": float(i), "secret": f"{org}-{i}", "flag": i == 3}
             for i in range(4) for org in ("acme", "globex")]
    edge = Recorder()
    sink = MemorySink()
    stats = await pipeline("org").worker(MemorySource(items), sink, engines={"edge": edge}).run()
    assert stats.keys == 2 and stats.decisions == 2
    by_tenant = {d.tenant: d for d in sink.decisions}
    assert set(by_tenant) == {"acme", "globex"} and {d.key for d in sink.decisions} == {"pump-1"}
    assert by_tenant["acme"].decision_id != by_tenant["globex"].decision_id
    for r in edge.requests:  # each tenant's prompt holds its own readings, none of the other's
        mine = "acme" if "acme-" in r.prompt else "globex"
        other = "globex" if mine == "acme" else "acme"
        assert f"{other}-" not in r.prompt and all(f"{mine}-{i}" in r.prompt for i in range(3))


async def test_without_tenants_decisions_say_default():
    sink = MemorySink()
    await pipeline(None).worker(MemorySource([{"k": "a", "ts": 1.0, "flag": True}]), sink,
                                engines={"edge": Recorder()}).run()
    (d,) = sink.decisions
    assert (d.tenant, d.key) == ("default", "a")


def test_tenant_from_a_header_and_records_without_a_usable_tenant_are_dead_letters():
    dec = Decoder("k", "ts", tenant="header:x-tenant")
    pos = SourcePos("in", 0, 7)
    ev = dec(Record(b'{"k": "a", "ts": 1}', pos, headers={"x-tenant": "acme"}))
    assert isinstance(ev, Event) and (ev.tenant, ev.stream_key, ev.key) == ("acme", "a", "acme\x1fa")
    missing = dec(Record(b'{"k": "a", "ts": 1}', pos))
    assert isinstance(missing, DeadLetter) and missing.reason == "header 'x-tenant' missing"
    field = Decoder("k", "ts", tenant="org")
    bad = {b'{"k": "a", "ts": 1, "org": ["x"]}': "tenant field 'org' not a usable tenant: ['x']",
           b'{"k": "a", "ts": 1, "org": ""}': "tenant field 'org' not a usable tenant: ''",
           b'{"k": "a", "ts": 1, "org": "a\\u001fb"}':
               "tenant field 'org': a tenant is at most 128 characters without \\x1f, got 'a\\x1fb'"}
    for raw, reason in bad.items():
        out = field(Record(raw, pos))
        assert isinstance(out, DeadLetter) and out.reason == reason and out.source == pos
    ok = field(Record(b'{"k": "a", "ts": 1, "org": 42}', pos))
    assert isinstance(ok, Event) and ok.tenant == "42" and "org" not in ok.payload


def test_a_tenant_setting_must_name_another_field():
    with pytest.raises(ValueError, match="tenant must name an event field other than the key"):
        pipeline("k")


def test_a_schema_without_the_tenant_field_is_refused_when_the_pipeline_is_defined():
    class Reading(msgspec.Struct):
        k: str
        ts: float

    with pytest.raises(ValueError, match="the schema Reading must declare the tenant field 'org'"):
        Pipeline(name="t", key="k", actions=("none",), schema=Reading, tenant="org")
    Pipeline(name="t", key="k", actions=("none",), schema=Reading, tenant="header:x-org")  # headers are not payload

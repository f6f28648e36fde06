"""Traces on OpenTelemetry: an escalated event's path as spans exported over OTLP/HTTP to a real
receiver on loopback (decoded with opentelemetry-proto), timed around the work they name;
events that stop at the gate produce none; nothing is set up when no endpoint is configured."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import os
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request
from ponder.operators.budget import Budget
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.tracing import tracing_requested
from ponder.runtime.worker import Worker
from ponder.types import SourcePos, Usage

ANSWER = json.dumps({"action": "alert", "severity": "high", "reason": "r", "confidence": 0.9})
USAGE = Usage(1_000, 200, 50)
PREFILL_S, DECODE_S = 0.02, 0.03  # what the model tier takes, phase by phase
ROUNDING_S = 1e-5  # a decision's trace keeps microseconds
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Timed:
    """A model tier (no model runs here) that takes a known time and reports its phases."""

    name = "timed"
    model = "slow-1"

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests: list[Request]) -> list[Completion]:
        t0 = time.perf_counter()
        await asyncio.sleep(PREFILL_S)
        t1 = time.perf_counter()
        await asyncio.sleep(DECODE_S)
        phases = {"prefill": t1 - t0, "decode": time.perf_counter() - t1}
        return [Completion(ANSWER, USAGE, "slow-1", timings=phases) for _ in requests]


class Broken:
    name = "broken"

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests: list[Request]) -> list[Completion]:
        raise RuntimeError("backend down")


class HeaderSource(MemorySource):
    """MemorySource whose records carry headers (a trace context from upstream)."""

    def __init__(self, items: list[tuple[dict, dict[str, str]]]) -> None:
        self.items = items

    async def batches(self):
        yield [Record(json.dumps(v).encode(), SourcePos("in", 0, i), headers=h) for i, (v, h) in enumerate(self.items)]


class Receiver:
    """An OTLP/HTTP trace endpoint on loopback: decodes each export and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[PbSpan] = []
        self.resources: list[dict] = []
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":  # the traces endpoint only: a wrong path keeps nothing
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    receiver.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                receiver.posts += 1
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None: ...

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch):
    for var in list(os.environ):
        if var.startswith("OTEL_"):
            monkeypatch.delenv(var)
    return monkeypatch


@pytest.fixture
def receiver(otel_env: pytest.MonkeyPatch):
    r = Receiver()
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", r.url + "/v1/traces")
    otel_env.setenv("OTEL_SERVICE_NAME", "ponder-test")
    yield r
    r.server.shutdown()
    r.server.server_close()


PRICE = Price(prompt=1.0, cached_prompt=0.1, completion=2.0)


def pipeline() -> Pipeline:
    return Pipeline(
        name="traced", key="k", time="ts", tenant="org", actions=("none", "alert"),
        budgets=(Budget(tenant="acme", usd=0.0),),
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), cooldown=1,
                        rules=(Rule("hot", lambda e: float(e.payload["v"])),)),
        tiers=(TierSpec("reflex", max_batch=1),
               TierSpec("edge", engine="reflex", model="slow-1", min_score=0.5, max_batch=8, max_wait_ms=1.0,
                        price=PRICE),
               TierSpec("cloud", engine="reflex", min_score=0.95, max_batch=1, failures=1, cooloff_s=600.0,
                        price=PRICE)))


ITEMS = [
    ({"k": "calm-0", "org": "globex", "ts": 1.0, "v": 0.0}, {}),
    ({"k": "pump", "org": "globex", "ts": 1.0, "v": 0.7}, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}),
    ({"k": "calm-1", "org": "globex", "ts": 1.0, "v": 0.0}, {}),
    ({"k": "valve", "org": "acme", "ts": 1.0, "v": 0.7}, {}),  # acme may spend nothing: reflex
    ({"k": "fan", "org": "globex", "ts": 1.0, "v": 1.0}, {}),  # cloud fails, its breaker opens
    ({"k": "fan", "org": "globex", "ts": 2.0, "v": 1.0}, {}),  # behind it in its lane: cloud skipped
    ({"k": "calm-2", "org": "globex", "ts": 1.0, "v": 0.0}, {}),
]


async def run_traced(items=ITEMS, decide=None, tamper=None):
    logic, decoder, engines = pipeline().build(engines={"edge": Timed(), "cloud": Broken()})
    if decide is not None:
        logic.decide = decide
    sink = MemorySink()
    worker = Worker(logic, decoder, HeaderSource(items), sink, engines, pipeline().tiers, name="traced")
    if tamper is not None:
        tamper(worker)
    stats = await worker.run()
    return worker, stats, sink


def by_trace(spans: list[PbSpan]) -> dict[bytes, dict[bytes, PbSpan]]:
    out: dict[bytes, dict[bytes, PbSpan]] = defaultdict(dict)
    for s in spans:
        out[s.trace_id][s.span_id] = s
    return out


def tree(span: PbSpan, spans: dict[bytes, PbSpan]) -> tuple:
    """(name, children's trees in time order)."""
    kids = sorted((s for s in spans.values() if s.parent_span_id == span.span_id),
                  key=lambda s: (s.start_time_unix_nano, s.end_time_unix_nano))
    return (span.name, [tree(k, spans) for k in kids])


def attrs(span: PbSpan) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return out


def named(spans: dict[bytes, PbSpan], name: str) -> list[PbSpan]:
    return sorted((s for s in spans.values() if s.name == name), key=lambda s: s.start_time_unix_nano)


def seconds(s: PbSpan) -> float:
    return (s.end_time_unix_nano - s.start_time_unix_nano) / 1e9


async def test_escalated_events_become_span_trees_with_the_reasons_and_the_genai_usage(receiver: Receiver):
    worker, stats, sink = await run_traced()
    assert (stats.events, stats.escalations, len(sink.decisions)) == (7, 4, 4)
    assert worker.tracing is not None and worker.tracing.traced == 4
    traces = by_trace(receiver.spans)
    roots = {attrs(s)["ponder.key"] + f"@{s.start_time_unix_nano}": (s, traces[s.trace_id])
             for s in receiver.spans if s.name == "event"}
    assert len(roots) == 4 and len(traces) == 4  # one trace per escalated event, none for the calm ones
    assert receiver.resources[0]["service.name"] == "ponder-test"
    assert receiver.resources[0]["ponder.pipeline"] == "traced"
    decisions = {(d.key, d.source.offset): d for d in sink.decisions}
    engine = ("text_completion slow-1", [("prefill", []), ("decode", [])])
    call_edge = ("call edge", [("batch wait", []), engine, ("return wait", [])])
    expected = {
        1: [("decode", []), ("gate", []), ("lane wait", []),
            ("reason", [("context render", []), ("route", []), call_edge, ("decide", [])]), ("sink", [])],
        3: [("decode", []), ("gate", []), ("lane wait", []),
            ("reason", [("context render", []), ("route", []),
                        ("call reflex", [("batch wait", []), ("text_completion reflex", []), ("return wait", [])]),
                        ("decide", [])]),
            ("sink", [])],
        4: [("decode", []), ("gate", []), ("lane wait", []),
            ("reason", [("context render", []), ("route", []), ("call cloud", []), ("route", []), call_edge,
                        ("decide", [])]), ("sink", [])],
        # queued behind the key's earlier event: it waited in the lane before the gate saw it
        5: [("decode", []), ("lane wait", []), ("gate", []),
            ("reason", [("context render", []), ("route", []), call_edge, ("decide", [])]), ("sink", [])],
    }
    seen = set()
    for root, spans in roots.values():
        a = attrs(root)
        offset = int(a["ponder.source"].rsplit("@", 1)[1])
        seen.add(offset)
        d = decisions[(a["ponder.key"], offset)]
        assert tree(root, spans) == ("event", expected[offset]), offset
        assert (a["ponder.decision_id"], a["ponder.tier"], a["ponder.action"]) == (d.decision_id, d.tier, d.action)
        assert root.kind == PbSpan.SPAN_KIND_CONSUMER
        # nested and monotonic: every span inside its parent, none ending before it starts
        for s in spans.values():
            assert s.start_time_unix_nano <= s.end_time_unix_nano
            if s.parent_span_id in spans:
                p = spans[s.parent_span_id]
                assert p.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= p.end_time_unix_nano
        (gate,) = named(spans, "gate")
        assert seconds(gate) < 0.02  # a rule lookup, not the event loop's other work
        # the GenAI conventions on each model call, its usage exactly the decision's
        engines = [s for s in spans.values() if s.kind == PbSpan.SPAN_KIND_CLIENT]
        tokens = [(attrs(s)["gen_ai.usage.input_tokens"], attrs(s)["gen_ai.usage.cache_read.input_tokens"],
                   attrs(s)["gen_ai.usage.output_tokens"]) for s in engines]
        assert tuple(map(sum, zip(*tokens))) == (d.usage.prompt_tokens, d.usage.cached_prompt_tokens,
                                                 d.usage.completion_tokens)
        for s in engines:
            g = attrs(s)
            assert g["gen_ai.operation.name"] == "text_completion"
            assert s.name == f"text_completion {g['gen_ai.request.model']}"
            if g["gen_ai.request.model"] == "slow-1":  # the model tier takes a known time
                assert tokens[engines.index(s)] == (1_000, 200, 50) and g["gen_ai.response.model"] == "slow-1"
                assert seconds(s) >= PREFILL_S + DECODE_S - ROUNDING_S
                prefill, decode = sorted((k for k in spans.values() if k.parent_span_id == s.span_id),
                                         key=lambda k: k.start_time_unix_nano)
                assert seconds(prefill) >= PREFILL_S - ROUNDING_S and seconds(decode) >= DECODE_S - ROUNDING_S
        routes = [attrs(s) for s in named(spans, "route")]
        # the router ranks by the verdict's surprise: the gate's score, shrunk for a key's later incidents
        gate_attrs = attrs(named(spans, "gate")[0])
        assert routes[0]["ponder.route.score"] == pytest.approx(gate_attrs["ponder.gate.surprise"])
        assert gate_attrs["ponder.gate.surprise"] <= gate_attrs["ponder.gate.score"] == a["ponder.gate.score"]
        if offset == 1:  # continues the trace its event came with
            assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == PARENT_ID
            assert (routes[0]["ponder.route.tier"], routes[0]["ponder.route.why"]) == ("edge", "score 0.70 asks for edge")
            assert "ponder.route.skipped" not in routes[0]
        else:
            assert root.parent_span_id == b""
        if offset == 3:  # the tenant's budget turned it down to reflex
            (skip,) = routes[0]["ponder.route.skipped"]
            assert routes[0]["ponder.route.tier"] == "reflex" and skip.startswith("edge: budget tenant=acme: ")
        if offset == 4:  # cloud failed: down to edge
            (cloud,) = named(spans, "call cloud")
            assert cloud.status.code == Status.STATUS_CODE_ERROR and cloud.status.message == "RuntimeError: backend down"
            assert [(r["ponder.route.step"], r["ponder.route.tier"], r["ponder.route.why"]) for r in routes] == [
                ("first", "cloud", "score 1.00 asks for cloud"), ("down", "edge", "cloud failed")]
        if offset == 5:  # then its breaker was open
            assert routes[0]["ponder.route.skipped"] == ["cloud: breaker open"]
            assert routes[0]["ponder.route.tier"] == "edge"
    assert seen == {1, 3, 4, 5}


async def test_the_decision_trace_splits_a_call_into_batch_wait_and_the_engines_phases(otel_env):
    worker, _, sink = await run_traced(ITEMS[1:2])
    assert worker.tracing is None  # no endpoint configured: no exporter, no provider
    (d,) = sink.decisions
    (call,) = d.trace.spans
    wait, engine, back = call.parts
    assert (call.name, wait.name, engine.name, [p.name for p in engine.parts], back.name) == (
        "edge", "batch wait", "engine", ["prefill", "decode"], "return wait")
    assert engine.ms >= (PREFILL_S + DECODE_S - ROUNDING_S) * 1000
    assert engine.parts[0].ms >= (PREFILL_S - ROUNDING_S) * 1000
    assert call.start_ms <= wait.start_ms <= engine.start_ms <= engine.parts[0].start_ms
    assert engine.start_ms + engine.ms <= back.start_ms + 1e-3 <= call.start_ms + call.ms + 2e-3
    assert (call.attrs["prompt_tokens"], call.attrs["cached_prompt_tokens"], call.attrs["completion_tokens"]) == (
        1_000, 200, 50)
    assert [s.name for s in d.trace.stages] == ["context render", "route", "decide"]
    assert d.trace.stages[1].attrs == {"step": "first", "why": "score 0.70 asks for edge", "score": 0.7,
                                       "tier": "edge", "skipped": []}


async def test_a_reasoner_that_raises_leaves_a_dead_letter_and_an_error_trace(receiver: Receiver):
    async def boom(st, event, verdict, call):
        raise ValueError("bad rule")

    _, stats, sink = await run_traced(ITEMS[:2], decide=boom)
    assert (stats.escalations, len(sink.decisions), len(sink.dead_letters)) == (1, 0, 1)
    (root,) = [s for s in receiver.spans if s.name == "event"]
    spans = by_trace(receiver.spans)[root.trace_id]
    assert tree(root, spans) == ("event", [("decode", []), ("gate", []), ("lane wait", []), ("reason", [])])
    (reason,) = named(spans, "reason")
    assert reason.status.code == Status.STATUS_CODE_ERROR and reason.status.message == "ValueError: bad rule"


async def test_a_sampler_that_keeps_none_sends_no_span(receiver: Receiver, otel_env: pytest.MonkeyPatch):
    otel_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    worker, stats, _ = await run_traced()
    assert (stats.escalations, worker.tracing.traced) == (4, 4)
    assert receiver.spans == [] and receiver.posts == 0


async def test_a_trace_that_cannot_be_made_never_stops_the_stream(receiver: Receiver):
    class Gone:
        def start_span(self, *args, **kw):
            raise RuntimeError("tracer gone")

    worker, stats, sink = await run_traced(tamper=lambda w: setattr(w.tracing, "tracer", Gone()))
    assert (stats.escalations, len(sink.decisions), worker.tracing.failures) == (4, 4, 4)
    assert receiver.spans == []


@pytest.mark.parametrize(("env", "wanted"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
])
def test_the_standard_variables_turn_export_on_and_off(env, wanted):
    assert tracing_requested(env) is wanted


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"},
     "OTEL_TRACES_EXPORTER='zipkin': ponder exports traces with 'otlp' only (or 'none'), not zipkin"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': ponder exports traces over OTLP/HTTP only; set it to 'http/protobuf'"),
])
def test_an_exporter_ponder_does_not_ship_is_refused_by_name(env, message):
    with pytest.raises(ValueError) as e:
        tracing_requested(env)
    assert str(e.value) == message


def test_the_overhead_benchmark_runs_both_ways_and_every_escalation_reaches_the_receiver(tmp_path: Path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "tracing_overhead.py"
    spec = importlib.util.spec_from_file_location("_bench_tracing_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tracing_overhead.json"
    result = bench.main(["--events", "5000", "--repeat", "1", "--traces", "50", "--out", str(out), "--quiet"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    off, on = result["off"], result["on"]
    assert off["events"] == on["events"] == result["events"] == 5000
    assert on["escalations"] == off["escalations"] == result["escalations"] > 0
    # each traced reflex decision: event, decode, gate, lane wait, reason, context render, route,
    # call, batch wait, engine, return wait, decide, sink
    assert result["spans_per_run"] == 13 * result["escalations"]
    assert result["ratios"] == [result["ratio"]]
    assert result["best_ratio"] == pytest.approx(min(off["cpu_times_s"]) / min(on["cpu_times_s"]), rel=1e-3)
    parts = result["parts"]
    assert parts["per_event_us"] > 0 and parts["per_traced_event_us"] > 0
    assert result["estimated_ratio"] == pytest.approx(off["cpu_s"] / (off["cpu_s"] + parts["added_cpu_s"]), abs=2e-4)
    assert result["meets_target"] == (result["estimated_ratio"] >= 0.95)

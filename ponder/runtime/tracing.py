"""OpenTelemetry traces of escalated events, exported over OTLP/HTTP when configured.

Configured by the standard environment variables, read when a worker is made: traces are on
when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set, or
`OTEL_TRACES_EXPORTER=otlp` (then to the default `http://localhost:4318`); off with
`OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`. The rest (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`)
is the SDK's. Not configured, nothing of OpenTelemetry is imported and the event path takes no
clock reading for it.

Sampling by the gate: only an escalated event is traced. One that stops at the gate (nearly
all of them) produces no span; its cost is in the metrics. A traced event costs about a
millisecond of CPU (a dozen spans through the SDK and the exporter: benchmarks/
tracing_overhead.py); where escalations are frequent, `OTEL_TRACES_SAMPLER=traceidratio` with
`OTEL_TRACES_SAMPLER_ARG` keeps a share of them, and an event sampled out builds no span.

A traced event's tree, every span timed on the monotonic clock around the work it names
(mapped to the epoch once per process):

    event                     decode start to sink end: pipeline, tenant, key, decision, outcome
    ├─ decode                 the record into an Event
    ├─ gate                   the gate's verdict, the event folded into the key's context
    ├─ lane wait              until the key's lane took the event up (before the gate for an
    │                         event that queued behind its key's earlier one)
    ├─ reason                 the reasoner, from the event to its decision
    │  ├─ context render
    │  ├─ route               a tier choice and why: score, the tier asked for, the tiers
    │  │                      passed over and why (budget, breaker, residency)
    │  ├─ call {tier}         one model call, as the reasoner awaited it
    │  │  ├─ batch wait       until the engine started on the request's batch
    │  │  ├─ {op} {model}     the engine's `generate`, with the GenAI semantic conventions
    │  │  │  └─ queue, prefill, decode, …  the engine's own phases, where it reports them
    │  │  └─ return wait      the answer ready, until the event loop resumed the reasoner
    │  └─ decide              the answer parsed and validated
    └─ sink                   the decision handed to the sink

An event whose trace context arrives in its headers (W3C `traceparent`) joins that trace. The
reasoner's timings come from the decision's own trace (`Trace.stages`, `Trace.spans`), so a
trace and the decision record always agree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ponder.types import Decision, Event, Span

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

    from ponder.inference.engine import Engine
    from ponder.operators.gate import Verdict
    from ponder.operators.route import TierSpec

__all__ = ["Stamps", "Tracing", "from_env", "tracing_requested"]

logger = logging.getLogger(__name__)

# monotonic ns + this = epoch ns: one mapping for the process, so spans never drift apart
_EPOCH_NS = time.time_ns() - time.monotonic_ns()
_PROTOCOL = "http/protobuf"


class Stamps:
    """One event's runtime stages in monotonic ns, taken only while tracing is on."""

    __slots__ = ("decode", "decoded", "gate", "gated", "queued", "taken")

    def __init__(self, decode: int, decoded: int) -> None:
        self.decode, self.decoded = decode, decoded
        self.gate = self.gated = 0
        self.queued = self.taken = decoded  # lane wait: from admission until the lane took it


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for trace export (see the module docstring); raises
    ValueError for an exporter or protocol ponder does not ship."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {x.strip().lower() for x in env.get("OTEL_TRACES_EXPORTER", "").split(",") if x.strip()}
    unknown = exporters - {"otlp", "none"}
    if unknown:
        msg = (f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: ponder exports traces with "
               f"'otlp' only (or 'none'), not {', '.join(sorted(unknown))}")
        raise ValueError(msg)
    if exporters == {"none"}:
        return False
    if "otlp" not in exporters and not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                                        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(var, "").strip()
        if protocol:
            if protocol != _PROTOCOL:
                msg = f"{var}={protocol!r}: ponder exports traces over OTLP/HTTP only; set it to {_PROTOCOL!r}"
                raise ValueError(msg)
            break
    return True


def from_env(tiers: tuple[TierSpec, ...], engines: Mapping[str, Engine], *, pipeline: str = "",
             pseudonym: Any = None, env: Mapping[str, str] | None = None) -> Tracing | None:
    """A Tracing exporting over OTLP/HTTP as the environment says, or None when it asks for
    no traces (nothing of OpenTelemetry is imported then)."""
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"ponder.pipeline": pipeline} if pipeline else {})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "ponder"}))  # unless OTEL_SERVICE_NAME says
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the worker's close shuts it down
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, tiers, engines, pipeline=pipeline, pseudonym=pseudonym)


class Tracing:
    """Turns an escalated event's stamps and decision into spans (see the module docstring).

    :param pseudonym: `key -> str` for a pipeline with a privacy policy: traces leave the
        process, so they name a key as its prompts do.
    """

    def __init__(self, provider: TracerProvider, tiers: tuple[TierSpec, ...], engines: Mapping[str, Engine],
                 *, pipeline: str = "", pseudonym: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("ponder")
        self.pipeline, self.pseudonym = pipeline, pseudonym
        self._in = trace.set_span_in_context
        self._kind, self._status, self._code = SpanKind, Status, StatusCode
        self._propagator = TraceContextTextMapPropagator()
        # per tier: the GenAI operation (a chat endpoint, else a completion) and requested model
        self._genai: dict[str, tuple[str, str]] = {}
        for spec in tiers:
            engine = engines.get(spec.name)
            inner = getattr(engine, "inner", engine)  # behind the egress
            op = "chat" if getattr(inner, "mode", None) == "chat" else "text_completion"
            self._genai[spec.name] = (op, spec.model or str(getattr(inner, "model", "") or ""))
        self.traced = 0  # escalated events handed to the tracer (sampled out or not)
        self.failures = 0  # events whose spans could not be made (logged once)

    async def close(self) -> None:
        """Export what is buffered and stop (in a thread: an export blocks)."""
        await asyncio.to_thread(self.provider.shutdown)

    # -- one event ------------------------------------------------------------------------------

    def record(self, ev: Event, verdict: Verdict, st: Stamps, reason: tuple[int, int], sunk: int,
               decision: Decision | None, error: str = "") -> None:
        """The spans of one escalated event: `reason` is when the reasoner started and ended,
        `sunk` when the sink had the decision (None and `error`: the reasoner raised). Never
        raises: a trace that cannot be made must not stop the stream."""
        try:
            self._record(ev, verdict, st, reason, sunk, decision, error)
        except Exception as e:  # noqa: BLE001 - see above
            self.failures += 1
            if self.failures == 1:
                logger.warning("tracing an event failed (later failures are counted, not logged): %s: %s",
                               type(e).__name__, e)

    def _record(self, ev: Event, verdict: Verdict, st: Stamps, reason: tuple[int, int], sunk: int,
                decision: Decision | None, error: str) -> None:
        r0, r1 = reason
        start = min(st.decode, st.gate, st.queued)
        end = sunk if decision is not None else r1
        attrs: dict[str, Any] = {
            "ponder.pipeline": self.pipeline,
            "ponder.tenant": ev.tenant or "default",
            "ponder.key": ev.stream_key if self.pseudonym is None else self.pseudonym(ev.key),
            "ponder.source": str(ev.source),
            "ponder.gate.score": round(verdict.score, 4),
        }
        if decision is not None:
            attrs.update({"ponder.decision_id": decision.decision_id, "ponder.action": decision.action,
                          "ponder.tier": decision.tier, "ponder.degraded": decision.degraded,
                          "ponder.cost_usd": decision.usage.cost_usd})
        parent = self._propagator.extract(ev.headers) if "traceparent" in ev.headers else None
        root = self._span("event", parent, (start, end), attrs, self._kind.CONSUMER)
        self.traced += 1
        if not root.is_recording():  # sampled out (OTEL_TRACES_SAMPLER): its children would be too
            return
        ctx = self._in(root)
        whole = (start, end)
        self._leaf("decode", ctx, _clamp(st.decode, st.decoded, whole))
        self._leaf("gate", ctx, _clamp(st.gate, st.gated, whole),
                   {"ponder.gate.score": round(verdict.score, 4),
                    # what the router ranks tiers by (gate.Verdict.surprise)
                    "ponder.gate.surprise": round(verdict.surprise, 4),
                    "ponder.gate.findings": [f.kind for f in verdict.findings[:8]]})
        self._leaf("lane wait", ctx, _clamp(st.queued, st.taken, whole))
        within = _clamp(r0, r1, whole)
        rs = self._span("reason", ctx, within, error=error)
        if decision is not None and decision.trace is not None:
            rctx = self._in(rs)
            for s in decision.trace.stages:
                prefix = "ponder." + s.name.replace(" ", "_") + "."
                self._leaf(s.name, rctx, _place(r0, s, within),
                           {prefix + k: v for k, v in s.attrs.items() if v != []})
            for s in decision.trace.spans:
                self._call(s, rctx, r0, within)
        rs.end(_EPOCH_NS + within[1])
        if decision is not None:
            self._leaf("sink", ctx, _clamp(r1, sunk, whole))
        root.end(_EPOCH_NS + end)

    def _span(self, name: str, ctx: Context | None, when: tuple[int, int], attrs: dict[str, Any] | None = None,
              kind: Any = None, error: str = "") -> Any:
        """A started span (the caller ends it at `when[1]`)."""
        sp = self.tracer.start_span(name, context=ctx, kind=kind or self._kind.INTERNAL, attributes=attrs,
                                    start_time=_EPOCH_NS + when[0])
        if error:
            sp.set_status(self._status(self._code.ERROR, error[:300]))
        return sp

    def _leaf(self, name: str, ctx: Context, when: tuple[int, int], attrs: dict[str, Any] | None = None) -> None:
        self._span(name, ctx, when, attrs).end(_EPOCH_NS + when[1])

    def _call(self, s: Span, ctx: Context, base: int, within: tuple[int, int]) -> None:
        """One model call of the decision's trace, its batch wait, and its engine call."""
        a = s.attrs
        error = str(a.get("error", ""))
        when = _place(base, s, within)
        sp = self._span(f"call {s.name}", ctx, when, {"ponder.tier": s.name, "ponder.samples": a.get("samples", 1)},
                        error=error)
        cctx = self._in(sp)
        for part in s.parts:
            pw = _place(base, part, when)
            if part.name != "engine":
                self._leaf(part.name, cctx, pw)
                continue
            op, model = self._genai.get(s.name, ("text_completion", ""))
            model = model or str(a.get("model", ""))
            g = {"gen_ai.operation.name": op, "gen_ai.request.model": model,
                 "gen_ai.response.model": str(a.get("model", "")),
                 "gen_ai.usage.input_tokens": a.get("prompt_tokens", 0),
                 "gen_ai.usage.output_tokens": a.get("completion_tokens", 0),
                 "gen_ai.usage.cache_read.input_tokens": a.get("cached_prompt_tokens", 0),
                 "gen_ai.response.finish_reasons": [str(a.get("finish", ""))]}
            if a.get("samples", 1) != 1:
                g["gen_ai.request.choice.count"] = a["samples"]
            if error:
                g["error.type"] = error.split(":", 1)[0][:100]
            # named as the GenAI conventions say: "{operation} {model}"
            es = self._span(f"{op} {model}".strip(), cctx, pw, g, self._kind.CLIENT, error)
            ectx = self._in(es)
            for phase in part.parts:
                self._leaf(phase.name, ectx, _place(base, phase, pw))
            es.end(_EPOCH_NS + pw[1])
        sp.end(_EPOCH_NS + when[1])


def _clamp(t0: int, t1: int, within: tuple[int, int]) -> tuple[int, int]:
    """(t0, t1) moved inside `within`, so children nest in their parent whatever the clocks."""
    lo, hi = within
    t0 = min(max(t0, lo), hi)
    return t0, min(max(t1, t0), hi)


def _place(base: int, s: Span, within: tuple[int, int]) -> tuple[int, int]:
    """Where a span of the decision's trace lies: `s.start_ms` after `base`, the reasoner's start."""
    t0 = base + int(s.start_ms * 1e6)
    return _clamp(t0, t0 + int(s.ms * 1e6), within)

"""Prometheus metrics of a worker, read from its RunStats when scraped.

Nothing is counted twice and nothing is added to the per-event path: the collector turns the
worker's own counters into metric families at scrape time. The exception is where the time
goes: each decision's trace (its stages and calls) is observed into histograms labelled by
tenant, tier and stage when the decision is emitted (escalated events only; never by key,
whose cardinality is unbounded). The batchers' queue depth, batch sizes and engine tokens/s
are read from the batchers at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ponder.runtime.worker import Worker
    from ponder.types import Decision

__all__ = ["DecisionTimes", "WorkerCollector", "serve_metrics"]

# stages run from microseconds (a route step) to the seconds of a remote model's answer
_SECONDS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecisionTimes:
    """Histograms of where each decision's time went, observed as it is emitted."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.latency = Histogram("ponder_decision_latency_seconds", "Time from escalation to decision",
                                 ["pipeline", "tenant", "tier"], buckets=_SECONDS, registry=None)
        # stage: the reasoner's own work (context render, route, decide, summed over a decision's
        # steps), a model call ("call", by the tier called) and its parts (batch wait, engine,
        # return wait; the engine's phases as "engine queue", "engine prefill", ...)
        self.stages = Histogram("ponder_stage_seconds", "Time in one stage of a decision",
                                ["pipeline", "tenant", "tier", "stage"], buckets=_SECONDS, registry=None)
        self._children: dict[tuple[str, str, str], Histogram] = {}

    def _stage(self, tenant: str, tier: str, stage: str) -> Histogram:
        # children cached: `labels()` validates and locks on every call, a few µs each
        child = self._children.get((tenant, tier, stage))
        if child is None:
            child = self._children[(tenant, tier, stage)] = self.stages.labels(self.pipeline, tenant, tier, stage)
        return child

    def observe(self, d: Decision) -> None:
        tenant = d.tenant
        self.latency.labels(self.pipeline, tenant, d.tier).observe(d.latency_ms / 1000.0)
        if d.trace is None:
            return
        own: dict[str, float] = {}
        for st in d.trace.stages:
            own[st.name] = own.get(st.name, 0.0) + st.ms
        stage = self._stage
        for name, ms in own.items():
            stage(tenant, d.tier, name).observe(ms / 1000.0)
        for call in d.trace.spans:
            stage(tenant, call.name, "call").observe(call.ms / 1000.0)
            for part in call.parts:
                stage(tenant, call.name, part.name).observe(part.ms / 1000.0)
                for phase in part.parts:
                    stage(tenant, call.name, f"{part.name} {phase.name}").observe(phase.ms / 1000.0)

    def attach(self, worker: Worker) -> None:
        """Observe every decision `worker` emits. The worker has no hook for this, so its
        bound `_emit` is wrapped on this instance (the wrapped call stays first: a failing
        observation cannot lose a decision's write)."""
        emit = worker._emit

        def emit_observed(d: Decision) -> None:
            emit(d)
            self.observe(d)

        worker._emit = emit_observed

    def collect(self) -> Iterator:
        yield from self.latency.collect()
        yield from self.stages.collect()


class WorkerCollector(Collector):
    def __init__(self, worker: Worker, pipeline: str, times: DecisionTimes | None = None) -> None:
        self.worker = worker
        self.pipeline = pipeline
        self.times = times

    def collect(self) -> Iterator:
        w, s, p = self.worker, self.worker.stats, self.pipeline
        if self.times is not None:
            yield from self.times.collect()
        yield from self._batchers()
        for name, doc, value in (
            ("ponder_events", "Input records admitted", s.events),
            ("ponder_escalations", "Events the gate escalated to reasoning", s.escalations),
            ("ponder_dead_letters", "Records sent to the dead-letter sink", s.dead_letters),
            ("ponder_replayed_events", "Replayed events skipped because state already had them", s.replayed),
            ("ponder_degraded_decisions", "Decisions from a lower tier than wanted", s.degraded),
            ("ponder_checkpoints", "Checkpoints completed", s.checkpoints),
            ("ponder_cost_usd", "Model cost", s.cost_usd),
        ):
            c = CounterMetricFamily(name, doc, labels=["pipeline"])
            c.add_metric([p], value)
            yield c
        c = CounterMetricFamily("ponder_decisions", "Decisions emitted", labels=["pipeline", "action"])
        for action, n in s.by_action.items():
            c.add_metric([p, action], n)
        yield c
        c = CounterMetricFamily("ponder_tier_decisions", "Decisions by tier", labels=["pipeline", "tier"])
        for tier, n in s.by_tier.items():
            c.add_metric([p, tier], n)
        yield c
        c = CounterMetricFamily("ponder_tokens", "Model tokens", labels=["pipeline", "kind"])
        c.add_metric([p, "prompt"], s.prompt_tokens)
        c.add_metric([p, "cached_prompt"], s.cached_prompt_tokens)
        c.add_metric([p, "completion"], s.completion_tokens)
        yield c
        reasoner = w.logic.reasoner
        families = {
            "calls": CounterMetricFamily("ponder_tier_calls", "Model calls", labels=["pipeline", "tenant", "tier"]),
            "prompt_tokens": CounterMetricFamily("ponder_tenant_prompt_tokens", "Prompt tokens",
                                                 labels=["pipeline", "tenant", "tier"]),
            "cached_prompt_tokens": CounterMetricFamily("ponder_tenant_cached_prompt_tokens", "Prompt tokens from a cache",
                                                        labels=["pipeline", "tenant", "tier"]),
            "completion_tokens": CounterMetricFamily("ponder_tenant_completion_tokens", "Completion tokens",
                                                     labels=["pipeline", "tenant", "tier"]),
            "usd": CounterMetricFamily("ponder_tenant_cost_usd", "USD spent", labels=["pipeline", "tenant", "tier"]),
        }
        hits = GaugeMetricFamily("ponder_session_hit_ratio", "Share of prompt tokens served from a session/prefix cache",
                                 labels=["pipeline", "tenant", "tier"])
        reserved = GaugeMetricFamily("ponder_tenant_reserved_usd", "USD reserved for calls in flight",
                                     labels=["pipeline", "tenant", "tier"])
        for row in reasoner.spend.rows():
            labels = [p, row["tenant"], row["tier"]]
            for k, fam in families.items():
                fam.add_metric(labels, row[k])
            reserved.add_metric(labels, row["reserved_usd"])
            if row["prompt_tokens"]:
                hits.add_metric(labels, row["cached_prompt_tokens"] / row["prompt_tokens"])
        yield from families.values()
        yield reserved
        yield hits
        spent = GaugeMetricFamily("ponder_budget_spent_usd", "USD spent in the budget's window",
                                  labels=["pipeline", "budget", "tenant", "tier", "per"])
        left = GaugeMetricFamily("ponder_budget_remaining_usd", "USD left in the budget's window",
                                 labels=["pipeline", "budget", "tenant", "tier", "per"])
        for i, b in enumerate(reasoner.budgets.state()):
            labels = [p, str(i), b["tenant"], b["tier"], b["per"]]
            spent.add_metric(labels, b["spent_usd"])
            if b["remaining_usd"] is not None:
                left.add_metric(labels, b["remaining_usd"])
        yield spent
        yield left
        g = GaugeMetricFamily("ponder_inflight_events", "Events admitted and not done", labels=["pipeline"])
        g.add_metric([p], w._inflight)
        yield g
        g = GaugeMetricFamily("ponder_open_lanes", "Keys with reasoning in flight", labels=["pipeline"])
        g.add_metric([p], len(w._lanes))
        yield g
        g = GaugeMetricFamily("ponder_keys", "Keys held in memory", labels=["pipeline"])
        g.add_metric([p], len(w.partitions._hot))
        yield g


    def _batchers(self) -> Iterator:
        """Per batched tier: queue depth, batches in flight, batch sizes, engine busy time and
        tokens (tokens/s: the ratio of their rates). Tiers called one request at a time
        (max_batch 1) have no queue here."""
        p = self.pipeline
        batchers = self.worker._batchers
        depth = GaugeMetricFamily("ponder_queue_depth", "Requests waiting for a batch", labels=["pipeline", "tier"])
        flying = GaugeMetricFamily("ponder_batches_inflight", "Batches at the engine", labels=["pipeline", "tier"])
        sizes = HistogramMetricFamily("ponder_batch_size", "Requests per batch sent to the engine",
                                      labels=["pipeline", "tier"])
        busy = CounterMetricFamily("ponder_engine_busy_seconds", "Time the engine spent on batches (summed over "
                                   "concurrent batches)", labels=["pipeline", "tier"])
        tokens = CounterMetricFamily("ponder_engine_tokens", "Tokens through the engine's batches",
                                     labels=["pipeline", "tier", "kind"])
        for tier, b in batchers.items():
            depth.add_metric([p, tier], b.queued)
            flying.add_metric([p, tier], b.flying)
            counts = sorted(dict(b.sizes).items())  # a C-level copy: the event loop adds sizes meanwhile
            buckets = [(str(float(le)), sum(n for size, n in counts if size <= le)) for le in _BATCH]
            buckets.append(("+Inf", sum(b.sizes.values())))
            sizes.add_metric([p, tier], buckets, sum(size * n for size, n in counts))
            busy.add_metric([p, tier], b.engine_s)
            tokens.add_metric([p, tier, "prompt"], b.prompt_tokens)
            tokens.add_metric([p, tier, "completion"], b.completion_tokens)
        yield from (depth, flying, sizes, busy, tokens)


def serve_metrics(worker: Worker, pipeline: str, port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` from a background thread, observing the worker's decisions."""
    from prometheus_client import CollectorRegistry, start_http_server

    times = DecisionTimes(pipeline)
    times.attach(worker)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker, pipeline, times))
    start_http_server(port, addr=addr, registry=registry)

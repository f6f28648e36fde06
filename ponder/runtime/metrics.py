"""Prometheus metrics of a worker, read from its RunStats when scraped.

Nothing is counted twice and nothing is added to the per-event path: the collector turns the
worker's own counters into metric families at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ponder.runtime.worker import Worker

__all__ = ["WorkerCollector", "serve_metrics"]


class WorkerCollector(Collector):
    def __init__(self, worker: Worker, pipeline: str) -> None:
        self.worker = worker
        self.pipeline = pipeline

    def collect(self) -> Iterator:
        w, s, p = self.worker, self.worker.stats, self.pipeline
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
        reserved = GaugeMetricFamily("ponder_tenant_reserved_usd", "USD reserved for calls in flight",
                                     labels=["pipeline", "tenant", "tier"])
        for row in reasoner.spend.rows():
            labels = [p, row["tenant"], row["tier"]]
            for k, fam in families.items():
                fam.add_metric(labels, row[k])
            reserved.add_metric(labels, row["reserved_usd"])
        yield from families.values()
        yield reserved
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
        g.add_metric([p], w._inflight)  # noqa: SLF001 - the worker's own gauge
        yield g
        g = GaugeMetricFamily("ponder_open_lanes", "Keys with reasoning in flight", labels=["pipeline"])
        g.add_metric([p], len(w._lanes))  # noqa: SLF001
        yield g
        g = GaugeMetricFamily("ponder_keys", "Keys held in memory", labels=["pipeline"])
        g.add_metric([p], len(w.partitions._hot))  # noqa: SLF001
        yield g


def serve_metrics(worker: Worker, pipeline: str, port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` from a background thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker, pipeline))
    start_http_server(port, addr=addr, registry=registry)

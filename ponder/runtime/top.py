"""`ponder top`: a live terminal view of a running worker, from its `/metrics`.

Every `interval` seconds the worker's Prometheus endpoint is scraped (parsed with
prometheus_client's own parser) and the view is the difference between two scrapes:

1. rates: events/s, escalations/s and their share, decisions/s, degraded share, dead letters/s;
2. now: events in flight, keys with reasoning in flight, per tier queue depth and batches at the
   engine;
3. latency: p50/p95 of the decisions made between the scrapes, from the histogram's buckets;
4. money: USD/hour per tenant and tier, and each budget's remaining USD against its spend rate
   (how long it lasts at this pace).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table

__all__ = ["Scrape", "View", "scrape", "view", "render"]

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    """One scrape: sample name -> labels -> value, and when it was taken (monotonic s)."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=lambda: defaultdict(dict))

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.samples.get(name, {}).items()
                   if all(dict(labels).get(k) == x for k, x in match.items()))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            out[tuple(d.get(k, "") for k in keys)] += v
        return dict(out)


def parse(text: str, at: float) -> Scrape:
    s = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            s.samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return s


def scrape(url: str, at: float, timeout_s: float = 5.0) -> Scrape:
    """GET `url` (a worker's /metrics) -> a Scrape; a clear error if it is not one."""
    try:
        r = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as e:
        msg = f"cannot reach {url}: {type(e).__name__}: {e}"
        raise ValueError(msg) from e
    if r.status_code != 200:
        msg = f"{url} answered HTTP {r.status_code}"
        raise ValueError(msg)
    s = parse(r.text, at)
    if "ponder_events_total" not in s.samples:
        msg = f"{url} is not a ponder worker's /metrics (no ponder_events_total)"
        raise ValueError(msg)
    return s


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile from cumulative bucket counts (as Prometheus' histogram_quantile)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, prev_b, prev_c = q * total, 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_b, prev_c = b, c
    return prev_b


@dataclass
class View:
    seconds: float
    events_s: float
    escalations_s: float
    decisions_s: float
    degraded_share: float
    dead_letters_s: float
    inflight: float
    open_lanes: float
    tiers: dict[str, tuple[float, float]]  # tier -> (queue depth, batches at the engine)
    p50_ms: float | None
    p95_ms: float | None
    spend_usd_h: dict[tuple[str, str], float]  # (tenant, tier) -> USD per hour
    budgets: list[tuple[str, float, float]]  # (name, remaining USD, USD per hour spent)


def view(a: Scrape, b: Scrape) -> View:
    """What happened between scrape `a` and the later scrape `b`."""
    dt = max(b.at - a.at, 1e-9)

    def rate(name: str) -> float:
        return max(b.total(name) - a.total(name), 0.0) / dt

    decisions = max(b.total("ponder_decisions_total") - a.total("ponder_decisions_total"), 0.0)
    degraded = max(b.total("ponder_degraded_decisions_total") - a.total("ponder_degraded_decisions_total"), 0.0)
    buckets: dict[float, float] = {}
    for (le,), v in b.by("ponder_decision_latency_seconds_bucket", "le").items():
        buckets[float(le)] = v - a.by("ponder_decision_latency_seconds_bucket", "le").get((le,), 0.0)
    p50, p95 = _quantile(0.5, buckets), _quantile(0.95, buckets)
    depth = b.by("ponder_queue_depth", "tier")
    flying = b.by("ponder_batches_inflight", "tier")
    tiers = {t: (depth.get((t,), 0.0), flying.get((t,), 0.0)) for (t,) in sorted(set(depth) | set(flying))}
    before = a.by("ponder_tenant_cost_usd_total", "tenant", "tier")
    spend = {k: max(v - before.get(k, 0.0), 0.0) / dt * 3600.0
             for k, v in sorted(b.by("ponder_tenant_cost_usd_total", "tenant", "tier").items())}
    budgets = []
    left_a = a.by("ponder_budget_remaining_usd", "budget", "tenant", "tier", "per")
    for k, left in sorted(b.by("ponder_budget_remaining_usd", "budget", "tenant", "tier", "per").items()):
        _, tenant, tier, per = k
        used = max(left_a.get(k, left) - left, 0.0) / dt * 3600.0
        budgets.append((f"tenant={tenant} tier={tier} per {per}", left, used))
    return View(dt, rate("ponder_events_total"), rate("ponder_escalations_total"), decisions / dt,
                degraded / decisions if decisions else 0.0, rate("ponder_dead_letters_total"),
                b.total("ponder_inflight_events"), b.total("ponder_open_lanes"), tiers,
                None if p50 is None else p50 * 1000.0, None if p95 is None else p95 * 1000.0, spend, budgets)


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def render(v: View, url: str) -> Group:
    head = Table(title=f"ponder top: {url} (last {v.seconds:.1f} s)", show_header=True)
    for c in ("events/s", "escalated/s", "escalated %", "decisions/s", "degraded %", "dead letters/s",
              "in flight", "reasoning keys", "p50 ms", "p95 ms"):
        head.add_column(c, justify="right")
    share = 100.0 * v.escalations_s / v.events_s if v.events_s else 0.0
    head.add_row(f"{v.events_s:,.0f}", f"{v.escalations_s:,.1f}", f"{share:.2f}", f"{v.decisions_s:,.1f}",
                 f"{100.0 * v.degraded_share:.1f}", f"{v.dead_letters_s:,.1f}", f"{v.inflight:,.0f}",
                 f"{v.open_lanes:,.0f}", _ms(v.p50_ms), _ms(v.p95_ms))
    tiers = Table(title="tiers", show_header=True)
    for c in ("tier", "queued", "batches at engine"):
        tiers.add_column(c, justify="right")
    for t, (q, f) in v.tiers.items():
        tiers.add_row(t, f"{q:,.0f}", f"{f:,.0f}")
    money = Table(title="spend", show_header=True)
    for c in ("tenant", "tier", "USD/hour"):
        money.add_column(c, justify="right")
    for (tenant, tier), usd in v.spend_usd_h.items():
        money.add_row(tenant, tier, f"{usd:.4f}")
    caps = Table(title="budgets", show_header=True)
    for c in ("budget", "remaining USD", "spending USD/hour", "lasts at this pace"):
        caps.add_column(c, justify="right")
    for name, left, rate in v.budgets:
        lasts = "–" if rate <= 0 else f"{left / rate * 60.0:,.0f} min"
        caps.add_row(name, f"{left:.4f}", f"{rate:.4f}", lasts)
    return Group(head, tiers, money, caps)

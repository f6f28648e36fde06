"""`ponder top`'s arithmetic: rates, latency quantiles and budget pace between two scrapes of a
worker's /metrics (the live path against a real worker is in tests/test_dashboard.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ponder.cli import app
from ponder.runtime.top import _quantile, parse, view

BEFORE = """\
# TYPE ponder_events counter
ponder_events_total{pipeline="p"} 1000
# TYPE ponder_escalations counter
ponder_escalations_total{pipeline="p"} 10
# TYPE ponder_decisions counter
ponder_decisions_total{pipeline="p",action="none"} 6
ponder_decisions_total{pipeline="p",action="alert"} 4
# TYPE ponder_degraded_decisions counter
ponder_degraded_decisions_total{pipeline="p"} 1
# TYPE ponder_dead_letters counter
ponder_dead_letters_total{pipeline="p"} 0
# TYPE ponder_tenant_cost_usd counter
ponder_tenant_cost_usd_total{pipeline="p",tenant="acme",tier="cloud"} 0.5
# TYPE ponder_budget_remaining_usd gauge
ponder_budget_remaining_usd{pipeline="p",budget="0",tenant="acme",tier="cloud",per="1h"} 2.0
# TYPE ponder_decision_latency_seconds histogram
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="0.1"} 5
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="1.0"} 10
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="+Inf"} 10
"""

AFTER = """\
# TYPE ponder_events counter
ponder_events_total{pipeline="p"} 3000
# TYPE ponder_escalations counter
ponder_escalations_total{pipeline="p"} 30
# TYPE ponder_decisions counter
ponder_decisions_total{pipeline="p",action="none"} 16
ponder_decisions_total{pipeline="p",action="alert"} 14
# TYPE ponder_degraded_decisions counter
ponder_degraded_decisions_total{pipeline="p"} 6
# TYPE ponder_dead_letters counter
ponder_dead_letters_total{pipeline="p"} 4
# TYPE ponder_inflight_events gauge
ponder_inflight_events{pipeline="p"} 12
# TYPE ponder_queue_depth gauge
ponder_queue_depth{pipeline="p",tier="edge"} 3
# TYPE ponder_batches_inflight gauge
ponder_batches_inflight{pipeline="p",tier="edge"} 1
# TYPE ponder_tenant_cost_usd counter
ponder_tenant_cost_usd_total{pipeline="p",tenant="acme",tier="cloud"} 0.6
# TYPE ponder_budget_remaining_usd gauge
ponder_budget_remaining_usd{pipeline="p",budget="0",tenant="acme",tier="cloud",per="1h"} 1.9
# TYPE ponder_decision_latency_seconds histogram
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="0.1"} 15
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="1.0"} 30
ponder_decision_latency_seconds_bucket{pipeline="p",tenant="acme",tier="edge",le="+Inf"} 30
"""


def test_the_view_is_the_difference_between_two_scrapes():
    v = view(parse(BEFORE, 100.0), parse(AFTER, 110.0))
    assert (v.seconds, v.events_s, v.escalations_s, v.decisions_s, v.dead_letters_s) == (10.0, 200.0, 2.0, 2.0, 0.4)
    assert v.degraded_share == pytest.approx(5 / 20)
    assert (v.inflight, v.tiers) == (12.0, {"edge": (3.0, 1.0)})
    # 20 decisions in the window: 10 under 0.1 s, 10 in (0.1, 1]; interpolated as Prometheus does
    assert v.p50_ms == pytest.approx(100.0) and v.p95_ms == pytest.approx((0.1 + 0.9 * 0.9) * 1000)
    assert v.spend_usd_h == {("acme", "cloud"): pytest.approx(0.1 / 10 * 3600)}
    ((name, left, rate),) = v.budgets
    assert (name, left) == ("tenant=acme tier=cloud per 1h", 1.9) and rate == pytest.approx(36.0)


def test_quantiles_follow_histogram_quantile():
    assert _quantile(0.5, {}) is None
    assert _quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    assert _quantile(0.5, {1.0: 4.0, 2.0: 8.0, float("inf"): 8.0}) == pytest.approx(1.0)
    assert _quantile(0.99, {1.0: 1.0, float("inf"): 2.0}) == 1.0  # in +Inf: the highest finite bound


def test_top_says_clearly_what_is_wrong_with_its_target():
    r = CliRunner().invoke(app, ["top", "http://127.0.0.1:9/metrics", "--once"])
    assert r.exit_code == 2 and "cannot reach http://127.0.0.1:9/metrics" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["top", "http://127.0.0.1:9/metrics", "--interval", "0"])
    assert r.exit_code == 2 and "--interval must be > 0" in r.output

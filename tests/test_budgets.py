"""Budgets that hold: a call's worst case is reserved before it is sent and settled with its
actual cost, so a storm of concurrent escalations cannot pass a cap; reservations are released
on failure and on timeout; per-tenant caps; pacing past `soft`; windows on the wall clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request
from ponder.operators.budget import Budget, Budgets
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.worker import Worker
from ponder.types import Usage

ANSWER = json.dumps({"action": "alert", "severity": "high", "reason": "r", "confidence": 0.9})
PRICE = Price(prompt=1.0, cached_prompt=0.1, completion=2.0)
USAGE = Usage(1_000, 200, 50)
CALL_USD = (800 * 1.0 + 200 * 0.1 + 50 * 2.0) / 1e6  # 0.00092


class Slow:
    """An engine that takes `delay_s` per batch; `fail` makes it raise instead."""

    name = "slow"

    def __init__(self, delay_s: float = 0.02, fail: bool = False) -> None:
        self.delay_s, self.fail, self.requests = delay_s, fail, 0

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests: list[Request]) -> list[Completion]:
        self.requests += len(requests)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("backend down")
        return [Completion(ANSWER, USAGE, "m") for _ in requests]


def pipeline(budgets, tenant=None, timeout_s=30.0) -> Pipeline:
    return Pipeline(name="b", key="k", time="ts", actions=("none", "alert"), tenant=tenant, budgets=budgets,
                    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("flag", lambda e: True),)),
                    tiers=(TierSpec("reflex", max_batch=1),
                           TierSpec("edge", engine="reflex", min_score=0.5, max_batch=8, max_wait_ms=1.0,
                                    price=PRICE, timeout_s=timeout_s)))


async def run(pipe: Pipeline, items, edge) -> tuple[list, Budgets]:
    logic, decoder, engines = pipe.build(engines={"edge": edge})
    sink = MemorySink()
    await Worker(logic, decoder, MemorySource(items), sink, engines, pipe.tiers).run()
    return sink.decisions, logic.reasoner.budgets


async def test_a_storm_of_escalations_never_passes_the_cap_and_the_books_balance():
    cap = 0.02
    items = [{"k": f"dev-{i}", "ts": 1.0} for i in range(300)]  # every key escalates at once
    decisions, budgets = await run(pipeline((Budget(tier="edge", usd=cap, per="1d"),)), items, Slow())
    edge = [d for d in decisions if d.tier == "edge"]
    refused = [d for d in decisions if d.tier == "reflex"]
    assert len(decisions) == 300 and edge and refused
    spent = sum(d.usage.cost_usd for d in edge)
    (state,) = budgets.state()
    assert spent == pytest.approx(len(edge) * CALL_USD) and spent <= cap * 1.01
    assert state["spent_usd"] == pytest.approx(spent, abs=1e-12) and state["reserved_usd"] == 0.0
    assert state["spent_tokens"] == len(edge) * 1_050 and state["reserved_tokens"] == 0
    for d in refused:  # downgraded, and the trace says by which budget
        assert d.degraded and any(s.startswith("edge: budget tier=edge: $") and "per 1d" in s for s in d.trace.skipped)


@pytest.mark.parametrize("how", ["fails", "times out"])
async def test_reservations_are_released_when_a_call_fails_or_times_out(how):
    edge = Slow(fail=True) if how == "fails" else Slow(delay_s=2.0)
    pipe = pipeline((Budget(tier="edge", usd=1.0, per="1h"),), timeout_s=0.2)
    decisions, budgets = await run(pipe, [{"k": f"d{i}", "ts": 1.0} for i in range(5)], edge)
    (state,) = budgets.state()
    assert edge.requests == 5 and all(d.tier == "reflex" and d.degraded for d in decisions)
    assert (state["reserved_usd"], state["spent_usd"], state["reserved_tokens"]) == (0.0, 0.0, 0)


async def test_a_tenants_cap_stops_that_tenant_only():
    items = [{"k": "pump", "org": org, "ts": float(i)} for i in range(3) for org in ("acme", "globex")]
    decisions, budgets = await run(pipeline((Budget(tenant="acme", usd=0.0),), tenant="org"), items, Slow())
    tiers = {(d.tenant, d.tier) for d in decisions}
    assert tiers == {("acme", "reflex"), ("globex", "edge")}
    assert budgets.state()[0]["spent_usd"] == 0.0


def test_pacing_past_soft_keeps_only_high_scores_while_spending_runs_ahead_of_the_window():
    now = [3600.0 * 10]  # the start of an hour
    b = Budgets((Budget(usd=1.0, per="1h", soft=0.8),), clock=lambda: now[0])
    hold, _ = b.reserve("t", "cloud", tokens=1, usd=0.85, score=1.0, min_score=0.5)
    b.settle(hold, usd=0.85, tokens=1)
    now[0] += 360  # 10% into the hour, 85% spent: the bar is 0.5 + 0.5 * 0.05 / 0.2 = 0.625
    low = b.reserve("t", "cloud", tokens=1, usd=0.01, score=0.6, min_score=0.5)
    assert low[0] is None and low[1] == "budget *: pacing, 85% used 10% into its 1h: score 0.60 < 0.62"
    high, why = b.reserve("t", "cloud", tokens=1, usd=0.01, score=0.7, min_score=0.5)
    assert high is not None and why is None
    b.settle(high, usd=0.0, tokens=0)
    now[0] += 3000  # 93% into the hour: spending no longer runs ahead, no pacing
    assert b.reserve("t", "cloud", tokens=1, usd=0.01, score=0.55, min_score=0.5)[1] is None


def test_windows_follow_the_wall_clock_and_a_new_one_starts_empty():
    now = [100.0]
    b = Budgets((Budget(tokens=100, per="1m"),), clock=lambda: now[0])
    hold, _ = b.reserve("t", "edge", tokens=90, usd=0.0, score=1, min_score=0)
    b.settle(hold, usd=0.0, tokens=90)
    assert b.reserve("t", "edge", tokens=20, usd=0.0, score=1, min_score=0)[1] == (
        "budget *: 20 more tokens would pass its cap of 100 per 1m (90 spent, 0 reserved)")
    now[0] = 120.0  # the minute starting at 120 s
    assert b.reserve("t", "edge", tokens=20, usd=0.0, score=1, min_score=0)[1] is None
    assert b.state()[0]["window_start"] == 120.0


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="Budget needs a cap"):
        Budget(tier="edge")
    with pytest.raises(ValueError, match=r"Budget.soft must be in \(0, 1\]"):
        Budget(usd=1.0, soft=0.0)


def test_ponder_run_writes_the_ledger_and_metrics_carry_tenant_and_tier(tmp_path, monkeypatch):
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from typer.testing import CliRunner

    from ponder.cli import app
    from ponder.runtime.metrics import WorkerCollector

    (tmp_path / "ledger_pipe.py").write_text(
        "from ponder import Budget, GatePolicy, Pipeline, Price, Rule, TierSpec\n"
        "pipeline = Pipeline(name='l', key='k', time='ts', actions=('none', 'alert'), tenant='org',\n"
        "    budgets=(Budget(tier='edge', usd=1.0, per='1d'),),\n"
        "    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule('flag', lambda e: True),)),\n"
        "    tiers=(TierSpec('reflex', max_batch=1), TierSpec('edge', engine='reflex', min_score=0.5,\n"
        "           max_batch=1, price=Price(prompt=1.0, completion=2.0))))\n")
    events = tmp_path / "in.jsonl"
    events.write_text("".join(json.dumps({"k": f"d{i}", "org": org, "ts": 1.0}) + "\n"
                              for i in range(3) for org in ("acme", "globex")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ledger = tmp_path / "ledger.json"
    result = CliRunner().invoke(app, ["run", "ledger_pipe:pipeline", "--input", str(events), "--output",
                                      str(tmp_path / "out.jsonl"), "--ledger", str(ledger)])
    assert result.exit_code == 0, result.output
    doc = json.loads(ledger.read_text())
    rows = {(r["tenant"], r["tier"]): r for r in doc["spend"]}
    assert set(rows) == {("acme", "edge"), ("globex", "edge")} and doc["pipeline"] == "l"
    assert all(r["calls"] == 3 and r["reserved_usd"] == 0.0 for r in rows.values())
    (budget,) = doc["budgets"]
    assert budget["cap_usd"] == 1.0 and budget["reserved_usd"] == 0.0
    assert budget["spent_usd"] == pytest.approx(sum(r["usd"] for r in rows.values()))
    sys.modules.pop("ledger_pipe", None)
    # the same figures as Prometheus families, labelled by tenant and tier (no key labels)
    pipe = pipeline((Budget(tier="edge", usd=1.0),), tenant="org")
    logic, decoder, engines = pipe.build(engines={"edge": Slow()})
    w = Worker(logic, decoder, MemorySource([{"k": "a", "org": "acme", "ts": 1.0}]), MemorySink(), engines, pipe.tiers)
    asyncio.run(w.run())
    reg = CollectorRegistry()
    reg.register(WorkerCollector(w, "b"))
    text = generate_latest(reg).decode()
    assert 'ponder_tier_calls_total{pipeline="b",tenant="acme",tier="edge"} 1.0' in text
    assert f'ponder_tenant_cost_usd_total{{pipeline="b",tenant="acme",tier="edge"}} {CALL_USD}' in text
    assert 'ponder_budget_remaining_usd{budget="0",per="1h",pipeline="b",tenant="*",tier="edge"} 1.0' not in text
    assert 'ponder_budget_spent_usd{budget="0",per="1h",pipeline="b",tenant="*",tier="edge"} ' + str(CALL_USD) in text


def test_each_partition_owns_a_share_and_its_account_moves_with_it():
    """Two workers of one group, four partitions: each partition may spend a quarter of the
    cap; a partition's spend travels in its checkpoint bookkeeping to its next owner, so the
    group as a whole never spends past the cap however partitions move."""
    now = [7200.0]
    cap = Budget(tier="edge", usd=1.0, per="1h")
    w1, w2 = (Budgets((cap,), clock=lambda: now[0], slices=4) for _ in range(2))

    def spend(b: Budgets, partition: int, usd: float) -> str | None:
        hold, why = b.reserve("t", "edge", tokens=1, usd=usd, score=1.0, min_score=0.0, partition=partition)
        if hold is not None:
            b.settle(hold, usd=usd, tokens=1)
        return why

    for p in (0, 1):
        assert spend(w1, p, 0.2) is None and spend(w1, p, 0.05) is None
        assert spend(w1, p, 0.01).startswith("budget tier=edge: $0.01 more would pass its cap of $1 per 1h "
                                             "(a partition's share: 1/4) ($0.25 spent")
    for p in (2, 3):
        assert spend(w2, p, 0.25) is None
    # partition 1 moves from worker 1 to worker 2 with its checkpoint bookkeeping
    meta = w1.meta(1)
    w1.forget(1)
    w2.restore(1, meta)
    assert spend(w2, 1, 0.01) is not None  # its share was spent where it came from
    total = sum(s["spent_usd"] for b in (w1, w2) for s in b.state())
    assert total == pytest.approx(1.0) and total <= 1.0 * 1.01
    # a new hour: the account restored from an old window starts empty
    now[0] += 3600
    w1.restore(0, w1.meta(0) | {k: v - 3600 for k, v in w1.meta(0).items() if k.endswith(".window")})
    assert spend(w1, 0, 0.25) is None


def test_budgets_that_could_never_apply_are_refused_when_the_pipeline_is_made():
    with pytest.raises(ValueError, match=r"a budget names tier 'clud', not one of \['edge', 'reflex'\]"):
        pipeline((Budget(tier="clud", usd=1.0),))
    with pytest.raises(ValueError, match="a budget names tenant 'acme' but the pipeline has no tenants"):
        pipeline((Budget(tenant="acme", usd=1.0),))
    with pytest.raises(ValueError, match="a USD budget covers tier 'edge', which has no price"):
        Pipeline(name="u", key="k", actions=("none",), budgets=(Budget(usd=1.0),),
                 tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine="reflex")))
    # a token cap needs no price
    Pipeline(name="u", key="k", actions=("none",), budgets=(Budget(tokens=1_000),),
             tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine="reflex")))

"""A pipeline for tests/test_dashboard.py (its worker subprocess imports it from tests/).

Two tenants, two batched model tiers (fake engines: no model runs here) and a budget, so that
every panel of the Grafana dashboard has something to show: decisions by action and tier,
spend by tenant and tier, budget remaining, degraded decisions (the cloud tier refuses one
tenant, so its events fall back to the edge) and, with poison records, dead letters.
"""

from __future__ import annotations

from ponder import Budget, GatePolicy, Pipeline, Price, Rule, TierSpec
from ponder.inference.engine import Completion, EngineError
from ponder.types import Usage

ANSWER = '{"action":"alert","severity":"high","reason":"r","confidence":0.9}'


class Edge:
    """Answers at once, reporting a partly cached prompt and the engine's phases."""

    name = "edge"

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        return [Completion(ANSWER, Usage(1_000, 600, 20), "edge-1",
                           timings={"queue": 0.001, "prefill": 0.002, "decode": 0.003}) for _ in requests]


class Cloud(Edge):
    """Refuses tenant globex's requests (its decisions fall back to the edge: degraded)."""

    name = "cloud"

    async def generate(self, requests):
        if any(r.tenant == "globex" for r in requests):
            msg = "cloud refuses globex"
            raise EngineError(msg)
        return await super().generate(requests)


pipeline = Pipeline(
    name="dash", key="k", time="ts", tenant="tenant", actions=("none", "alert"),
    budgets=(Budget(tenant="acme", tier="cloud", usd=100.0, per="1d"),),
    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("always", lambda e: True),)),
    tiers=(TierSpec("reflex", max_batch=1),
           TierSpec("edge", engine=Edge(), min_score=0.5, max_batch=8, max_wait_ms=2, price=Price(prompt=1.0)),
           TierSpec("cloud", engine=Cloud(), min_score=0.5, max_batch=8, max_wait_ms=2, failures=1000,
                    price=Price(prompt=2.0))))

"""Pipelines for tests/test_kafka_budgets.py (worker subprocesses import them from tests/)."""

from __future__ import annotations

from ponder import Budget, GatePolicy, Pipeline, Price, Rule, TierSpec
from ponder.inference.engine import Completion
from ponder.types import Usage

CAP_USD = 0.02
CALL_USD = 0.001  # 1,000 prompt tokens at $1 per million


class Costly:
    """A fake model tier (no model runs here): answers at once, reporting 1,000 prompt tokens."""

    name = "costly"

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        answer = '{"action":"alert","severity":"high","reason":"r","confidence":0.9}'
        return [Completion(answer, Usage(1_000, 0, 0), "costly-1") for _ in requests]


capped = Pipeline(
    name="capped", key="k", time="ts", actions=("none", "alert"),
    budgets=(Budget(tier="edge", usd=CAP_USD, per="1d"),),
    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("always", lambda e: True),)),
    tiers=(TierSpec("reflex", max_batch=1),
           TierSpec("edge", engine=Costly(), min_score=0.5, max_batch=1, price=Price(prompt=1.0))))

"""The router's circuit breaker, driven by an injected clock: closed -> open after `failures`
consecutive failures -> after `cooloff_s` exactly one half-open probe -> closed on its success,
open again on its failure. Plus why each skipped tier was skipped."""

from __future__ import annotations

import asyncio

import pytest

from ponder.operators.route import SKIP_BUDGET, SKIP_OPEN, SKIP_PROBING, Router, TierSpec

EDGE_OPEN = f"edge: {SKIP_OPEN}"
EDGE_PROBING = f"edge: {SKIP_PROBING}"


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def router(clock: Clock, **edge: object) -> Router:
    kw = {"min_score": 0.5, "failures": 3, "cooloff_s": 10.0, "timeout_s": 4.0, "max_wait_ms": 0.0, **edge}
    return Router((TierSpec("reflex"), TierSpec("edge", **kw)), clock=clock)


def open_breaker(r: Router, n: int = 3) -> None:
    for _ in range(n):
        assert r.first(1.0) == "edge"
        r.failed("edge")


def test_opens_after_consecutive_failures_only():
    clock = Clock()
    r = router(clock)
    open_breaker(r, 2)
    r.succeeded("edge", 0)  # a success in between resets the count
    open_breaker(r, 2)
    assert r.breaker("edge") == "closed" and r.first(1.0) == "edge"
    r.failed("edge")
    assert r.breaker("edge") == "open"
    skipped: list[str] = []
    assert r.first(1.0, skipped=skipped) == "reflex"
    assert skipped == [EDGE_OPEN]
    assert r.stats("edge") == {"calls": 1, "opened": 1, "probes": 0}


def test_one_probe_after_cooloff_and_its_success_closes():
    clock = Clock()
    r = router(clock)
    open_breaker(r)
    clock.t = 109.999
    assert r.first(1.0) == "reflex"
    clock.t = 110.0
    assert r.breaker("edge") == "half-open"
    assert r.first(1.0) == "edge"  # the probe
    # while it is out, every other event is downgraded at once, with the reason
    for _ in range(50):
        skipped: list[str] = []
        assert r.first(1.0, skipped=skipped) == "reflex"
        assert skipped == [EDGE_PROBING]
    assert r.stats("edge")["probes"] == 1
    r.succeeded("edge", 10)
    assert r.breaker("edge") == "closed"
    assert [r.first(1.0) for _ in range(5)] == ["edge"] * 5
    # closed again means a fresh count: it takes `failures` failures to reopen
    open_breaker(r, 2)
    assert r.breaker("edge") == "closed"


def test_probe_failure_reopens_for_a_whole_cooloff():
    clock = Clock()
    r = router(clock)
    open_breaker(r)
    clock.t = 115.0  # a while after the cool-off: the probe goes when the next event comes
    assert r.first(1.0) == "edge"
    clock.t = 115.5
    r.failed("edge")  # one failure is enough in half-open state
    assert r.breaker("edge") == "open"
    clock.t = 125.499
    skipped: list[str] = []
    assert r.first(1.0, skipped=skipped) == "reflex" and skipped == [EDGE_OPEN]
    clock.t = 125.5
    assert r.first(1.0) == "edge" and r.first(1.0) == "reflex"
    assert r.stats("edge") == {"calls": 0, "opened": 2, "probes": 2}


def test_outcomes_of_calls_sent_before_it_opened_do_not_move_it():
    clock = Clock()
    r = router(clock)
    for _ in range(5):  # five calls out at once, as a batch would be
        assert r.first(1.0) == "edge"
    for _ in range(3):
        r.failed("edge")
    assert r.stats("edge")["opened"] == 1
    clock.t = 109.0
    r.failed("edge")  # a late failure does not push the end of the cool-off
    r.succeeded("edge", 0)  # nor does a late success close it early
    assert r.breaker("edge") == "open" and r.first(1.0) == "reflex"
    clock.t = 110.0
    assert r.first(1.0) == "edge"
    assert r.stats("edge")["opened"] == 1


def test_a_probe_that_never_reports_frees_the_slot_after_the_tier_timeout():
    clock = Clock()
    r = router(clock, timeout_s=4.0, max_wait_ms=500.0)
    open_breaker(r)
    clock.t = 110.0
    assert r.first(1.0) == "edge"  # its task is cancelled: no outcome ever comes
    clock.t = 114.499
    assert r.first(1.0) == "reflex"
    clock.t = 114.5  # timeout_s + max_wait_ms after the probe went out
    assert r.first(1.0) == "edge" and r.first(1.0) == "reflex"
    assert r.stats("edge")["probes"] == 2


async def test_concurrent_escalations_in_half_open_state_send_one_probe():
    """Fifty keys escalate in the same instant: each checks the router and then awaits its
    call, as Reasoner.decide does. Only one of them may reach the backend."""
    clock = Clock()
    r = router(clock)
    open_breaker(r)
    clock.t = 110.0
    release = asyncio.Event()
    sent: list[int] = []
    skips: list[list[str]] = []

    async def decide(i: int) -> str:
        skipped: list[str] = []
        tier = r.first(1.0, skipped=skipped)
        skips.append(skipped)
        if tier == "edge":
            sent.append(i)
            await release.wait()  # the backend answers only after everyone has checked
            r.succeeded("edge", 0)
        else:
            await asyncio.sleep(0)
        return tier

    tasks = [asyncio.create_task(decide(i)) for i in range(50)]
    while len(skips) < 50:
        await asyncio.sleep(0)
    release.set()
    tiers = await asyncio.gather(*tasks)
    assert len(sent) == 1 and tiers.count("edge") == 1 and tiers.count("reflex") == 49
    assert sorted(skips) == [[]] + [[EDGE_PROBING]] * 49
    assert r.breaker("edge") == "closed"


def test_a_tier_the_budget_cannot_pay_for_is_skipped_without_taking_the_probe():
    clock = Clock()
    r = router(clock, tokens_per_minute=600)
    open_breaker(r)
    clock.t = 110.0
    skipped: list[str] = []
    assert r.first(1.0, need=601, skipped=skipped) == "reflex"
    assert skipped == [f"edge: {SKIP_BUDGET}"]
    assert r.stats("edge")["probes"] == 0  # the slot is still free for a call that fits
    assert r.first(1.0, need=100) == "edge"
    assert r.stats("edge")["probes"] == 1


def test_skips_are_recorded_once_by_every_walk():
    clock = Clock()
    tiers = (TierSpec("reflex"), TierSpec("edge", min_score=0.5, failures=1, cooloff_s=10.0),
             TierSpec("cloud", min_score=0.9, failures=1, cooloff_s=10.0))
    r = Router(tiers, clock=clock)
    assert r.first(1.0) == "cloud"
    r.failed("cloud")
    assert r.first(0.6) == "edge"
    r.failed("edge")
    skipped: list[str] = []
    assert r.first(1.0, skipped=skipped) == "reflex"
    assert skipped == [f"cloud: {SKIP_OPEN}", EDGE_OPEN]
    # up and down add what they pass over, without repeating an entry
    assert r.up("reflex", {"reflex"}, skipped=skipped) is None
    assert r.down("cloud", {"cloud"}, skipped=skipped) == "reflex"
    assert skipped == [f"cloud: {SKIP_OPEN}", EDGE_OPEN]
    assert r.first(0.1, skipped=skipped) == "reflex"  # a tier the score does not reach is no skip
    assert len(skipped) == 2


@pytest.mark.parametrize("kw", [{"failures": 0}, {"cooloff_s": -1.0}])
def test_bad_breaker_settings_are_refused(kw):
    with pytest.raises(ValueError, match="tier 'edge': failures must be >= 1 and cooloff_s >= 0"):
        TierSpec("edge", **kw)

"""The batcher shares a saturated tier fairly: deficit round robin over tenants' queues, by
weight, FIFO within a tenant; a flooding tenant delays another by about one round."""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ponder.inference.engine import Completion, Request
from ponder.runtime.batcher import Batcher
from ponder.types import Usage


class Gate:
    """An engine that records each batch and answers once `open` is set."""

    name = "gate"

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.batches: list[list[str]] = []

    async def generate(self, requests):
        self.batches.append([r.request_id for r in requests])
        await self.open.wait()
        return [Completion("{}", Usage(), "m") for _ in requests]


def request(tenant: str, i: int) -> Request:
    return Request(f"{tenant}-{i}", "p", "t", 8, ("none",), {}, request_id=f"{tenant}:{i}", tenant=tenant)


async def serve(arrivals: list[str], weights: dict[str, float], max_batch: int, fair: bool = True) -> list[str]:
    """Queue everything behind one batch in flight, then let it all through: the service order."""
    eng = Gate()
    b = Batcher(eng, max_batch=max_batch, max_wait_s=0.001, max_concurrency=1, weights=weights, fair=fair)
    blocker = asyncio.ensure_future(b.submit(request("z", 0)))
    while not eng.batches:  # the blocker's batch is out: the tier is saturated
        await asyncio.sleep(0.001)
    counts: dict[str, int] = {}
    waits = []
    for t in arrivals:
        counts[t] = counts.get(t, 0) + 1
        waits.append(asyncio.ensure_future(b.submit(request(t, counts[t]))))
    await asyncio.sleep(0.01)
    eng.open.set()
    await asyncio.gather(blocker, *waits)
    await b.close()
    return [rid for batch in eng.batches[1:] for rid in batch]


@settings(max_examples=60, deadline=None)
@example(arrivals=["a"] * 5 + ["b"], weights={"a": 2.0, "b": 3.0, "c": 0.5}, max_batch=1)  # scaled quanta
@given(arrivals=st.lists(st.sampled_from("abc"), min_size=1, max_size=60),
       weights=st.fixed_dictionaries({t: st.sampled_from([0.5, 1.0, 2.0, 3.0]) for t in "abc"}),
       max_batch=st.integers(1, 8))
def test_drr_order_is_fifo_per_tenant_and_proportional_to_weight(arrivals, weights, max_batch):
    order = asyncio.run(serve(arrivals, weights, max_batch))
    assert sorted(order) == sorted(f"{t}:{i}" for t in set(arrivals) for i in range(1, arrivals.count(t) + 1))
    served = {t: 0 for t in weights}
    total = {t: arrivals.count(t) for t in weights}
    for rid in order:
        t, i = rid.split(":")
        served[t] += 1
        assert int(i) == served[t]  # FIFO within a tenant
        backlogged = [u for u in weights if served[u] < total[u]]
        # while two tenants both still wait, their weighted service differs by at most a turn
        # (a turn's quantum is weight / unit: the smallest weight sends one request a turn)
        unit = min(1.0, *weights.values())
        for u in backlogged:
            for v in backlogged:
                assert served[u] / weights[u] - served[v] / weights[v] <= 1 / unit + 1 / weights[u] + 1 / weights[v]


async def test_a_flood_delays_another_tenant_by_about_one_round_and_fifo_by_the_whole_flood():
    arrivals = ["a"] * 200 + ["b"] * 4
    fair = await serve(arrivals, {}, max_batch=4)
    fifo = await serve(arrivals, {}, max_batch=4, fair=False)
    assert max(fair.index(f"b:{i}") for i in range(1, 5)) < 12  # b's 4 go within 3 batches
    assert min(fifo.index(f"b:{i}") for i in range(1, 5)) == 200  # behind all of a's


async def test_no_tenant_is_one_queue_and_a_full_batch_goes_at_once():
    eng = Gate()
    eng.open.set()
    b = Batcher(eng, max_batch=3, max_wait_s=10.0, max_concurrency=2)
    out = await asyncio.wait_for(asyncio.gather(*(b.submit(request("", i)) for i in range(3))), 1.0)
    assert len(out) == 3 and eng.batches == [[":0", ":1", ":2"]]


async def test_tiny_weights_still_send_every_turn_and_bad_weights_are_refused():
    order = await asyncio.wait_for(serve(["a"] * 5 + ["b"] * 5, {"a": 1e-300, "b": 2e-300}, max_batch=2), 5.0)
    assert order[:3] == ["a:1", "b:1", "b:2"]  # proportions kept: b twice a's share
    for bad in (0.0, float("inf"), -1.0):
        try:
            Batcher(Gate(), weights={"a": bad})
        except ValueError as e:
            assert str(e) == f"tenant weights must be finite and > 0, got {{'a': {bad}}}"
        else:
            raise AssertionError(f"weight {bad} accepted")

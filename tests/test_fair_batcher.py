"""The batcher shares a saturated tier fairly: deficit round robin over tenants' queues, by
weight, FIFO within a tenant; a flooding tenant delays another by about one round; the last free
slot is kept for a tenant below its share of the slots, so a flood does not make it wait for one."""

from __future__ import annotations

import asyncio

import pytest
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


class Slots:
    """An engine whose batches each wait until released one by one (or all, once `open`)."""

    name = "slots"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.open = False

    async def generate(self, requests):
        self.batches.append([r.request_id for r in requests])
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.open:
            gate.set()
        await gate.wait()
        return [Completion("{}", Usage(), "m") for _ in requests]

    def release(self, i: int) -> None:
        self.gates[i].set()

    def release_all(self) -> None:
        self.open = True
        for g in self.gates:
            g.set()


def ids(tenant: str, first: int, last: int) -> list[str]:
    return [f"{tenant}:{i}" for i in range(first, last + 1)]


async def settle() -> None:
    """Let the submits run and arm max_wait's timer, the timer fire, and the batches it sends reach
    the engine (through wait_for's own task: a couple of loop turns after the timer)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0.005)
    for _ in range(4):
        await asyncio.sleep(0)


async def batches(eng: Slots, n: int) -> None:
    while len(eng.batches) < n:
        await asyncio.sleep(0.001)


async def answered_once(b: Batcher, eng: Slots, tenant: str) -> None:
    """`tenant` sends one request and gets its answer: from now on it is between requests."""
    one = asyncio.ensure_future(b.submit(request(tenant, 1)))
    await asyncio.wait_for(batches(eng, 1), 1.0)
    eng.release(0)
    await one


@settings(max_examples=40, deadline=None)
# b answered and idle, a's flood: with four slots a gets three, not two
@example(waves=[["b"], ["a"] * 12], releases=[[0]], slots=4, max_batch=2, weights={"a": 1.0, "b": 1.0, "c": 1.0})
# b still in flight, not between requests: a's flood takes every other slot
@example(waves=[["b"], ["a"] * 12], releases=[], slots=4, max_batch=2, weights={"a": 1.0, "b": 1.0, "c": 1.0})
@given(waves=st.lists(st.lists(st.sampled_from("abc"), max_size=12), min_size=1, max_size=5),
       releases=st.lists(st.lists(st.integers(0, 20), max_size=4), max_size=5),
       slots=st.integers(1, 4), max_batch=st.integers(1, 5),
       weights=st.fixed_dictionaries({t: st.sampled_from([0.5, 1.0, 3.0]) for t in "abc"}))
def test_a_slot_idles_only_for_a_tenant_between_requests_and_each_tenant_stays_fifo(
        waves, releases, slots, max_batch, weights):
    """Waves of requests, each followed by the engine answering some batches in flight (picked by
    `releases`): whenever requests wait past max_wait, all slots but the last are busy, and the
    last idles only for a tenant answered and now between requests."""
    asyncio.run(idle_only_for_lingering(waves, releases, slots, max_batch, weights))


async def idle_only_for_lingering(waves, releases, slots, max_batch, weights) -> None:
    eng = Slots()
    b = Batcher(eng, max_batch=max_batch, max_wait_s=0.001, max_concurrency=slots, weights=weights, linger_s=10.0)
    sent: list[str] = []
    waits = []
    answered: set[str] = set()

    def check() -> None:
        flying = [batch for batch, gate in zip(eng.batches, eng.gates) if not gate.is_set()]
        dispatched = {rid for batch in eng.batches for rid in batch}
        queued = {rid.split(":")[0] for rid in sent if rid not in dispatched}
        busy = {rid.split(":")[0] for batch in flying for rid in batch}
        if queued and len(flying) < slots:  # every queued request has waited max_wait
            assert len(flying) == slots - 1  # only the last slot is ever kept
            assert answered - queued - busy  # for a tenant answered, now between requests

    for wave in waves:
        for t in wave:
            sent.append(f"{t}:{sum(rid.startswith(t) for rid in sent) + 1}")
            waits.append(asyncio.ensure_future(b.submit(request(t, int(sent[-1].split(":")[1])))))
        await settle()
        check()
        flying = [i for i, gate in enumerate(eng.gates) if not gate.is_set()]
        for j in (releases.pop(0) if releases else []) if flying else []:
            eng.release(flying[j % len(flying)])
            answered |= {rid.split(":")[0] for rid in eng.batches[flying[j % len(flying)]]}
        await settle()
        check()
    eng.release_all()
    await asyncio.wait_for(asyncio.gather(*waits), 1.0)
    await b.close()
    order = [rid for batch in eng.batches for rid in batch]
    assert sorted(order) == sorted(sent)
    for t in "abc":
        assert [rid for rid in order if rid.startswith(t)] == [rid for rid in sent if rid.startswith(t)]


async def test_the_last_slot_waits_for_the_tenant_between_requests_and_the_flood_fills_its_batch():
    eng = Slots()
    b = Batcher(eng, max_batch=4, max_wait_s=0.001, max_concurrency=2, linger_s=10.0)
    await answered_once(b, eng, "b")
    flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 13)]
    await settle()  # five max_waits: a's backlog would have gone out long ago
    # a holds one slot of two, its share next to b's: the other is kept though a has 8 waiting
    assert eng.batches == [["b:1"], ids("a", 1, 4)]
    second = asyncio.ensure_future(b.submit(request("b", 2)))
    await settle()
    assert eng.batches[2] == ["b:2", *ids("a", 5, 7)]  # with a's first batch still in flight
    eng.release_all()
    await asyncio.wait_for(asyncio.gather(second, *flood), 1.0)
    await b.close()
    a_order = [rid for batch in eng.batches for rid in batch if rid.startswith("a")]
    assert a_order == ids("a", 1, 12)  # FIFO within a tenant


async def test_one_tenant_alone_gets_every_slot_with_full_batches():
    eng = Slots()
    b = Batcher(eng, max_batch=4, max_wait_s=10.0, max_concurrency=3, linger_s=10.0)
    flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 17)]
    await settle()
    assert eng.batches == [ids("a", 1, 4), ids("a", 5, 8), ids("a", 9, 12)]
    eng.release_all()
    await asyncio.wait_for(asyncio.gather(*flood), 1.0)
    assert eng.batches[3] == ids("a", 13, 16)
    await b.close()


async def test_the_kept_slot_goes_to_the_flood_when_the_linger_runs_out_or_with_no_linger():
    loop = asyncio.get_running_loop()
    for linger_s in (0.05, 0.0):
        eng = Slots()
        b = Batcher(eng, max_batch=4, max_wait_s=0.001, max_concurrency=2, linger_s=linger_s)
        await answered_once(b, eng, "b")
        t0 = loop.time()
        flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 9)]
        await settle()
        assert len(eng.batches) == (2 if linger_s else 3)  # kept while b lingers, else a's at once
        await asyncio.wait_for(batches(eng, 3), 1.0)
        assert eng.batches[1:] == [ids("a", 1, 4), ids("a", 5, 8)]
        assert loop.time() - t0 >= (0.04 if linger_s else 0.0)
        eng.release_all()
        await asyncio.wait_for(asyncio.gather(*flood), 1.0)
        await b.close()


@pytest.mark.parametrize(("a_weight", "a_slots"), [(3.0, 3), (4.0, 4)])
async def test_a_share_of_slots_is_by_weight(a_weight, a_slots):
    # four slots, a and b active: a's share is 4 * w / (w + 1), 3 at weight 3 (the last slot is
    # kept for b) and 3.2 at weight 4 (a, below it with 3, may take the last one)
    eng = Slots()
    b = Batcher(eng, max_batch=2, max_wait_s=0.001, max_concurrency=4, weights={"a": a_weight}, linger_s=10.0)
    await answered_once(b, eng, "b")
    flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 11)]
    await settle()
    assert eng.batches[1:] == [ids("a", i, i + 1) for i in range(1, 2 * a_slots, 2)]
    eng.release_all()
    await asyncio.wait_for(asyncio.gather(*flood), 1.0)
    await b.close()


async def test_a_waiting_tenant_below_its_share_goes_first_even_when_a_heavier_turn_fills_a_batch():
    eng = Slots()
    b = Batcher(eng, max_batch=2, max_wait_s=10.0, max_concurrency=4, weights={"a": 3.0}, linger_s=0.0)
    flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 13)]
    await settle()
    assert len(eng.batches) == 4  # a alone: every slot
    light = asyncio.ensure_future(b.submit(request("b", 1)))
    await asyncio.sleep(0.001)
    eng.release(0)  # a then holds 3 slots, its share: the freed one is b's, a's turn of 3 fills it
    await asyncio.wait_for(batches(eng, 5), 1.0)
    assert eng.batches[4] == ["b:1", "a:9"]
    eng.release_all()
    await asyncio.wait_for(asyncio.gather(light, *flood), 1.0)
    await b.close()


async def test_close_sends_the_backlog_a_kept_slot_held_back():
    eng = Slots()
    b = Batcher(eng, max_batch=4, max_wait_s=0.001, max_concurrency=2, linger_s=10.0)
    await answered_once(b, eng, "b")
    flood = [asyncio.ensure_future(b.submit(request("a", i))) for i in range(1, 9)]
    await settle()
    assert len(eng.batches) == 2  # b's and a's first: the second slot is kept
    closing = asyncio.ensure_future(b.close())
    await settle()
    assert eng.batches[2] == ids("a", 5, 8)  # a's first batch still in flight: closing freed the slot
    eng.release_all()
    await asyncio.wait_for(closing, 1.0)
    assert all(f.done() for f in flood)


def test_bad_linger_is_refused():
    for bad in (-1.0, float("inf"), float("nan")):
        try:
            Batcher(Gate(), linger_s=bad)
        except ValueError as e:
            assert str(e) == f"linger_s must be finite and >= 0, got {bad}"
        else:
            raise AssertionError(f"linger_s {bad} accepted")

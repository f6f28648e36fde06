"""The Worker: lanes, batching, backpressure, completion tracking, shutdown, fallback, dead
letters and checkpoints, driven through Pipeline.worker with in-memory connectors."""

from __future__ import annotations

import asyncio
import random
import re
import time
import zlib
from typing import Any, Awaitable, Callable, Sequence

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request
from ponder.inference.reflex import ReflexRule
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.keyed import KeyState
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot_pipeline
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.worker import Worker
from ponder.types import DeadLetter, Decision, SourcePos, Usage, decision_id

TOPIC = "memory"
ACTIONS = ("none", "alert", "inspect")
EDGE_USAGE = Usage(10, 4, 5)
_SEQ = re.compile(r'^- "seq": .* last=(\d+) ', re.M)


# -- helpers -------------------------------------------------------------------------------------


def item(key: str, seq: int, flag: bool = False, **extra: Any) -> dict[str, Any]:
    return {"k": key, "ts": float(seq), "seq": seq, "flag": flag, **extra}


def answer(action: str = "alert", severity: str = "high", reason: str = "ok",
           confidence: float = 0.9) -> str:
    return msgspec.json.encode({"action": action, "severity": severity, "reason": reason,
                                "confidence": confidence}).decode()


def seq_of(req: Request) -> int:
    """The sequence number of the event being decided, read from the prompt's statistics: the
    `last` value of field `seq` is the current event's (the key's state must not have moved
    past it while the decision was pending)."""
    m = _SEQ.search(req.tail)
    assert m is not None, req.tail
    return int(m.group(1))


def echo(req: Request) -> str:
    return answer(reason=f"seq={seq_of(req)}")


class ScriptedEngine:
    """A scripted test engine: implements the Engine protocol (name, start, stop, async
    generate). `before(requests)` is awaited at the start of every batch (delays, blocking,
    observation); `script(request)` answers each request with text or a whole Completion."""

    name = "scripted"

    def __init__(self, script: Callable[[Request], str | Completion] = echo, *,
                 before: Callable[[list[Request]], Awaitable[None]] | None = None,
                 model: str = "scripted-1", usage: Usage = EDGE_USAGE) -> None:
        self.script = script
        self.before = before
        self.model = model
        self.usage = usage
        self.calls: list[list[Request]] = []
        self.started = 0
        self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        reqs = list(requests)
        self.calls.append(reqs)
        if self.before is not None:
            await self.before(reqs)
        out = []
        for r in reqs:
            a = self.script(r)
            out.append(a if isinstance(a, Completion) else Completion(a, self.usage, self.model))
        return out

    @property
    def requests(self) -> list[Request]:
        return [r for c in self.calls for r in c]


def flag_rule() -> Rule:
    return Rule("flag", lambda e: bool(e.payload.get("flag")))


def make_pipeline(edge: Any = None, *, cloud: Any = None, rules: tuple[Rule, ...] | None = None,
                  edge_kw: dict[str, Any] | None = None, cloud_kw: dict[str, Any] | None = None,
                  **kw: Any) -> Pipeline:
    """A pipeline whose gate escalates exactly the events flagged by its rules: numeric signals
    and gaps are off, and `renotify=0` re-escalates every flagged event of an open incident."""
    tiers = [TierSpec("reflex", max_batch=1)]
    if edge is not None:
        tiers.append(TierSpec("edge", engine=edge, min_score=0.5, **(edge_kw or {})))
    if cloud is not None:
        tiers.append(TierSpec("cloud", engine=cloud, min_score=0.9, **(cloud_kw or {})))
    return Pipeline(
        name="test", key="k", time="ts", actions=ACTIONS,
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=rules if rules is not None else (flag_rule(),)),
        tiers=tuple(tiers), reflex=(ReflexRule("rule", "alert", "high"),), **kw)


def layout(items: list[dict[str, Any]], partitions: int = 1) -> tuple[dict[int, SourcePos], dict]:
    """Where MemorySource puts each item (by seq), and each partition's end position."""
    nxt = [0] * partitions
    pos = {}
    for it in items:
        p = zlib.crc32(str(it["k"]).encode()) % partitions if partitions > 1 else 0
        pos[it["seq"]] = SourcePos(TOPIC, p, nxt[p])
        nxt[p] += 1
    return pos, {(TOPIC, p): n for p, n in enumerate(nxt) if n}


def seqs(decisions: list[Decision], key: str) -> list[int]:
    return [int(d.reason.removeprefix("seq=")) for d in decisions if d.key == key]


async def run(worker: Worker, timeout: float = 5.0):
    return await asyncio.wait_for(worker.run(), timeout)


# -- per-key order under random concurrency ------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.tuples(st.sampled_from("ABCDE"), st.booleans()), min_size=1, max_size=48),
    seed=st.integers(0, 2**16),
    partitions=st.integers(1, 3),
    src_batch=st.integers(1, 7),
    max_batch=st.integers(1, 5),
    max_inflight=st.integers(1, 12),
)
def test_per_key_order_under_random_concurrency(stream, seed, partitions, src_batch, max_batch,
                                                max_inflight):
    rng = random.Random(seed)
    items = [item(k, i, flag) for i, (k, flag) in enumerate(stream)]
    pos, ends = layout(items, partitions)
    inflight_seen: list[int] = []
    worker: Worker

    async def jitter(reqs: list[Request]) -> None:
        inflight_seen.append(worker._inflight)
        await asyncio.sleep(rng.uniform(0.0, 0.003))

    eng = ScriptedEngine(before=jitter)
    pipe = make_pipeline(eng, edge_kw={"max_batch": max_batch, "max_wait_ms": 1.0})
    sink = MemorySink()
    src = MemorySource(items, partitions=partitions, key_field="k", batch=src_batch)
    worker = pipe.worker(src, sink, max_inflight=max_inflight)
    stats = asyncio.run(run(worker))

    flagged = [it for it in items if it["flag"]]
    assert stats.events == len(items)
    assert stats.escalations == len(flagged)
    assert stats.decisions == len(flagged) == len(sink.decisions)
    assert stats.dead_letters == 0 and sink.dead_letters == []
    # per key: decisions in exactly input order, one per escalated event
    for k in "ABCDE":
        assert seqs(sink.decisions, k) == [it["seq"] for it in flagged if it["k"] == k]
    # ids: unique, and derived from key and source position
    ids = [d.decision_id for d in sink.decisions]
    assert len(set(ids)) == len(ids)
    for d in sink.decisions:
        s = int(d.reason.removeprefix("seq="))
        assert d.source == pos[s]
        assert d.decision_id == decision_id(d.key, pos[s])
        assert (d.ts, d.tier, d.model, d.degraded, d.action, d.usage) == \
            (float(s), "edge", "scripted-1", False, "alert", Usage(10, 4, 5, 0.0))
        assert d.trace is not None and d.trace.route == ["edge"] and d.trace.errors == []
    # every partition committable to its end, and that is what the store recorded
    assert worker.tracker.committable() == ends
    assert worker.store.positions() == ends
    # bounded work, nothing left behind
    assert all(n <= max_inflight for n in inflight_seen)
    assert worker._inflight == 0 and worker._lanes == {} and worker._tasks == set()
    assert len(eng.requests) == len(flagged)
    if max_batch > 1:
        assert worker._batchers["edge"].requests == len(flagged)
    assert (eng.started, eng.stopped) == (1, 1)


def test_the_prompt_shows_the_escalated_event():
    """The decision is about the latest event, so its own line must be among the prompt's
    recent events, including right after a compaction of the key's window."""
    items = [item("A", i, i % 3 == 0) for i in range(40)]
    eng = ScriptedEngine()
    sink = MemorySink()
    stats = asyncio.run(run(make_pipeline(eng, edge_kw={"max_wait_ms": 1.0}).worker(MemorySource(items), sink)))
    assert stats.decisions == 14
    missing = []
    for r in eng.requests:
        s = seq_of(r)
        recent = r.prefix.split("Recent events (oldest first):\n", 1)[1]
        if f' "seq"={s} ' not in recent:
            missing.append(s)
    assert missing == []


# -- different keys run concurrently ------------------------------------------------------------


async def test_other_keys_progress_while_one_key_waits():
    items = [item("A", 0, True), item("B", 1, True), item("C", 2, True), item("B", 3),
             item("C", 4, True), item("A", 5), item("B", 6, True), item("A", 7, True)]
    sink = MemorySink()
    snap: dict[str, Any] = {}
    worker: Worker

    async def hold_a(reqs: list[Request]) -> None:
        if reqs[0].session != "A" or snap:
            return
        deadline = time.monotonic() + 2.0
        while len(sink.decisions) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        snap["decided"] = sorted((d.key, int(d.reason[4:])) for d in sink.decisions)
        snap["committable"] = worker.tracker.committable()
        snap["lanes"] = {k: [e.payload["seq"] for e in q] for k, q in worker._lanes.items()}
        snap["inflight"] = worker._inflight

    eng = ScriptedEngine(before=hold_a)
    # unbatched edge tier: each lane calls the engine on its own
    worker = make_pipeline(eng, edge_kw={"max_batch": 1}).worker(MemorySource(items), sink)
    stats = await run(worker)

    # while A's first decision was pending, B and C decided everything they had
    assert snap["decided"] == [("B", 1), ("B", 6), ("C", 2), ("C", 4)]
    # ... and A's later events waited in its lane, in order
    assert snap["lanes"] == {"A": [5, 7]}
    assert snap["inflight"] == 3
    # offset 0 (A) is pending, so nothing is committable yet, though offsets 1..4 and 6 are done
    assert snap["committable"] == {}
    assert seqs(sink.decisions, "A") == [0, 7]
    assert [d.key for d in sink.decisions][-2:] == ["A", "A"]
    assert stats.decisions == 6
    assert worker.tracker.committable() == {(TOPIC, 0): 8}


async def test_requests_of_different_keys_are_in_flight_together_and_batched():
    n_keys = 6
    items = [item(f"k{i}", i, True) for i in range(n_keys)]
    in_flight = 0
    all_in = asyncio.Event()
    lanes_open: list[int] = []
    worker: Worker

    async def wait_for_everyone(reqs: list[Request]) -> None:
        nonlocal in_flight
        in_flight += len(reqs)
        if in_flight >= n_keys:
            lanes_open.append(len(worker._lanes))
            all_in.set()
        # if keys were served one after another, this would never be released
        await asyncio.wait_for(all_in.wait(), 2.0)

    eng = ScriptedEngine(before=wait_for_everyone)
    pipe = make_pipeline(eng, edge_kw={"max_batch": 4, "max_wait_ms": 20.0})
    sink = MemorySink()
    worker = pipe.worker(MemorySource(items, batch=1), sink)
    stats = await run(worker)

    assert lanes_open == [n_keys]
    b = worker._batchers["edge"]
    assert (b.batches, b.requests) == (2, 6)  # batches formed across keys: 4 by size, 2 by time
    assert [[r.session for r in c] for c in eng.calls] == [["k0", "k1", "k2", "k3"], ["k4", "k5"]]
    assert stats.decisions == n_keys
    assert sorted(d.key for d in sink.decisions) == [f"k{i}" for i in range(n_keys)]
    # the request carries the decision id of the triggering position
    assert sorted(r.request_id for r in eng.requests) == \
        sorted(decision_id(f"k{i}", SourcePos(TOPIC, 0, i)) for i in range(n_keys))


async def test_one_batch_when_everything_arrives_within_max_wait():
    items = [item(f"k{i}", i, True) for i in range(5)] + [item("k0", 5), item("k1", 6, True)]
    eng = ScriptedEngine()
    pipe = make_pipeline(eng, edge_kw={"max_batch": 32, "max_wait_ms": 10.0})
    worker = pipe.worker(MemorySource(items), MemorySink())
    stats = await run(worker)
    b = worker._batchers["edge"]
    # the first 5 keys' requests share one batch; k1's second waits for its first decision
    assert (b.batches, b.requests) == (2, 6)
    assert [len(c) for c in eng.calls] == [5, 1]
    assert stats.decisions == 6


# -- bounded in-flight work (backpressure) ------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
async def test_inflight_never_exceeds_max_inflight(k):
    keys = [f"k{i}" for i in range(8)]
    items = [item(keys[i % 8], i, True) for i in range(32)]  # every event escalates
    seen: list[tuple[int, int]] = []
    worker: Worker

    async def slow(reqs: list[Request]) -> None:
        seen.append((worker._inflight, worker.stats.events - worker.stats.decisions))
        await asyncio.sleep(0.002)

    eng = ScriptedEngine(before=slow)
    pipe = make_pipeline(eng, edge_kw={"max_batch": 4, "max_wait_ms": 1.0})
    sink = MemorySink()
    worker = pipe.worker(MemorySource(items, batch=5), sink, max_inflight=k)
    stats = await run(worker)

    assert max(n for n, _ in seen) == k  # the bound is reached...
    assert all(n <= k for n, _ in seen)  # ...and never exceeded
    # the source is not read ahead: admitted-but-undecided events stay within the bound
    assert all(n <= k for _, n in seen)
    assert stats.decisions == 32
    for key in keys:
        assert seqs(sink.decisions, key) == [i for i in range(32) if keys[i % 8] == key]
    assert worker.tracker.committable() == {(TOPIC, 0): 32}


async def test_backpressure_counts_events_queued_in_a_lane():
    # one key: its later events queue behind the pending decision and count as in flight
    items = [item("A", 0, True)] + [item("A", i) for i in range(1, 10)] + [item("B", 10)]
    seen: list[int] = []
    worker: Worker

    async def look(reqs: list[Request]) -> None:
        await asyncio.sleep(0.005)
        seen.append(worker._inflight)
        seen.append(worker.stats.events)

    eng = ScriptedEngine(before=look)
    worker = make_pipeline(eng, edge_kw={"max_batch": 1}).worker(
        MemorySource(items, batch=1), MemorySink(), max_inflight=4)
    stats = await run(worker)
    assert seen == [4, 4]  # A0 pending + A1..A3 queued; A4 not read yet
    assert stats.events == 11 and stats.decisions == 1
    assert worker.tracker.committable() == {(TOPIC, 0): 11}


# -- committable positions while a lane is blocked ---------------------------------------------------


async def test_committable_stays_below_a_pending_event():
    items = [item("B", 0), item("C", 1), item("B", 2), item("A", 3, True), item("B", 4),
             item("C", 5, True), item("B", 6), item("A", 7), item("C", 8)]
    snap: dict[str, Any] = {}
    sink = MemorySink()
    worker: Worker

    async def block_a(reqs: list[Request]) -> None:
        if reqs[0].session != "A":
            return
        deadline = time.monotonic() + 2.0
        while not any(d.key == "C" for d in sink.decisions) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        snap["committable"] = worker.tracker.committable()
        snap["checkpoint"] = await worker.checkpoint()
        snap["stored"] = worker.store.positions()
        snap["keys"] = sorted(k for k, _ in worker.store.items())

    eng = ScriptedEngine(before=block_a)
    worker = make_pipeline(eng, edge_kw={"max_batch": 1}).worker(MemorySource(items), sink)
    await run(worker)

    # offsets 0..2 done, 3 (A) pending, 4..6 and 8 done, 7 (A) queued: commit stops at 3
    assert snap["committable"] == {(TOPIC, 0): 3}
    assert snap["checkpoint"] == {(TOPIC, 0): 3}
    assert snap["stored"] == {(TOPIC, 0): 3}
    # A has a decision in flight: its state is not written yet; idle keys' states are
    assert snap["keys"] == ["B", "C"]
    assert worker.tracker.committable() == {(TOPIC, 0): 9}
    assert worker.store.positions() == {(TOPIC, 0): 9}
    assert sorted(k for k, _ in worker.store.items()) == ["A", "B", "C"]


# -- graceful shutdown ------------------------------------------------------------------------------


class RecordingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def write(self, decision: Decision) -> None:
        super().write(decision)
        self.log.append("write")

    async def flush(self) -> None:
        await super().flush()
        self.log.append("flush")

    async def stop(self) -> None:
        self.log.append("stop")


async def test_stop_from_progress_callback_drains_admitted_work():
    keys = ["a", "b", "c"]
    items = [item(keys[i % 3], i, True) for i in range(30)]
    at_stop: dict[str, int] = {}
    sink = RecordingSink()
    worker: Worker

    def progress(stats) -> None:
        if stats.events >= 10 and not at_stop:
            at_stop.update(events=stats.events, decisions=stats.decisions, inflight=worker._inflight)
            worker.stop()

    async def slow(reqs: list[Request]) -> None:
        await asyncio.sleep(0.002)

    eng = ScriptedEngine(before=slow)
    worker = make_pipeline(eng, edge_kw={"max_wait_ms": 1.0}).worker(
        MemorySource(items, batch=1), sink, progress=progress)
    stats = await run(worker)

    # all ten admitted events were still in flight when stop() was called...
    assert at_stop == {"events": 10, "decisions": 0, "inflight": 10}
    # ...and every one of them got its decision; nothing after them was admitted
    assert stats.events == 10
    assert sorted(int(d.reason[4:]) for d in sink.decisions) == list(range(10))
    for k in keys:
        assert seqs(sink.decisions, k) == [i for i in range(10) if keys[i % 3] == k]
    assert worker.tracker.committable() == {(TOPIC, 0): 10}
    assert worker.store.positions() == {(TOPIC, 0): 10}
    # the sink was flushed after the last decision and before it stopped
    assert sink.log[-2:] == ["flush", "stop"]
    assert sink.log.count("write") == 10
    assert (eng.started, eng.stopped) == (1, 1)


async def test_stop_from_inside_the_engine():
    items = [item(f"k{i % 4}", i, True) for i in range(20)]
    at_stop: list[int] = []
    sink = RecordingSink()
    worker: Worker

    async def stop_once(reqs: list[Request]) -> None:
        if not at_stop:
            at_stop.append(worker.stats.events)
            worker.stop()
        await asyncio.sleep(0.002)

    eng = ScriptedEngine(before=stop_once)
    worker = make_pipeline(eng, edge_kw={"max_batch": 1}).worker(
        MemorySource(items, batch=1), sink, max_inflight=2)
    stats = await run(worker)

    assert at_stop == [2]
    assert stats.events == 2
    assert sorted(int(d.reason[4:]) for d in sink.decisions) == [0, 1]
    assert worker.tracker.committable() == {(TOPIC, 0): 2}
    assert worker.store.positions() == {(TOPIC, 0): 2}
    assert sink.log == ["write", "write", "flush", "stop"]


# -- fallback and escalation between tiers ------------------------------------------------------------


def one_flagged_event() -> list[dict[str, Any]]:
    return [item("A", 0), item("A", 1, True), item("A", 2)]


async def decide_one(edge: Any, **edge_kw: Any) -> tuple[Decision, Worker]:
    sink = MemorySink()
    worker = make_pipeline(edge, edge_kw=edge_kw).worker(MemorySource(one_flagged_event()), sink)
    stats = await run(worker)
    assert stats.decisions == 1 and stats.escalations == 1 and stats.dead_letters == 0
    assert worker.tracker.committable() == {(TOPIC, 0): 3}
    return sink.decisions[0], worker


def assert_reflex_fallback(d: Decision, errors: list[str]) -> None:
    # the reflex tier's answer to the "flag" rule finding
    assert (d.key, d.action, d.severity, d.reason, d.confidence) == ("A", "alert", "high", "rule flag", 1.0)
    assert (d.tier, d.model, d.degraded) == ("reflex", "reflex", True)
    assert d.decision_id == decision_id("A", SourcePos(TOPIC, 0, 1))
    assert d.trace is not None
    assert d.trace.route == ["edge", "reflex"]
    assert d.trace.errors == errors


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("max_batch", [1, 8])
async def test_engine_raising_falls_back_to_reflex(max_batch):
    def fail(req: Request) -> str:
        raise Boom("backend down")

    d, _ = await decide_one(ScriptedEngine(fail), max_batch=max_batch, max_wait_ms=1.0)
    assert_reflex_fallback(d, ["edge: Boom: backend down"])
    assert d.usage == Usage()


async def test_engine_timeout_falls_back_to_reflex():
    async def hang(reqs: list[Request]) -> None:
        await asyncio.sleep(30)

    t0 = time.monotonic()
    d, _ = await decide_one(ScriptedEngine(before=hang), max_batch=8, max_wait_ms=1.0, timeout_s=0.05)
    assert time.monotonic() - t0 < 1.0
    assert_reflex_fallback(d, ["edge: EngineError: engine 'scripted' timed out after 0.05s"])


async def test_engine_timeout_applies_to_unbatched_tiers_too():
    """`timeout_s` bounds an engine call whether or not the tier batches (max_batch=1 calls the
    engine directly): a hung backend must degrade to reflex, not stall the key forever."""
    async def hang(reqs: list[Request]) -> None:
        await asyncio.sleep(30)

    sink = MemorySink()
    worker = make_pipeline(ScriptedEngine(before=hang), edge_kw={"max_batch": 1, "timeout_s": 0.05}) \
        .worker(MemorySource(one_flagged_event()), sink)
    try:
        await asyncio.wait_for(worker.run(), 1.0)
    except asyncio.TimeoutError:
        pytest.fail("edge tier with max_batch=1 ignored timeout_s=0.05: run still hung after 1 s")
    assert len(sink.decisions) == 1
    d = sink.decisions[0]
    assert (d.tier, d.degraded, d.action) == ("reflex", True, "alert")
    assert d.trace is not None and len(d.trace.errors) == 1
    assert d.trace.errors[0].startswith("edge: ") and "timed out" in d.trace.errors[0]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("I think we should alert.", "edge: invalid answer: JSON is malformed: invalid character (byte 0)"),
        (answer(action="rm -rf"), "edge: invalid answer: Invalid enum value 'rm -rf' - at `$.action`"),
        (answer(confidence=1.5), "edge: invalid answer: Expected `float` <= 1.0 - at `$.confidence`"),
        (answer(severity="apocalyptic"),
         "edge: invalid answer: Invalid enum value 'apocalyptic' - at `$.severity`"),
    ],
)
async def test_invalid_answer_falls_back_to_reflex(text, error):
    eng = ScriptedEngine(lambda r: text)
    d, _ = await decide_one(eng, max_wait_ms=1.0)
    assert_reflex_fallback(d, [error])
    assert d.action in ACTIONS
    assert d.usage == Usage(10, 4, 5, 0.0)  # the edge call was paid for, even if useless
    assert len(eng.requests) == 1


async def test_per_request_error_falls_back_to_reflex():
    eng = ScriptedEngine(lambda r: Completion("", Usage(), "scripted-1", "error", error="CUDA out of memory"))
    d, _ = await decide_one(eng, max_wait_ms=1.0)
    assert_reflex_fallback(d, ["edge: CUDA out of memory"])


async def test_wrong_number_of_completions_falls_back_to_reflex():
    class Short(ScriptedEngine):
        async def generate(self, requests):
            await super().generate(requests)
            return []

    d, _ = await decide_one(Short(), max_batch=8, max_wait_ms=1.0)
    assert_reflex_fallback(d, ["edge: EngineError: engine 'scripted' returned 0 completions for 1 requests"])


def scored_pipeline(edge: Any, cloud: Any, *, score: float, **kw: Any) -> Pipeline:
    return make_pipeline(edge, cloud=cloud, rules=(Rule("flag", lambda e: bool(e.payload.get("flag")), score=score),),
                         **kw)


async def test_low_confidence_escalates_from_edge_to_cloud():
    edge = ScriptedEngine(lambda r: answer(action="inspect", severity="low", reason="unsure", confidence=0.2))
    cloud = ScriptedEngine(lambda r: answer(action="alert", severity="critical", reason="sure", confidence=0.95),
                           model="big-1", usage=Usage(20, 0, 7))
    pipe = scored_pipeline(edge, cloud, score=0.7,
                           edge_kw={"min_confidence": 0.6, "max_wait_ms": 1.0},
                           cloud_kw={"cost_per_1k_tokens": 2.0, "max_wait_ms": 1.0})
    sink = MemorySink()
    stats = await run(pipe.worker(MemorySource(one_flagged_event()), sink))
    assert stats.decisions == 1
    d = sink.decisions[0]
    assert (d.action, d.severity, d.reason, d.confidence) == ("alert", "critical", "sure", 0.95)
    assert (d.tier, d.model, d.degraded) == ("cloud", "big-1", False)
    assert d.trace is not None and d.trace.route == ["edge", "cloud"] and d.trace.errors == []
    assert d.trace.gate_score == 0.7
    # both calls are paid for: cloud's cost from its per-1k price, (20 + 7) * 2.0 / 1000
    assert d.usage == Usage(30, 4, 12, 0.054)
    assert stats.by_tier == {"cloud": 1}
    assert (len(edge.requests), len(cloud.requests)) == (1, 1)


async def test_high_score_starts_at_cloud():
    edge = ScriptedEngine()
    cloud = ScriptedEngine(model="big-1")
    pipe = scored_pipeline(edge, cloud, score=1.0, edge_kw={"max_wait_ms": 1.0}, cloud_kw={"max_wait_ms": 1.0})
    sink = MemorySink()
    await run(pipe.worker(MemorySource(one_flagged_event()), sink))
    d = sink.decisions[0]
    assert (d.tier, d.model, d.reason, d.degraded) == ("cloud", "big-1", "seq=1", False)
    assert (len(edge.requests), len(cloud.requests)) == (0, 1)


async def test_low_confidence_without_a_higher_tier_keeps_the_answer():
    edge = ScriptedEngine(lambda r: answer(reason="unsure", confidence=0.2))
    d, _ = await decide_one(edge, min_confidence=0.6, max_wait_ms=1.0)
    assert (d.tier, d.reason, d.confidence, d.degraded) == ("edge", "unsure", 0.2, False)
    assert d.trace is not None and d.trace.route == ["edge"]


def _cloud_failing(how: str) -> ScriptedEngine:
    def script(req: Request) -> str:
        if how == "raises":
            raise Boom("cloud down")
        if how == "garbage":
            return "not json"
        return answer(action="alert", reason="cloud unsure", confidence=0.1)

    return ScriptedEngine(script, model="big-1")


@pytest.mark.parametrize("how", ["raises", "garbage", "less sure"])
async def test_a_valid_unconfident_answer_is_kept_when_the_tier_above_does_worse(how):
    edge = ScriptedEngine(lambda r: answer(action="inspect", reason="edge unsure", confidence=0.3))
    pipe = scored_pipeline(edge, _cloud_failing(how), score=0.7,
                           edge_kw={"min_confidence": 0.6, "max_wait_ms": 1.0}, cloud_kw={"max_wait_ms": 1.0})
    sink = MemorySink()
    await run(pipe.worker(MemorySource(one_flagged_event()), sink))
    (d,) = sink.decisions
    # not the reflex fallback: the edge's valid answer stands
    assert (d.tier, d.action, d.reason, d.confidence) == ("edge", "inspect", "edge unsure", 0.3)
    assert d.trace.route == ["edge", "cloud"] and d.degraded == (how != "less sure")  # the climb failed
    assert len(d.trace.errors) == (0 if how == "less sure" else 1)


async def test_breaker_opens_after_consecutive_failures_and_closes_after_cooloff():
    now = [100.0]
    fail = [True]

    def script(req: Request) -> str:
        if fail[0]:
            raise Boom("backend down")
        return echo(req)

    edge = ScriptedEngine(script)
    pipe = make_pipeline(edge, edge_kw={"max_batch": 1, "failures": 2, "cooloff_s": 30.0})
    logic, decoder, engines = pipe.build(clock=lambda: now[0])

    async def run_events(flags: int, start: int) -> list[Decision]:
        sink = MemorySink()
        items = [item("A", start + i, True) for i in range(flags)]
        w = Worker(logic, decoder, MemorySource(items), sink, engines, pipe.tiers)
        stats = await run(w)
        assert stats.decisions == flags
        return sink.decisions

    first = await run_events(3, 0)
    # two failures reach the edge and fall back; the second opens the breaker at t=100
    for d in first[:2]:
        assert (d.tier, d.degraded) == ("reflex", True)
        assert d.trace is not None
        assert d.trace.route == ["edge", "reflex"] and d.trace.errors == ["edge: Boom: backend down"]
    # the third does not call the edge at all: straight to reflex, degraded
    d = first[2]
    assert (d.tier, d.degraded) == ("reflex", True)
    assert d.trace is not None and d.trace.route == ["reflex"] and d.trace.errors == []
    assert len(edge.requests) == 2

    now[0] = 129.999  # still cooling off
    d, = await run_events(1, 10)
    assert d.trace is not None and d.trace.route == ["reflex"] and d.degraded
    assert len(edge.requests) == 2

    now[0] = 130.0  # cool-off over: the edge is tried again, and now it answers
    fail[0] = False
    d, = await run_events(1, 20)
    assert (d.tier, d.degraded, d.reason) == ("edge", False, "seq=20")
    assert d.trace is not None and d.trace.route == ["edge"]
    assert len(edge.requests) == 3


async def test_a_success_resets_the_failure_count():
    now = [0.0]
    outcomes = iter([True, False, True, False, True])  # fail, ok, fail, ok, fail

    def script(req: Request) -> str:
        if next(outcomes):
            raise Boom("flaky")
        return echo(req)

    edge = ScriptedEngine(script)
    pipe = make_pipeline(edge, edge_kw={"max_batch": 1, "failures": 2, "cooloff_s": 30.0})
    logic, decoder, engines = pipe.build(clock=lambda: now[0])
    sink = MemorySink()
    items = [item("A", i, True) for i in range(5)]
    await run(Worker(logic, decoder, MemorySource(items), sink, engines, pipe.tiers))
    # never two failures in a row: the breaker never opens and every event reaches the edge
    assert len(edge.requests) == 5
    assert [d.tier for d in sink.decisions] == ["reflex", "edge", "reflex", "edge", "reflex"]


# -- dead letters -------------------------------------------------------------------------------------


def telemetry(device: str, ts: float, **fields: Any) -> str:
    return msgspec.json.encode({"device_id": device, "ts": ts, **fields}).decode()


async def test_bad_records_become_dead_letters_and_good_ones_are_processed():
    items: list[Any] = [
        telemetry("dev-a", 1000.0, temperature=20.0),  # 0
        b"\xff\xfe\x00 not json",  # 1 undecodable
        telemetry("dev-b", 1001.0, temperature=21.0),  # 2
        "[1, 2, 3]",  # 3 an array
        telemetry("dev-a", 1002.0, temperature="hot"),  # 4 wrong type
        telemetry("dev-a", 1003.0, temperature=20.5),  # 5
        '{"ts": 1004.0, "temperature": 20.0}',  # 6 no key field
        telemetry("dev-b", "yesterday", temperature=20.0),  # 7 bad time
        '{"device_id": "dev-c", "temperature": 20.0}',  # 8 no time
        telemetry("", 1005.0),  # 9 empty key
        telemetry("dev-b", 1006.0, temperature=21.5),  # 10
        telemetry("dev-a", 1007.0, temperature=130.0),  # 11 overheat: escalates
        telemetry("dev-c", 1008.0, vibration=0.1),  # 12
    ]
    sink = MemorySink()
    worker = iot_pipeline.worker(MemorySource(items), sink)
    stats = await run(worker)

    def at(i: int) -> SourcePos:
        return SourcePos(TOPIC, 0, i)

    assert [(dl.reason, dl.source, dl.stage) for dl in sink.dead_letters] == [
        ("JSON is malformed: invalid character (byte 0)", at(1), "decode"),
        ("Expected `object`, got `array`", at(3), "decode"),
        ("Expected `float | null`, got `str` - at `$.temperature`", at(4), "decode"),
        ("Object missing required field `device_id`", at(6), "decode"),
        ("Expected `float`, got `str` - at `$.ts`", at(7), "decode"),
        ("Object missing required field `ts`", at(8), "decode"),
        ("key field 'device_id' not a usable key: ''", at(9), "decode"),
    ]
    assert sink.dead_letters[3].raw == '{"ts": 1004.0, "temperature": 20.0}'
    assert sink.dead_letters[0].raw == "\ufffd\ufffd\x00 not json"
    assert (stats.events, stats.dead_letters, stats.escalations, stats.decisions) == (13, 7, 1, 1)
    d = sink.decisions[0]
    assert (d.key, d.action, d.severity, d.reason, d.tier, d.source) == \
        ("dev-a", "emergency_shutdown", "critical", "rule overheat", "reflex", at(11))
    # dead letters are done too: the partition commits to its end
    assert worker.tracker.committable() == {(TOPIC, 0): 13}
    assert worker.store.positions() == {(TOPIC, 0): 13}
    dec = msgspec.msgpack.Decoder(KeyState)
    counts = {k: dec.decode(v).context.count for k, v in worker.store.items()}
    assert counts == {"dev-a": 3, "dev-b": 2, "dev-c": 1}
    assert stats.keys == 3


async def test_huge_integer_time_is_a_dead_letter_not_a_crash():
    items = ['{"k": "A", "ts": 1, "seq": 0}', '{"k": "A", "ts": ' + "9" * 400 + ', "seq": 1}',
             '{"k": "A", "ts": 3, "seq": 2}']
    sink = MemorySink()
    worker = make_pipeline().worker(MemorySource(items), sink)
    stats = await run(worker)
    assert stats.events == 3 and stats.dead_letters == 1
    assert sink.dead_letters[0].source == SourcePos(TOPIC, 0, 1)
    assert worker.tracker.committable() == {(TOPIC, 0): 3}


async def test_a_raising_user_rule_dead_letters_the_event_and_the_stream_continues():
    def when(e) -> bool:
        if e.payload.get("boom"):
            raise RuntimeError(f"rule exploded at seq {e.payload['seq']}")
        return bool(e.payload.get("flag"))

    async def slow(reqs: list[Request]) -> None:
        await asyncio.sleep(0.005)

    items = [item("A", 0, True), item("A", 1, boom=True), item("B", 2, boom=True), item("B", 3, True),
             item("A", 4, True), item("B", 5)]
    eng = ScriptedEngine(before=slow)
    sink = MemorySink()
    worker = make_pipeline(eng, rules=(Rule("boom", when),), edge_kw={"max_batch": 1}) \
        .worker(MemorySource(items), sink)
    stats = await run(worker)

    # B's bad event fails inline at admission; A's was queued behind A's pending decision and
    # fails in A's lane: both become dead letters of stage "observe"
    letters = sorted(sink.dead_letters, key=lambda dl: dl.source.offset)
    assert letters == [
        DeadLetter("RuntimeError: rule exploded at seq 1", SourcePos(TOPIC, 0, 1),
                   '{"seq":1,"flag":false,"boom":true}', "observe"),
        DeadLetter("RuntimeError: rule exploded at seq 2", SourcePos(TOPIC, 0, 2),
                   '{"seq":2,"flag":false,"boom":true}', "observe"),
    ]
    assert (stats.events, stats.dead_letters, stats.decisions) == (6, 2, 3)
    assert seqs(sink.decisions, "A") == [0, 4]
    assert seqs(sink.decisions, "B") == [3]
    assert worker.tracker.committable() == {(TOPIC, 0): 6}
    assert worker._inflight == 0 and worker._lanes == {}


# -- checkpoint -----------------------------------------------------------------------------------------


async def test_checkpoint_after_run_records_end_positions_and_decodable_states():
    rng = random.Random(7)
    keys = [f"dev-{i}" for i in range(7)]
    items = [item(rng.choice(keys), i, rng.random() < 0.3) for i in range(120)]
    items.insert(50, "not json")  # a dead letter in the middle of a partition (no seq)
    for i, it in enumerate(items):
        if isinstance(it, dict):
            it["seq"] = i
            it["ts"] = float(i)
    good = [it for it in items if isinstance(it, dict)]

    async def jitter(reqs: list[Request]) -> None:
        await asyncio.sleep(rng.uniform(0, 0.002))

    sink = MemorySink()
    worker = make_pipeline(ScriptedEngine(before=jitter), edge_kw={"max_wait_ms": 1.0}).worker(
        MemorySource(items, partitions=3, key_field="k", batch=16), sink)
    stats = await run(worker)

    # the dead letter's partition: MemorySource puts a non-dict item in partition 0
    nxt = [0, 0, 0]
    for it in items:
        p = zlib.crc32(str(it["k"]).encode()) % 3 if isinstance(it, dict) else 0
        nxt[p] += 1
    ends = {(TOPIC, p): n for p, n in enumerate(nxt) if n}
    assert worker.store.positions() == ends
    assert worker.tracker.committable() == ends
    assert stats.checkpoints == 1 and stats.dead_letters == 1
    assert stats.decisions == sum(it["flag"] for it in good)

    dec = msgspec.msgpack.Decoder(KeyState)
    states = {k: dec.decode(raw) for k, raw in worker.store.items()}
    used = sorted({it["k"] for it in good})
    assert sorted(states) == used
    for k, s in states.items():
        n = sum(1 for it in good if it["k"] == k)
        assert type(s) is KeyState
        assert (s.context.key, s.context.count, s.gate.n) == (k, n, n)
        assert s.context.last_ts == max(it["ts"] for it in good if it["k"] == k)

    # the state records the last input position it reflects
    pos_of = {}
    nxt = [0, 0, 0]
    for it in items:
        p = zlib.crc32(str(it["k"]).encode()) % 3 if isinstance(it, dict) else 0
        if isinstance(it, dict):
            pos_of[it["k"]] = (p, nxt[p])
        nxt[p] += 1
    for k, s in states.items():
        assert (s.partition, s.offset) == pos_of[k]

    # replaying the same input onto the restored store: state already reflects every event
    raw_before = dict(worker.store.items())
    sink2 = MemorySink()
    w2 = make_pipeline(ScriptedEngine(), edge_kw={"max_wait_ms": 1.0}).worker(
        MemorySource(items, partitions=3, key_field="k", batch=16), sink2, store=worker.store)
    stats2 = await run(w2)
    assert (stats2.events, stats2.replayed, stats2.decisions, stats2.dead_letters) == \
        (len(items), len(good), 0, 1)
    assert dict(worker.store.items()) == raw_before
    assert worker.store.positions() == ends

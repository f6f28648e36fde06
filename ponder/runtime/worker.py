"""The worker loop: source → decode → lane(key) → observe → [batcher → engine] → sink.

Lanes keep each key's events strictly in order while different keys run concurrently. Most
events end at the gate; they are processed inline, with no task and no await, which is what
makes the common path cheap. An escalated event opens a lane for its key: a task that awaits
the reasoning and then works through the events of that key that arrived meanwhile. The lane
closes when it is empty.

Work admitted but not finished is bounded by `max_inflight`; past it the source is not read
(backpressure). Completion is tracked per partition, so `checkpoint()` can commit exactly the
positions below which everything is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import msgspec

from ponder.connectors.base import Record, Sink, Source
from ponder.inference.engine import Completion, Engine, EngineError, Request
from ponder.operators.gate import Verdict
from ponder.operators.keyed import KeyLogic, KeyState
from ponder.operators.route import TierSpec
from ponder.runtime.batcher import Batcher
from ponder.runtime.decode import Decoder
from ponder.runtime.tracker import CompletionTracker
from ponder.state.base import Changelog, Store
from ponder.state.memory import MemoryStore
from ponder.types import DeadLetter, Decision, Event

__all__ = ["Worker", "RunStats"]

logger = logging.getLogger(__name__)

_state_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder(KeyState)


@dataclass
class RunStats:
    events: int = 0
    dead_letters: int = 0
    escalations: int = 0
    decisions: int = 0
    degraded: int = 0
    replayed: int = 0
    keys: int = 0
    by_action: Counter = field(default_factory=Counter)
    by_tier: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    checkpoints: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed_s: float = 0.0

    def line(self) -> str:
        rate = self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"events={self.events} keys={self.keys} escalations={self.escalations} "
                f"decisions={self.decisions} degraded={self.degraded} dead_letters={self.dead_letters} "
                f"elapsed={self.elapsed_s:.2f}s rate={rate:,.0f}/s")


class Worker:
    """Run one pipeline's per-key logic from a source to a sink."""

    def __init__(
        self,
        logic: KeyLogic,
        decoder: Decoder,
        source: Source,
        sink: Sink,
        engines: Mapping[str, Engine],
        tiers: tuple[TierSpec, ...],
        *,
        store: Store | None = None,
        open_store: Callable[[tuple[str, int]], Store] | None = None,
        changelog: Changelog | None = None,
        max_inflight: int = 4096,
        checkpoint_every_s: float = 5.0,
        progress: Callable[[RunStats], None] | None = None,
    ) -> None:
        self.logic = logic
        self.decoder = decoder
        self.source = source
        self.sink = sink
        self.engines = dict(engines)
        # local runs share one store; Kafka workers open one per assigned partition
        self.store: Store = store if store is not None else MemoryStore()
        self._open_store = open_store or (lambda tp: self.store)
        self.changelog = changelog
        self._stores: dict[tuple[str, int], Store] = {}
        self._key_tp: dict[str, tuple[str, int]] = {}
        self._assigned: set[tuple[str, int]] | None = None  # None: a source without assignment
        self.max_inflight = max_inflight
        self.checkpoint_every_s = checkpoint_every_s
        self.progress = progress
        self.tracker = CompletionTracker()
        self.stats = RunStats()
        self._states: dict[str, KeyState] = {}
        # key -> offset of its oldest event not yet in the store; a checkpoint never commits
        # past it, or a crash would skip that event on replay
        self._dirty: dict[str, int] = {}
        self._lanes: dict[str, deque[Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._capacity = asyncio.Event()
        self._stopping = False
        self._direct: dict[str, tuple[Engine, float]] = {}
        self._batchers: dict[str, Batcher] = {}
        if hasattr(source, "bind"):
            source.bind(self)
        for spec in tiers:
            engine = self.engines[spec.name]
            if spec.max_batch <= 1:
                self._direct[spec.name] = (engine, spec.timeout_s)
            else:
                self._batchers[spec.name] = Batcher(
                    engine, max_batch=spec.max_batch, max_wait_s=spec.max_wait_ms / 1000.0,
                    max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> RunStats:
        """Consume the source to its end (or until `stop()`), drain, checkpoint, return stats."""
        started = False
        try:
            for e in self.engines.values():
                await e.start()
            await self.sink.start()
            if self.changelog is not None:
                await self.changelog.start()
            await self.source.start()
            started = True
            last_checkpoint = time.monotonic()
            async for batch in self.source.batches():
                for rec in batch:
                    self._admit(rec)
                    if self._inflight >= self.max_inflight:
                        pause = getattr(self.source, "pause", None)
                        if pause is not None:
                            pause()
                        await self._wait_capacity()
                        resume = getattr(self.source, "resume", None)
                        if resume is not None:
                            resume()
                if self.progress is not None:
                    self.stats.elapsed_s = time.perf_counter() - self.stats.started
                    self.progress(self.stats)
                if time.monotonic() - last_checkpoint >= self.checkpoint_every_s:
                    await self.checkpoint()
                    last_checkpoint = time.monotonic()
                if self._stopping:
                    break
            await self.drain()
            await self.checkpoint()
        finally:
            for t in self._tasks:
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for b in self._batchers.values():
                await b.close()
            if started:
                await self.source.stop()
            await self.sink.stop()
            if self.changelog is not None:
                await self.changelog.stop()
            for store in {id(s): s for s in self._stores.values()}.values():
                if store is not self.store:
                    store.close()
            for e in self.engines.values():
                await e.stop()
            self.stats.elapsed_s = time.perf_counter() - self.stats.started
            self.stats.keys = len(self._states)
        return self.stats

    def stop(self) -> None:
        """Stop reading after the current batch; in-flight work still drains."""
        self._stopping = True

    async def drain(self) -> None:
        """Wait until every admitted event is done."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _wait_capacity(self) -> None:
        while self._inflight >= self.max_inflight:
            self._capacity.clear()
            await self._capacity.wait()

    # -- the path of one event ---------------------------------------------------------------

    def _store(self, tp: tuple[str, int]) -> Store:
        store = self._stores.get(tp)
        if store is None:
            store = self._stores[tp] = self._open_store(tp)
        return store

    def _state(self, key: str, tp: tuple[str, int]) -> KeyState:
        st = self._states.get(key)
        if st is None:
            raw = self._store(tp).get(key)
            st = _state_dec.decode(raw) if raw is not None else self.logic.new_state(key)
            self._states[key] = st
            self._key_tp[key] = tp
        return st

    def _admit(self, rec: Record) -> None:
        pos = rec.source
        if self._assigned is not None and (pos.topic, pos.partition) not in self._assigned:
            return  # fetched before a rebalance took the partition away: its new owner reads it
        self.tracker.received(pos.topic, pos.partition, pos.offset)
        self.stats.events += 1
        ev = self.decoder(rec)
        if type(ev) is DeadLetter:
            self._dead(ev)
            self.tracker.done(pos.topic, pos.partition, pos.offset)
            return
        lane = self._lanes.get(ev.key)
        if lane is not None:
            lane.append(ev)
            self._inflight += 1
            return
        verdict = self._observe(ev)
        if verdict is None or not verdict.escalate:
            self.tracker.done(pos.topic, pos.partition, pos.offset)
            return
        self._lanes[ev.key] = deque()
        self._inflight += 1
        task = asyncio.create_task(self._lane(ev, verdict))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _observe(self, ev: Event) -> Verdict | None:
        st = self._state(ev.key, (ev.source.topic, ev.source.partition))
        if self.logic.seen(st, ev):
            self.stats.replayed += 1
            return None
        try:
            verdict = self.logic.observe(st, ev)
        except Exception as e:  # noqa: BLE001 - a bad event or a buggy user rule must not stop the stream
            logger.exception("observe failed for key %r at %s", ev.key, ev.source)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source,
                                  msgspec.json.encode(ev.payload).decode()[:2000], stage="observe"))
            return None
        if ev.key not in self._dirty:
            self._dirty[ev.key] = ev.source.offset
        if verdict.escalate:
            self.stats.escalations += 1
        return verdict

    async def _lane(self, ev: Event, verdict: Verdict | None) -> None:
        """Work through one key's events in order, starting with an escalated one."""
        key = ev.key
        lane = self._lanes[key]
        try:
            while True:
                if verdict is not None and verdict.escalate:
                    await self._decide(ev, verdict)
                src = ev.source
                self.tracker.done(src.topic, src.partition, src.offset)
                self._inflight -= 1
                if self._inflight < self.max_inflight:
                    self._capacity.set()
                if not lane:
                    break
                ev = lane.popleft()
                verdict = self._observe(ev)
        finally:
            del self._lanes[key]

    async def _decide(self, ev: Event, verdict: Verdict) -> None:
        try:
            d = await self.logic.decide(self._states[ev.key], ev, verdict, self._call)
        except Exception as e:  # noqa: BLE001 - see _observe
            logger.exception("decide failed for key %r at %s", ev.key, ev.source)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source,
                                  msgspec.json.encode(ev.payload).decode()[:2000], stage="decide"))
            return
        self._emit(d)

    async def _call(self, tier: str, request: Request) -> Completion:
        direct = self._direct.get(tier)
        if direct is not None:
            engine, timeout_s = direct
            try:
                return (await asyncio.wait_for(engine.generate([request]), timeout_s))[0]
            except asyncio.TimeoutError:
                msg = f"engine {engine.name!r} timed out after {timeout_s}s"
                raise EngineError(msg) from None
        return await self._batchers[tier].submit(request)

    def _emit(self, d: Decision) -> None:
        s = self.stats
        s.decisions += 1
        s.by_action[d.action] += 1
        s.by_tier[d.tier] += 1
        s.degraded += d.degraded
        u = d.usage
        s.prompt_tokens += u.prompt_tokens
        s.cached_prompt_tokens += u.cached_prompt_tokens
        s.completion_tokens += u.completion_tokens
        s.cost_usd += u.cost_usd
        self.sink.write(d)

    def _dead(self, letter: DeadLetter) -> None:
        self.stats.dead_letters += 1
        self.sink.dead(letter)

    # -- checkpoint ---------------------------------------------------------------------------

    async def checkpoint(self) -> dict[tuple[str, int], int]:
        """Make progress durable, in this order:

        1. flush the sink, so every decision of a done event is acknowledged;
        2. per partition, publish the states of idle dirty keys and the bookkeeping to the
           changelog, and wait for the broker. A key with an open lane has a decision in flight
           and is left for a later checkpoint; the positions then stop at its oldest unstored
           event, so a crash replays it;
        3. write the same states, positions and bookkeeping to the partition's store in one
           batch;
        4. commit the positions at the source, if it takes commits.

        Returns the committed positions.
        """
        positions = self.tracker.committable()
        # Step 1.
        await self.sink.flush()
        by_tp: dict[tuple[str, int], dict[str, bytes | None]] = {tp: {} for tp in positions}
        for k in [k for k in self._dirty if k not in self._lanes]:
            by_tp.setdefault(self._key_tp[k], {})[k] = _state_enc.encode(self._states[k])
            del self._dirty[k]
        for k, first in self._dirty.items():  # keys with a decision in flight stay dirty
            tp = self._key_tp[k]
            if tp in positions and first < positions[tp]:
                positions[tp] = first
        sink_meta = getattr(self.sink, "checkpoint_meta", None)
        metas: dict[tuple[str, int], dict[str, int]] = {}
        for tp in by_tp:
            metas[tp] = sink_meta(tp[1], positions[tp]) if sink_meta is not None and tp in positions else {}
        # Step 2.
        if self.changelog is not None and by_tp:
            reached = await self.changelog.publish({tp[1]: (by_tp[tp], metas[tp]) for tp in by_tp})
            for tp in by_tp:
                metas[tp]["changelog"] = reached[tp[1]]
        # Step 3.
        for tp, states in by_tp.items():
            self._store(tp).write(states, {tp: positions[tp]} if tp in positions else {}, metas[tp])
        # Step 4.
        commit = getattr(self.source, "commit", None)
        if commit is not None and positions:
            await commit(positions)
        self.stats.checkpoints += 1
        return positions

    # -- rebalances ---------------------------------------------------------------------------

    async def assign(self, partitions: list[tuple[str, int]]) -> None:
        """Take partitions over: open their stores, bring them up to the changelog, and learn
        which outputs of uncommitted input already exist."""
        stores = {tp[1]: self._store(tp) for tp in partitions}
        if self.changelog is not None:
            metas = await self.changelog.restore(stores)
        else:
            metas = {p: s.meta() for p, s in stores.items()}
        recover = getattr(self.sink, "recover", None)
        if recover is not None:
            await recover(metas)
        self._assigned = (self._assigned or set()) | set(partitions)
        logger.info("assigned %s", partitions)

    async def revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Hand partitions back: finish their work, checkpoint, and forget their keys."""
        gone = set(partitions)
        if self._assigned is not None:
            self._assigned -= gone
        await self.drain()
        await self.checkpoint()
        for key in [k for k, tp in self._key_tp.items() if tp in gone]:
            del self._key_tp[key]
            self._states.pop(key, None)
            self._dirty.pop(key, None)
        forget = getattr(self.sink, "forget", None)
        for tp in partitions:
            self.tracker.forget(*tp)
            store = self._stores.pop(tp, None)
            if store is not None and store is not self.store:
                store.close()
            if forget is not None:
                forget(tp[1])
        logger.info("revoked %s", partitions)

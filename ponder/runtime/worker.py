"""The worker loop: source → decode → lane(key) → observe → [batcher → engine] → sink.

Lanes keep each key's events strictly in order while different keys run concurrently. Most
events end at the gate; they are processed inline, with no task and no await, which is what
makes the common path cheap. An escalated event opens a lane for its key: a task that awaits
the reasoning and then works through the events of that key that arrived meanwhile. The lane
closes when it is empty.

Work admitted but not finished is bounded by `max_inflight`; past it the source is not read
(backpressure). Completion is tracked per partition, so `checkpoint()` can commit exactly the
positions below which everything is done. Key states, stores, epochs and the checkpoint
protocol itself belong to `Partitions` (runtime/checkpoint.py); the worker keeps admission,
lanes and tier dispatch.

With OpenTelemetry configured in the environment (runtime/tracing.py), each escalated event's
path becomes a trace: the runtime stamps its decode, gate, lane wait and sink on the monotonic
clock, and the reasoner's stages come from the decision's own trace.

An error that is one event's fault (it cannot be decoded, observed or decided) makes that
event a dead letter and the stream moves on. Any other error (a sink that cannot write, a
bug) stops the worker: the event it happened on is never marked done, no further checkpoint
runs, and `run()` raises WorkerFailed after closing everything.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import msgspec

from ponder.connectors.base import CommittingSource, Record, Sink, Source
from ponder.inference.egress import Egress
from ponder.inference.engine import Completion, Engine, Request
from ponder.operators.gate import Verdict
from ponder.operators.keyed import KeyLogic
from ponder.operators.route import TierSpec
from ponder.runtime.batcher import TierCalls
from ponder.runtime.checkpoint import Partitions
from ponder.runtime.decode import Decoder
from ponder.runtime.ledger import write_ledger
from ponder.runtime.tracestore import TraceStore
from ponder.runtime.tracing import Stamps, from_env
from ponder.runtime.tracker import CompletionTracker
from ponder.state.base import Changelog, Store
from ponder.types import DeadLetter, Decision, Event, SourcePos

__all__ = ["Worker", "WorkerFailed", "RunStats"]

logger = logging.getLogger(__name__)
_now = time.monotonic_ns  # the clock of trace stamps

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


class WorkerFailed(RuntimeError):
    """The worker stopped on an error it cannot handle; nothing past the failed event was
    committed, so a restart replays it."""


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
        max_hot_keys: int = 100_000,
        checkpoint_every_s: float = 5.0,
        progress: Callable[[RunStats], None] | None = None,
        ledger: str | Path | None = None,
        name: str = "",
        tenant_weights: Mapping[str, float] | None = None,
        traces: TraceStore | None = None,
    ) -> None:
        self.logic = logic
        self.ledger, self.name = ledger, name  # the spend ledger, rewritten at each checkpoint
        self.decoder = decoder
        self.source = source
        self.sink = sink
        # every remote tier behind the privacy door, however the engines were handed in
        privacy = logic.privacy
        key = privacy.key if privacy is not None else None
        remote = {t.name for t in tiers if not t.is_local}
        self.engines = {name: Egress(e, key) if name in remote and not isinstance(e, Egress) else e
                        for name, e in engines.items()}
        self.partitions = Partitions(logic.new_state, store=store, open_store=open_store,
                                     changelog=changelog, max_hot_keys=max_hot_keys)
        budgets = logic.reasoner.budgets
        if budgets:  # each partition's share of the caps (all of them: one partition) moves with it
            self.partitions.bookkeeping = budgets.meta
            self.partitions.restored = budgets.restore
            self.partitions.released = budgets.forget
        self.max_inflight = max_inflight
        self.checkpoint_every_s = checkpoint_every_s
        self.close_timeout_s = 15.0
        self.progress = progress
        self.tracker = CompletionTracker()
        self.stats = RunStats()
        self._lanes: dict[str, deque[Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._capacity = asyncio.Event()
        self._stopping = False
        self._failure: BaseException | None = None
        self._failure_msg = ""
        if isinstance(source, CommittingSource):
            source.bind(self)
        self._tiers = TierCalls(tiers, self.engines, tenant_weights)
        self._batchers = self._tiers.batchers  # what the metrics read
        # traces of escalated events, when the environment configures an exporter (else None,
        # and the event path takes no clock reading for them)
        self.tracing = from_env(tiers, self.engines, pipeline=name,
                                pseudonym=privacy.pseudonym if privacy is not None else None)
        self._stamps: dict[int, Stamps] = {}  # id(event) -> its stamps, while it waits in a lane
        # the local trace store (runtime/tracestore.py): every verdict, and each decision with
        # what the reasoner kept for it (the prompt as sent, raw outputs); flushed at checkpoints
        self.traces = traces
        if traces is not None:
            logic.reasoner.explaining = {}
            # with a privacy policy the raw event stays out: the prompt shows what it let through
            traces.keep_payloads = traces.keep_payloads and privacy is None
            traces.privacy = privacy  # the plotted signal: only what the policy lets through

    @property
    def store(self) -> Store:
        """The store of local runs (Kafka workers have one per partition)."""
        return self.partitions.store

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> RunStats:
        """Consume the source to its end (or until `stop()`), drain, checkpoint, return stats.

        Raises WorkerFailed, after cleaning up and without a final checkpoint, when an event
        could not be finished (a sink that cannot write, a bug): everything committed before
        stays correct and a restart replays the rest.
        """
        started = False
        committing = isinstance(self.source, CommittingSource)
        # every event allocates short-lived objects (a decoded payload, a state read back from
        # the store); at the default threshold (700) the collector runs every few events and,
        # in its older generations, walks every hot key's state. Key states hold no cycles.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
        try:
            for e in self.engines.values():
                await e.start()
            await self.sink.start()
            if self.partitions.changelog is not None:
                await self.partitions.changelog.start()
            await self.source.start()
            started = True
            last_checkpoint = time.monotonic()
            async for batch in self.source.batches():
                self._check()  # an assignment that failed must not let its records through
                parts = self.partitions
                for rec in batch:
                    pos = rec.source
                    if not parts.owns((pos.topic, pos.partition)):
                        continue  # fetched before a rebalance took the partition: its new owner reads it
                    if not parts.saw(rec):
                        tp = (rec.source.topic, rec.source.partition)
                        await parts.new_epoch(tp, self.drain, self.tracker, self.sink, self.source,
                                              self._lanes)
                        parts.saw(rec)
                    self._admit(rec)
                    if self._inflight >= self.max_inflight:
                        if committing:
                            self.source.pause()
                        await self._wait_capacity()
                        if committing:
                            self.source.resume()
                self._check()
                if parts.evict(self._lanes):
                    # past the bound with dirty keys: a checkpoint makes the idle ones clean
                    await self.checkpoint()
                    last_checkpoint = time.monotonic()
                    parts.evict(self._lanes)
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
        except WorkerFailed:
            raise
        except Exception as e:
            # a failure of the source, the sink's flush or the changelog: nothing more is
            # committed; say so with what failed rather than a bare traceback
            self._fail(e, "the run loop")
            raise WorkerFailed(str(self._failure_msg)) from e
        finally:
            gc.set_threshold(*thresholds)
            await self._shutdown(started)
        return self.stats

    async def _shutdown(self, started: bool) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._tiers.close()
        # outputs first, then the group: once we leave, our partitions' new owner reads their
        # outputs, and nothing of ours may land after that
        closers = [self.sink.stop]
        if self.partitions.changelog is not None:
            closers.append(self.partitions.changelog.stop)
        if started:
            closers.append(self.source.stop)
        closers.extend(e.stop for e in self.engines.values())
        if self.tracing is not None:
            closers.append(self.tracing.close)
        for close in closers:
            # bounded: a broker that is gone must not keep a failed worker from exiting
            try:
                await asyncio.wait_for(close(), self.close_timeout_s)
            except Exception as e:  # noqa: BLE001 - one failing close must not keep the rest open
                logger.warning("closing %s failed: %s: %s", getattr(close, "__self__", close),
                               type(e).__name__, e)
        self.partitions.close()
        if self.traces is not None:  # what was decided before a failure still explains itself
            self.traces.checkpoint()
        self.stats.elapsed_s = time.perf_counter() - self.stats.started
        self.stats.keys = self.partitions.new_keys

    def stop(self) -> None:
        """Stop reading after the current batch; in-flight work still drains."""
        self._stopping = True

    async def drain(self) -> None:
        """Wait until every admitted event is done (or the worker failed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._check()

    async def _wait_capacity(self) -> None:
        while self._inflight >= self.max_inflight:
            self._check()
            self._capacity.clear()
            await self._capacity.wait()
        self._check()

    def _fail(self, e: BaseException, where: str) -> None:
        """Remember the first unhandled error; the run stops at its next step."""
        if self._failure is None:
            self._failure = e
            self._failure_msg = f"{where}: {type(e).__name__}: {e}"
            logger.error("stopping: %s", self._failure_msg)
            logger.debug("the error that stopped the worker", exc_info=e)
        self._stopping = True
        self._capacity.set()

    def _check(self) -> None:
        if self._failure is not None:
            raise WorkerFailed(self._failure_msg) from self._failure

    # -- the path of one event ---------------------------------------------------------------

    def _admit(self, rec: Record) -> None:
        pos = rec.source
        tp = (pos.topic, pos.partition)
        parts = self.partitions
        epoch = parts.epochs.get(tp, 0)
        if epoch:
            pos = rec.source = SourcePos(pos.topic, pos.partition, pos.offset, epoch)
        self.tracker.received(pos.topic, pos.partition, pos.offset)
        self.stats.events += 1
        # with tracing, four clock readings an event; its stamps are kept only if it escalates
        # or waits in a lane (then it may escalate later)
        tracing = self.tracing is not None
        if tracing:
            began = _now()
        ev = self.decoder(rec)  # never raises: whatever is wrong with a record is its dead letter
        if type(ev) is DeadLetter:
            self._dead(ev)
            self.tracker.done(pos.topic, pos.partition, pos.offset)
            return
        if tracing:
            decoded = _now()
        lane = self._lanes.get(ev.key)
        if lane is not None:
            lane.append(ev)
            self._inflight += 1
            if tracing:
                self._stamps[id(ev)] = Stamps(began, decoded)
            return
        if tracing:
            gate = _now()
            verdict = self._observe(ev)
            gated = _now()
        else:
            verdict = self._observe(ev)
        if verdict is None or not verdict.escalate:
            self.tracker.done(pos.topic, pos.partition, pos.offset)
            return
        self._lanes[ev.key] = deque()
        self._inflight += 1
        stamps = None
        if tracing:
            stamps = Stamps(began, decoded)
            stamps.gate, stamps.gated = gate, gated
            stamps.queued = gated  # its lane wait: from the task's creation until it runs
        task = asyncio.create_task(self._lane(ev, verdict, stamps))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _observe(self, ev: Event) -> Verdict | None:
        src = ev.source
        st = self.partitions.state(ev.key, (src.topic, src.partition))
        if self.logic.seen(st, ev):
            self.stats.replayed += 1
            return None
        try:
            verdict = self.logic.observe(st, ev)
        except Exception as e:  # noqa: BLE001 - a bad event or a buggy user rule must not stop the stream
            # observe validates before it changes state, so the key's state is as it was
            logger.warning("observe failed for key %r at %s: %s: %s", ev.key, src, type(e).__name__, e)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], src, _payload(ev), stage="observe"))
            return None
        self.partitions.touched(ev.key, src.offset)
        if self.traces is not None:
            self.traces.gate(ev, verdict)
        if verdict.escalate:
            self.stats.escalations += 1
        return verdict

    async def _lane(self, ev: Event, verdict: Verdict | None, stamps: Stamps | None = None) -> None:
        """Work through one key's events in order, starting with an escalated one. An error
        here is not one event's fault (decide turns those into dead letters): the worker stops,
        and this event is never marked done, so nothing past it is committed."""
        key = ev.key
        lane = self._lanes[key]
        if stamps is not None:
            stamps.taken = _now()
        try:
            while True:
                if verdict is not None and verdict.escalate:
                    await self._decide(ev, verdict, stamps)
                src = ev.source
                self.tracker.done(src.topic, src.partition, src.offset)
                self._inflight -= 1
                if self._inflight < self.max_inflight:
                    self._capacity.set()
                if not lane or self._failure is not None:
                    break
                ev = lane.popleft()
                if stamps is not None:  # tracing
                    stamps = self._stamps.pop(id(ev))
                    stamps.taken = _now()
                # a checkpoint may store this key's state as of now, with positions held
                # below `ev`: a lane that never empties must not hold commits back for good
                self.partitions.settled(key, ev.source.offset)
                if stamps is None:
                    verdict = self._observe(ev)
                else:
                    stamps.gate = _now()
                    verdict = self._observe(ev)
                    stamps.gated = _now()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the run loop, never lost in a task
            self._fail(e, f"key {key!r} at {ev.source}")
        finally:
            del self._lanes[key]
            self.partitions.unsettled(key)
            for left in lane if self.tracing is not None else ():  # a lane stopped short
                self._stamps.pop(id(left), None)

    async def _decide(self, ev: Event, verdict: Verdict, stamps: Stamps | None = None) -> None:
        began = _now() if stamps is not None else 0
        try:
            d = await self.logic.decide(self.partitions.hot(ev.key), ev, verdict, self._call)
        except Exception as e:  # noqa: BLE001 - see _observe
            logger.warning("decide failed for key %r at %s: %s: %s", ev.key, ev.source, type(e).__name__, e)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source, _payload(ev), stage="decide"))
            if stamps is not None:
                ended = _now()
                self.tracing.record(ev, verdict, stamps, (began, ended), ended, None, f"{type(e).__name__}: {e}")
            return
        if self.traces is not None:
            self.traces.decision(d, ev, self.logic.reasoner.explaining.pop(d.decision_id, None))
        if stamps is None:
            self._emit(d)
            return
        decided = _now()
        self._emit(d)
        self.tracing.record(ev, verdict, stamps, (began, decided), _now(), d)

    async def _call(self, tier: str, request: Request) -> Completion:
        return await self._tiers.call(tier, request)

    def _emit(self, d: Decision) -> None:
        self.sink.write(d)
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

    def _dead(self, letter: DeadLetter) -> None:
        self.sink.dead(letter)
        self.stats.dead_letters += 1

    # -- checkpoint and rebalances (the protocol lives in Partitions) -------------------------

    async def checkpoint(self) -> dict[tuple[str, int], int]:
        """Make progress durable (see `Partitions.checkpoint` for the steps); returns the
        positions made durable. Refused once the worker has failed."""
        self._check()
        positions = await self.partitions.checkpoint(self.tracker, self.sink, self.source, self._lanes)
        self.stats.checkpoints += 1
        if self.ledger is not None:
            write_ledger(self.ledger, self.name, self.logic.reasoner)
        if self.traces is not None:
            self.traces.checkpoint()
        return positions

    async def assign(self, partitions: list[tuple[str, int]]) -> None:
        """Take partitions over (called by a committing source around a rebalance)."""
        try:
            await self.partitions.assign(partitions, self.sink, self.source)
        except Exception as e:
            self._fail(e, f"assigning {partitions}")
            raise

    async def lose(self, partitions: list[tuple[str, int]]) -> None:
        """Partitions the group gave away before we handed them back: drop, never commit."""
        try:
            await self.partitions.lose(partitions, self.drain, self.tracker, self.sink)
        except Exception as e:
            self._fail(e, f"losing {partitions}")
            raise

    async def revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Hand partitions back: finish their work, checkpoint, and forget their keys."""
        if self._failure is not None:
            return  # nothing more is committed after a failure; the next owner replays
        try:
            await self.partitions.revoke(partitions, self.drain, self.tracker, self.sink, self.source,
                                         self._lanes)
        except Exception as e:
            self._fail(e, f"revoking {partitions}")
            raise


def _payload(ev: Event) -> str:
    try:
        return msgspec.json.encode(ev.payload).decode()[:2000]
    except Exception:  # noqa: BLE001 - a payload msgspec cannot encode is still shown
        return repr(ev.payload)[:2000]

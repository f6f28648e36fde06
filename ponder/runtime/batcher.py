"""Micro-batching of reasoning requests across keys, one batcher per tier, shared fairly by tenants.

A batch goes to the engine when it reaches `max_batch` requests or its oldest request has
waited `max_wait`, whichever comes first, and only while fewer than `max_concurrency` batches
are in flight; past that the tier is saturated and requests queue here, which backs up the
lanes and, through them, the source. Each completion comes back with how long its request
waited for its batch to start and how long the engine took (`Completion.timings`).

Fair sharing. Queued requests wait in one queue per tenant. Each batch is formed by deficit
round robin over the tenants with requests waiting: on its turn a tenant's deficit grows by its
weight (default 1) and it sends one request per whole unit, FIFO within the tenant; a tenant
whose queue empties starts its next turn from zero. So a flooding tenant's backlog delays the
others by about one round, not by its whole length. `fair=False` serves one FIFO queue instead
(the baseline the fairness benchmark measures against).

Headroom. A round is not the whole delay: a batch holds its slot until the engine answers, and
a flood keeps every slot busy, so another tenant's request would still wait for one of the
flood's batches to end (up to a whole batch time: batches sent together end together). So the
last free slot is kept for the tenants below their share of the slots, a share being
`max_concurrency` times the tenant's weight over the active tenants' weights (active: requests
queued or in flight, or answered within `linger_s`); a batch's slot counts for each of its
tenants by its places in it. A tenant at or above its share takes that slot only behind the
waiting tenants below theirs, filling their batch; while none waits but one was answered within
`linger_s`, the slot stays free, so its next request finds one. A tenant alone uses every slot,
and `linger_s` bounds the idling: the others lose at most one slot, and only while a tenant
below its share is between requests (`linger_s=0`: never).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence

import msgspec

from typing import TYPE_CHECKING

from ponder.inference.engine import Completion, Engine, EngineError, Request

if TYPE_CHECKING:
    from ponder.operators.route import TierSpec

__all__ = ["Batcher", "TierCalls", "timed_generate", "with_timings"]

# a request, the future its lane awaits, and when it was submitted (perf_counter)
_Item = tuple[Request, "asyncio.Future[Completion]", float]


async def timed_generate(engine: Engine, requests: Sequence[Request]) -> tuple[list[Completion], float, float]:
    """The engine's completions, and when its `generate` started and ended (perf_counter).
    Taken inside the coroutine, so the wait for the event loop to start it is not counted as
    the engine's work."""
    start = time.perf_counter()
    out = await engine.generate(requests)
    return out, start, time.perf_counter()


def with_timings(comp: Completion, waited_s: float, engine_s: float) -> Completion:
    """`comp` with the runtime's part of its timings added to the engine's own phases."""
    return msgspec.structs.replace(comp, timings={**(comp.timings or {}), "batch wait": waited_s,
                                                  "engine": engine_s})


class Batcher:
    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_concurrency: int = 4, timeout_s: float = 30.0,
                 weights: Mapping[str, float] | None = None, fair: bool = True,
                 linger_s: float = 1.0) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.weights = dict(weights or {})
        if any(not 0 < w < float("inf") for w in self.weights.values()):
            msg = f"tenant weights must be finite and > 0, got {self.weights}"
            raise ValueError(msg)
        if not 0 <= linger_s < float("inf"):
            msg = f"linger_s must be finite and >= 0, got {linger_s}"
            raise ValueError(msg)
        self.linger_s = linger_s
        # a turn's quantum: weights scaled so the smallest sends at least one request a turn
        self._unit = min([1.0, *self.weights.values()])
        self.fair = fair
        self._free = max_concurrency  # batches that may still go out
        self._queues: dict[str, deque[_Item]] = {}
        self._turns: deque[str] = deque()  # tenants with requests queued, in round-robin order
        self._deficit: dict[str, float] = {}
        self._queued = 0
        self._sent = 0
        self._flying: dict[int, Counter[str]] = {}  # batch in flight (by number sent) -> places by tenant
        self._answered: dict[str, float] = {}  # tenant -> when its last batch came back, oldest first
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.TimerHandle | None = None  # a kept slot's linger runs out
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.requests = 0
        # for /metrics (runtime/metrics.py), read at scrape time: batches by size, the engine's
        # busy time and the tokens it produced (its tokens/s is their ratio)
        self.sizes: Counter[int] = Counter()
        self.engine_s = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (the tier's queue depth)."""
        return self._queued

    @property
    def flying(self) -> int:
        """Batches at the engine now."""
        return self.max_concurrency - self._free

    async def submit(self, request: Request) -> Completion:
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        tenant = request.tenant if self.fair else ""
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
        if not q:
            self._turns.append(tenant)
        q.append((request, fut, time.perf_counter()))
        self._queued += 1
        if self._queued >= self.max_batch:
            self._dispatch(full_only=True)
        if self._queued and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._waited)
        return await fut

    def _waited(self) -> None:
        self._timer = None
        self._dispatch(full_only=False)

    def _woke(self) -> None:
        self._wake = None
        # the queued requests have waited max_wait unless their timer is still pending
        self._dispatch(full_only=self._timer is not None)

    def _dispatch(self, *, full_only: bool) -> None:
        """Send batches while a slot is free: full ones only, unless the oldest has waited."""
        while self._free > 0 and self._queued and (not full_only or self._queued >= self.max_batch):
            first = self._last_slot_claim() if self._free == 1 and not self._closing else None
            if first is not None and not first:  # kept for a tenant between requests
                break
            batch = self._take(self.max_batch, only=first)
            if first:  # those the slot is kept for go first; the others fill the batch
                batch += self._take(self.max_batch - len(batch))
            if not batch:
                continue
            self._free -= 1
            self._sent += 1
            self._flying[self._sent] = Counter(r.tenant if self.fair else "" for r, _, _ in batch)
            task = asyncio.create_task(self._run(batch, self._sent))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._queued and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _last_slot_claim(self) -> set[str] | None:
        """Whom the last free slot is for: None for anyone (plain DRR); else the waiting tenants
        below their share, which go first, or, when none waits, an empty set: it is kept."""
        self._forget_lingered(asyncio.get_running_loop().time())
        held: Counter[str] = Counter()
        for places in self._flying.values():
            size = sum(places.values())
            for tenant, n in places.items():
                held[tenant] += n / size
        active = self._queues.keys() | held.keys() | self._answered.keys()
        if len(active) < 2:
            return None
        total = sum(self.weights.get(t, 1.0) for t in active)
        # at or above its share already (one below it may take a slot that tips it over)
        over = {t for t in self._queues if held[t] >= self.max_concurrency * self.weights.get(t, 1.0) / total}
        if not over:
            return None
        under = self._queues.keys() - over
        if under:
            return set(under)
        lingering = [at for t, at in self._answered.items() if t not in self._queues and t not in held]
        if not lingering:
            return None
        if self._wake is None:  # when the first linger runs out, the slot may go to those waiting
            self._wake = asyncio.get_running_loop().call_at(min(lingering) + self.linger_s, self._woke)
        return set()

    def _forget_lingered(self, now: float) -> None:
        while self._answered:  # oldest first
            tenant, at = next(iter(self._answered.items()))
            if now - at < self.linger_s:
                break
            del self._answered[tenant]

    def _take(self, n: int, only: set[str] | None = None) -> list[_Item]:
        """Up to `n` requests by deficit round robin over the tenants' queues (over `only`'s,
        the others keeping their places in the round)."""
        batch: list[_Item] = []
        i = 0
        while len(batch) < n and i < len(self._turns):
            tenant = self._turns[i]
            if only is not None and tenant not in only:
                i += 1
                continue
            q = self._queues[tenant]
            if self._deficit.get(tenant, 0.0) < 1.0:
                self._deficit[tenant] = self._deficit.get(tenant, 0.0) + self.weights.get(tenant, 1.0) / self._unit
            while q and self._deficit[tenant] >= 1.0 and len(batch) < n:
                item = q.popleft()
                self._queued -= 1
                if item[1].done():  # its lane gave up waiting: nothing to send
                    continue
                batch.append(item)
                self._deficit[tenant] -= 1.0
            if not q:  # forgotten until it sends again: tenants come and go with the data
                del self._turns[i]
                del self._queues[tenant]
                self._deficit.pop(tenant, None)
            elif self._deficit[tenant] < 1.0:  # its turn is over; it keeps what it did not spend
                del self._turns[i]
                self._turns.append(tenant)
        return batch

    async def _run(self, batch: Sequence[_Item], number: int) -> None:
        self.batches += 1
        self.requests += len(batch)
        self.sizes[len(batch)] += 1
        try:
            try:
                async with asyncio.timeout(self.timeout_s):  # in this task: no extra turn of the loop
                    out, start, end = await timed_generate(self.engine, [r for r, _, _ in batch])
                if len(out) != len(batch):
                    msg = f"engine {self.engine.name!r} returned {len(out)} completions for {len(batch)} requests"
                    raise EngineError(msg)
                self.engine_s += end - start
                for comp in out:
                    self.prompt_tokens += comp.usage.prompt_tokens
                    self.completion_tokens += comp.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - handed to every waiting lane
                if isinstance(e, asyncio.TimeoutError):
                    e = EngineError(f"engine {self.engine.name!r} timed out after {self.timeout_s}s")
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                return
            for (_, fut, submitted), comp in zip(batch, out):
                if not fut.done():
                    fut.set_result(with_timings(comp, start - submitted, end - start))
        finally:
            now = asyncio.get_running_loop().time()
            for tenant in self._flying.pop(number):  # re-inserted: the dict stays oldest first
                self._answered.pop(tenant, None)
                self._answered[tenant] = now
            self._forget_lingered(now)  # bounded by the tenants answered within linger_s
            self._free += 1
            self._dispatch(full_only=False)  # a slot is free: what queued meanwhile goes now

    async def close(self) -> None:
        """Send what is queued and wait for every batch in flight."""
        self._closing = True  # no one is left to keep a slot for
        self._dispatch(full_only=False)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None


class TierCalls:
    """How a runtime calls each tier's engine (the native worker, faust and Bytewax alike): a
    tier with `max_batch` 1 directly, timed and under its deadline; every other through a
    Batcher that all keys share, so their calls batch together."""

    def __init__(self, tiers: Sequence[TierSpec], engines: Mapping[str, Engine],
                 weights: Mapping[str, float] | None = None) -> None:
        self.direct: dict[str, tuple[Engine, float]] = {}
        self.batchers: dict[str, Batcher] = {}  # tier -> its batcher
        for spec in tiers:
            engine = engines[spec.name]
            if spec.max_batch <= 1:
                self.direct[spec.name] = (engine, spec.timeout_s)
            else:
                self.batchers[spec.name] = Batcher(
                    engine, max_batch=spec.max_batch, max_wait_s=spec.max_wait_ms / 1000.0,
                    max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s, weights=weights)

    async def call(self, tier: str, request: Request) -> Completion:
        direct = self.direct.get(tier)
        if direct is None:
            return await self.batchers[tier].submit(request)
        engine, timeout_s = direct
        submitted = time.perf_counter()
        try:
            out, start, end = await asyncio.wait_for(timed_generate(engine, [request]), timeout_s)
        except asyncio.TimeoutError:
            msg = f"engine {engine.name!r} timed out after {timeout_s}s"
            raise EngineError(msg) from None
        return with_timings(out[0], start - submitted, end - start)

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()

"""Micro-batching of reasoning requests across keys, one batcher per tier, shared fairly by tenants.

A batch goes to the engine when it reaches `max_batch` requests or its oldest request has
waited `max_wait`, whichever comes first, and only while fewer than `max_concurrency` batches
are in flight; past that the tier is saturated and requests queue here, which backs up the
lanes and, through them, the source.

Fair sharing. Queued requests wait in one queue per tenant. Each batch is formed by deficit
round robin over the tenants with requests waiting: on its turn a tenant's deficit grows by its
weight (default 1) and it sends one request per whole unit, FIFO within the tenant; a tenant
whose queue empties starts its next turn from zero. So a tenant flooding a saturated tier
delays the others by about one round, not by its whole backlog. `fair=False` serves one FIFO
queue instead (the baseline the fairness benchmark measures against).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Mapping, Sequence

from ponder.inference.engine import Completion, Engine, EngineError, Request

__all__ = ["Batcher"]

_Item = tuple[Request, "asyncio.Future[Completion]"]


class Batcher:
    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_concurrency: int = 4, timeout_s: float = 30.0,
                 weights: Mapping[str, float] | None = None, fair: bool = True) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.weights = dict(weights or {})
        if any(not 0 < w < float("inf") for w in self.weights.values()):
            msg = f"tenant weights must be finite and > 0, got {self.weights}"
            raise ValueError(msg)
        # a turn's quantum: weights scaled so the smallest sends at least one request a turn
        self._unit = min([1.0, *self.weights.values()])
        self.fair = fair
        self._free = max_concurrency  # batches that may still go out
        self._queues: dict[str, deque[_Item]] = {}
        self._turns: deque[str] = deque()  # tenants with requests queued, in round-robin order
        self._deficit: dict[str, float] = {}
        self._queued = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.requests = 0

    async def submit(self, request: Request) -> Completion:
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        tenant = request.tenant if self.fair else ""
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
        if not q:
            self._turns.append(tenant)
        q.append((request, fut))
        self._queued += 1
        if self._queued >= self.max_batch:
            self._dispatch(full_only=True)
        if self._queued and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._waited)
        return await fut

    def _waited(self) -> None:
        self._timer = None
        self._dispatch(full_only=False)

    def _dispatch(self, *, full_only: bool) -> None:
        """Send batches while a slot is free: full ones only, unless the oldest has waited."""
        while self._free > 0 and self._queued and (not full_only or self._queued >= self.max_batch):
            batch = self._take(self.max_batch)
            if not batch:
                continue
            self._free -= 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._queued and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self, n: int) -> list[_Item]:
        """Up to `n` requests by deficit round robin over the tenants' queues."""
        batch: list[_Item] = []
        while len(batch) < n and self._turns:
            tenant = self._turns[0]
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
                self._turns.popleft()
                del self._queues[tenant]
                self._deficit.pop(tenant, None)
            elif self._deficit[tenant] < 1.0:
                self._turns.rotate(-1)  # its turn is over; it keeps what it did not spend
        return batch

    async def _run(self, batch: Sequence[_Item]) -> None:
        self.batches += 1
        self.requests += len(batch)
        try:
            try:
                out = await asyncio.wait_for(self.engine.generate([r for r, _ in batch]), self.timeout_s)
                if len(out) != len(batch):
                    msg = f"engine {self.engine.name!r} returned {len(out)} completions for {len(batch)} requests"
                    raise EngineError(msg)
            except Exception as e:  # noqa: BLE001 - handed to every waiting lane
                if isinstance(e, asyncio.TimeoutError):
                    e = EngineError(f"engine {self.engine.name!r} timed out after {self.timeout_s}s")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                return
            for (_, fut), comp in zip(batch, out):
                if not fut.done():
                    fut.set_result(comp)
        finally:
            self._free += 1
            self._dispatch(full_only=False)  # a slot is free: what queued meanwhile goes now

    async def close(self) -> None:
        """Send what is queued and wait for every batch in flight."""
        self._dispatch(full_only=False)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

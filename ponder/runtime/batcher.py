"""Micro-batching of reasoning requests across keys, one batcher per tier.

A batch goes to the engine when it reaches `max_batch` requests or its oldest request has
waited `max_wait`, whichever comes first. At most `max_concurrency` batches are in flight per
engine; further batches wait, which backs up the lanes and, through them, the source.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from ponder.inference.engine import Completion, Engine, EngineError, Request

__all__ = ["Batcher"]


class Batcher:
    def __init__(self, engine: Engine, *, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_concurrency: int = 4, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(max_concurrency)
        self._pending: list[tuple[Request, asyncio.Future[Completion]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.requests = 0

    async def submit(self, request: Request) -> Completion:
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._pending.append((request, fut))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Sequence[tuple[Request, asyncio.Future[Completion]]]) -> None:
        async with self._sem:
            self.batches += 1
            self.requests += len(batch)
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

    async def close(self) -> None:
        """Send what is pending and wait for every batch in flight."""
        self._flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

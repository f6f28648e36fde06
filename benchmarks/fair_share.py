"""Fair sharing of a saturated tier: tenant B's decision latency while tenant A floods.

The tier's engine is simulated (a batch takes `--base-ms` plus `--per-request-ms` per request,
`--concurrency` batches at once: a model server at its limit; batches sent together end together,
the worst case for a request waiting on a slot); requests go through the real `Batcher`. Tenant B sends one request every `--b-every-ms`; tenant A, in the flood runs, sends
`--a-rate` requests per second, well above what the tier serves, for the same `--seconds`.
Four runs: B alone; A alone (one tenant must still get the whole tier); A flooding with the fair
queue (deficit round robin by tenant, headroom for the tenant below its share); A flooding with
one FIFO queue. Reported: B's p50/p95/max latency in each and the ratios to B alone, how much
of it B waited before its batch reached the engine (`b_wait`), and A's throughput (requests
answered within the `--seconds`, per second; the backlog drained later is not the tier's rate)
against the FIFO run's: the fair queue's headroom idles a slot while B is between requests.

    python benchmarks/fair_share.py          # -> results/fair_share.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from ponder.inference.engine import Completion, Request
from ponder.runtime.batcher import Batcher
from ponder.types import Usage

RESULTS = Path(__file__).resolve().parent / "results"


class SimulatedTier:
    name = "simulated"

    def __init__(self, base_s: float, per_request_s: float) -> None:
        self.base_s, self.per_request_s = base_s, per_request_s
        self.sent: dict[str, float] = {}  # B's request id -> when its batch reached the engine
        self.batch_sizes: list[int] = []

    async def generate(self, requests):
        now = time.perf_counter()
        self.sent.update((r.request_id, now) for r in requests if r.tenant == "b")
        self.batch_sizes.append(len(requests))
        await asyncio.sleep(self.base_s + self.per_request_s * len(requests))
        return [Completion("{}", Usage(), "m") for _ in requests]


async def one_run(a: argparse.Namespace, *, b: bool = True, flood: bool, fair: bool) -> dict[str, Any]:
    tier = SimulatedTier(a.base_ms / 1000, a.per_request_ms / 1000)
    batcher = Batcher(tier, max_batch=a.max_batch, max_wait_s=0.005, max_concurrency=a.concurrency,
                      timeout_s=3600, fair=fair, linger_s=a.linger_ms / 1000)
    b_latency: list[float] = []
    b_wait: list[float] = []  # submitted -> its batch reached the engine
    a_done: list[float] = []  # when each of A's requests was answered
    tasks: list[asyncio.Task] = []

    async def timed(req: Request, into: list[float] | None) -> None:
        t0 = time.perf_counter()
        await batcher.submit(req)
        if into is None:
            a_done.append(time.perf_counter())
        else:
            into.append((time.perf_counter() - t0) * 1000)
            b_wait.append((tier.sent.pop(req.request_id) - t0) * 1000)

    async def tenant(name: str, every_s: float, burst: int, into: list[float] | None) -> None:
        """`burst` requests every `every_s` (a timer cannot tick fast enough for one by one)."""
        start, i = time.perf_counter(), 0
        while time.perf_counter() < start + a.seconds:
            for _ in range(burst):
                i += 1
                req = Request(f"{name}-{i}", "p", "t", 8, ("none",), {}, request_id=f"{name}:{i}", tenant=name)
                tasks.append(asyncio.create_task(timed(req, into)))
            await asyncio.sleep(every_s)

    start = time.perf_counter()
    producers = [tenant("b", a.b_every_ms / 1000, 1, b_latency)] if b else []
    if flood:
        producers.append(tenant("a", 0.01, max(1, round(a.a_rate / 100)), None))
    await asyncio.gather(*producers)
    await asyncio.gather(*tasks)
    await batcher.close()
    run: dict[str, Any] = stats(b_latency) if b else {}
    if b:
        run["b_wait"] = stats(b_wait)
    if flood:
        run["a_per_s"] = sum(t < start + a.seconds for t in a_done) / a.seconds
        run["mean_batch"] = statistics.fmean(tier.batch_sizes)
    return run


def stats(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"n": len(s), "p50_ms": statistics.median(s), "p95_ms": s[int(0.95 * (len(s) - 1))], "max_ms": s[-1]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--a-rate", type=float, default=3000.0, help="tenant A's requests per second")
    ap.add_argument("--b-every-ms", type=float, default=50.0)
    ap.add_argument("--base-ms", type=float, default=20.0)
    ap.add_argument("--per-request-ms", type=float, default=0.5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--linger-ms", type=float, default=1000.0,
                    help="how long a tenant keeps its headroom after its last answer (the batcher's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fair_share.json")
    a = ap.parse_args(argv)
    runs = {
        "b_alone": asyncio.run(one_run(a, flood=False, fair=True)),
        "a_alone": asyncio.run(one_run(a, b=False, flood=True, fair=True)),
        "a_floods_fair": asyncio.run(one_run(a, flood=True, fair=True)),
        "a_floods_fifo": asyncio.run(one_run(a, flood=True, fair=False)),
    }
    capacity = a.concurrency * a.max_batch / ((a.base_ms + a.per_request_ms * a.max_batch) / 1000)
    result = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "settings": vars(a) | {"out": str(a.out)},
        "tier_capacity_per_s": capacity, "runs": runs,
        "p95_fair_over_alone": runs["a_floods_fair"]["p95_ms"] / runs["b_alone"]["p95_ms"],
        "p95_fifo_over_alone": runs["a_floods_fifo"]["p95_ms"] / runs["b_alone"]["p95_ms"],
        "a_throughput_fair_over_fifo": runs["a_floods_fair"]["a_per_s"] / runs["a_floods_fifo"]["a_per_s"],
        "a_alone_throughput_over_fifo": runs["a_alone"]["a_per_s"] / runs["a_floods_fifo"]["a_per_s"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("timestamp", "python", "cpu_count", "settings")},
                     indent=1))
    return result


if __name__ == "__main__":
    main()

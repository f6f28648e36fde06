"""The whole path with the edge model in process: `iot_monitor` over a simulated fleet, every
escalation answered by a JAX checkpoint (`--preset`, random weights: the answers mean nothing,
the machinery and its speed are what is measured). Besides the gate's own findings, a periodic
review rule escalates each device about every `--review`-th reading (and an incident closes
after 2 quiet readings, so each firing is news), so every key calls the model many times and
its session has something to reuse.

The same events go through three set-ups, back to back (the gate and the context are
deterministic, so each sends the same requests to the edge tier):

* **ponder**: cross-key micro-batches (max batch 16, 4 in flight) feeding the engine's
  continuous batch; each key's KV session is reused, so a call prefills only what its prompt
  added since the key's last call;
* **no session reuse**: the same, but every call gets a fresh session (the engine prefills the
  whole prompt every time);
* **no batching**: one request per call, one call in flight (sessions reused);
* **no speculation**: as ponder, with the engine decoding one token per step
  (`speculate=None`; ponder's engine drafts by prompt lookup and grammar fast-forward and
  verifies several tokens per step, see `inference/jax/speculate.py`). Greedy, so every
  answer must be the same text: `same_answers` checks it.

Each set-up runs twice and the second run is timed (the first compiles its shapes).

Reported per set-up: wall time, edge decisions, decisions per second, prompt tokens and the
share of them served from a session, and ponder's speed-up over each baseline.

    python benchmarks/edge_pipeline.py                          # -> results/edge_pipeline.json
    python benchmarks/edge_pipeline.py --devices 8 --events-per-device 120 --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request
from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.engine import JaxEngine
from ponder.operators.gate import Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot
from ponder.simulate import iter_events

RESULTS = Path(__file__).resolve().parent / "results"


class FreshSessions:
    """An engine wrapper that gives every request a session of its own (no prefix reuse)."""

    name = "jax"

    def __init__(self, engine: JaxEngine):
        self.engine, self.model, self._n = engine, engine.model, itertools.count()

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        fresh = [msgspec.structs.replace(r, session=f"{r.session}#{next(self._n)}") for r in requests]
        return await self.engine.generate(fresh)


async def run_once(name: str, items: list[dict], ckpt: Path, *, reuse: bool, max_batch: int,
                   concurrency: int, review: int, engine_kw: dict) -> dict[str, Any]:
    engine = JaxEngine(ckpt, **engine_kw)
    stats0 = None
    edge = engine if reuse else FreshSessions(engine)
    tiers = (TierSpec("reflex", max_batch=1),
             TierSpec("edge", engine=f"jax:{ckpt}", min_score=0.0, max_batch=max_batch, max_concurrency=concurrency,
                      max_tokens=64, timeout_s=600.0))
    rule = Rule("review", lambda e: int(e.ts) // 10 % review == 0)
    pipe = dataclasses.replace(iot, tiers=tiers, gate=dataclasses.replace(iot.gate, rules=(*iot.gate.rules, rule), quiet=2))
    await engine.start()  # load + compile outside the timed run
    spec = engine.generator.spec_stats
    stats0 = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else {}
    sink = MemorySink()
    t0 = time.perf_counter()
    try:
        stats = await pipe.worker(MemorySource(items), sink, engines={"edge": edge}).run()
    finally:
        await engine.stop()
    wall = time.perf_counter() - t0
    edge_decisions = sum(1 for d in sink.decisions if d.tier == "edge" and not d.degraded)
    return {"setup": name, "wall_s": wall, "events": stats.events, "escalations": stats.escalations,
            "decisions": stats.decisions, "edge_decisions": edge_decisions, "degraded": stats.degraded,
            "dead_letters": stats.dead_letters, "decisions_per_s": stats.decisions / wall, "prompt_tokens": stats.prompt_tokens,
            "cached_prompt_tokens": stats.cached_prompt_tokens, "completion_tokens": stats.completion_tokens,
            "cached_share": stats.cached_prompt_tokens / max(stats.prompt_tokens, 1),
            "speculation": _delta(stats0, engine.generator.spec_stats),
            "decision_ids": sorted(d.decision_id for d in sink.decisions),
            "answers": sorted((d.decision_id, d.action, d.severity, d.reason) for d in sink.decisions)}


def _delta(before: dict, spec) -> dict:
    """The engine's speculation counters over the timed run."""
    now = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else {}
    return {k: v - before.get(k, 0) for k, v in now.items() if isinstance(v, (int, float))}


def table(result: dict) -> str:
    rows = ["| set-up | wall s | edge decisions | decisions/s | prompt tokens | from session | ponder ÷ set-up |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = result["runs"][0]["decisions_per_s"]
    for r in result["runs"]:
        rows.append(f"| {r['setup']} | {r['wall_s']:.1f} | {r['edge_decisions']} | {r['decisions_per_s']:.2f} | "
                    f"{r['prompt_tokens']:,} | {100 * r['cached_share']:.0f}% | "
                    f"{base / r['decisions_per_s']:.2f}× |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--events-per-device", type=int, default=150)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--review", type=int, default=8, help="escalate about every N-th reading of a device")
    ap.add_argument("--setups", nargs="+", default=["ponder", "no session reuse", "no batching", "no speculation"])
    ap.add_argument("--out", type=Path, default=RESULTS / "edge_pipeline.json")
    a = ap.parse_args(argv)
    items = list(iter_events(a.devices, a.events_per_device, a.seed))
    engine_kw = {"max_batch": 16, "session_cap_bytes": 256 << 20, "warmup": False}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / a.preset
        init_model(ckpt, a.preset, seed=0)
        setups = [("ponder", True, 16, 4, {}), ("no session reuse", False, 16, 4, {}),
                  ("no batching", True, 1, 1, {}), ("no speculation", True, 16, 4, {"speculate": None})]
        setups = [s for s in setups if s[0] in a.setups]
        runs = []
        for name, reuse, mb, conc, extra in setups:
            print(f"{name} ...", file=sys.stderr, flush=True)
            for _ in range(2):
                run = asyncio.run(run_once(name, items, ckpt, reuse=reuse, max_batch=mb, concurrency=conc,
                                           review=a.review, engine_kw={**engine_kw, **extra}))
            runs.append(run)
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("decision_ids", "answers")}),
                  file=sys.stderr)
    same = all(r["decision_ids"] == runs[0]["decision_ids"] for r in runs)
    by = {r["setup"]: r for r in runs}
    same_answers = (by["ponder"]["answers"] == by["no speculation"]["answers"]
                    if "ponder" in by and "no speculation" in by else None)
    for r in runs:
        del r["decision_ids"], r["answers"]
    result = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "preset": a.preset,
        "devices": a.devices, "events_per_device": a.events_per_device, "seed": a.seed, "review": a.review,
        "same_decisions_in_every_setup": same, "same_answers_with_and_without_speculation": same_answers,
        "runs": runs,
        **{f"speedup_vs_{r['setup'].replace(' ', '_')}": by["ponder"]["decisions_per_s"] / r["decisions_per_s"]
           for r in runs if "ponder" in by and r["setup"] != "ponder"},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()

"""How good is the cost forecast a budget would reserve? `iot_monitor` over a simulated fleet,
every escalation answered by a `tiny` JAX checkpoint in process (random weights: the answers mean
nothing, the usage is real and exact), a periodic review rule escalating each device about every
`--review`-th reading (as in edge_pipeline.py) so keys call the model repeatedly and compact
their context between calls.

Each decision's trace holds the forecast made before its call (operators/forecast.py) beside the
usage the engine reported. Reported: the median and 90th-percentile absolute error, relative to
the actual figure, of cost (at an illustrative price: $0.50 per million prompt tokens, $0.05
cached, $1.50 completion), prompt, cached and completion tokens; over all calls and over calls
after the first `--warmup` (the ratio and the means start from nothing).

`--tiered`: the same errors on `ponder demo`'s path instead (ponder/demo.py): the two-tenant
fleet through `iot_tiered`, a `tiny` edge in process and a `small` cloud behind `ponder
serve-model`, priced as the pipeline prices them (the cloud at gpt-4o's list price), the
budgets in force. Each model decision's forecast (the sum over the calls it made) against its
usage. Target: median absolute cost error <= 10%.

    python benchmarks/cost_forecast.py               # -> results/cost_forecast.json
    python benchmarks/cost_forecast.py --tiered      # -> results/cost_forecast_tiered.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.demo import forecast_errors, run_demo
from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.engine import JaxEngine
from ponder.operators.gate import Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot
from ponder.simulate import iter_events

RESULTS = Path(__file__).resolve().parent / "results"
PRICE = Price(prompt=0.5, cached_prompt=0.05, completion=1.5, source="illustrative")


summary = forecast_errors  # median and p90 relative error of (predicted, actual) pairs


async def run(items: list[dict], ckpt: Path, review: int) -> list[Any]:
    engine = JaxEngine(ckpt, max_batch=16, session_cap_bytes=256 << 20, warmup=False)
    tiers = (TierSpec("reflex", max_batch=1),
             TierSpec("edge", engine=f"jax:{ckpt}", min_score=0.0, max_batch=16, max_concurrency=4,
                      timeout_s=600.0, price=PRICE))
    rule = Rule("review", lambda e: int(e.ts) // 10 % review == 0)
    pipe = dataclasses.replace(iot, tiers=tiers, gate=dataclasses.replace(iot.gate, rules=(*iot.gate.rules, rule), quiet=2))
    sink = MemorySink()
    await engine.start()
    try:
        await pipe.worker(MemorySource(items), sink, engines={"edge": engine}).run()
    finally:
        await engine.stop()
    return [d for d in sink.decisions if d.tier == "edge" and d.trace and d.trace.predicted]


def tiered(a: argparse.Namespace) -> dict[str, Any]:
    """The forecast's error on `ponder demo`'s run (ponder/demo.py computes it per decision)."""
    r = run_demo(a.devices, a.events_per_device, a.seed, tenants=2, cloud_preset=a.cloud_preset)
    d = r.to_dict()
    result: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "run": "ponder demo (iot_tiered)",
        "devices": a.devices, "events_per_device": a.events_per_device, "seed": a.seed, "tenants": d["tenants"],
        "models": d["models"], "cloud_price": d["cloud_price"], "edge_price": d["edge_price"],
        "decisions": d["stats"]["decisions"], "spend": d["spend"], "forecast": d["forecast"],
        "target_median_abs_cost_error": 0.10,
        "meets_target": d["forecast"]["cost_usd"].get("median_abs_error", 1.0) <= 0.10,
        "timings": d["timings"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("decisions", "forecast", "meets_target")}, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiered", action="store_true", help="measure on ponder demo's tiered run instead")
    ap.add_argument("--devices", type=int, default=None, help="[default: 8; --tiered: 200]")
    ap.add_argument("--events-per-device", type=int, default=None, help="[default: 150; --tiered: 500]")
    ap.add_argument("--seed", type=int, default=None, help="[default: 3; --tiered: 7, as ponder demo]")
    ap.add_argument("--review", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16, help="calls before the forecast is judged")
    ap.add_argument("--cloud-preset", default="small", help="with --tiered: the served cloud checkpoint")
    ap.add_argument("--out", type=Path, default=None,
                    help="[default: results/cost_forecast.json; --tiered: results/cost_forecast_tiered.json]")
    a = ap.parse_args(argv)
    if a.tiered:
        a.devices, a.events_per_device = a.devices or 200, a.events_per_device or 500
        a.seed = 7 if a.seed is None else a.seed
        a.out = a.out or RESULTS / "cost_forecast_tiered.json"
        return tiered(a)
    a.devices, a.events_per_device = a.devices or 8, a.events_per_device or 150
    a.seed = 3 if a.seed is None else a.seed
    a.out = a.out or RESULTS / "cost_forecast.json"
    items = list(iter_events(a.devices, a.events_per_device, a.seed))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny"
        init_model(ckpt, "tiny", seed=0)
        decisions = asyncio.run(run(items, ckpt, a.review))
    decisions.sort(key=lambda d: (d.ts, d.key))  # the order calls were forecast in, near enough
    fields = {"cost_usd": ("cost_usd", "cost_usd"), "prompt_tokens": ("prompt_tokens", "prompt_tokens"),
              "cached_prompt_tokens": ("cached_prompt_tokens", "cached_prompt_tokens"),
              "completion_tokens": ("completion_tokens", "completion_tokens")}
    result: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "devices": a.devices,
        "events_per_device": a.events_per_device, "seed": a.seed, "review": a.review, "warmup": a.warmup,
        "price_usd_per_mtok": {"prompt": PRICE.prompt, "cached_prompt": PRICE.cached_prompt,
                               "completion": PRICE.completion},
        "calls": len(decisions), "all": {}, "after_warmup": {},
    }
    for name, (pf, af) in fields.items():
        pairs = [(getattr(d.trace.predicted, pf), getattr(d.usage, af)) for d in decisions]
        result["all"][name] = summary(pairs)
        result["after_warmup"][name] = summary(pairs[a.warmup:])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("calls", "all", "after_warmup")}, indent=1))
    return result


if __name__ == "__main__":
    main()

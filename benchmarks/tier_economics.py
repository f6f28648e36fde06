"""What the gate and the tiers save: cost per 1,000 events on the simulator, tiered against
sending every event to the cloud tier.

The simulated fleet (`--devices` × `--events-per-device`, tenants = the simulator's sites) goes
through `iot_monitor` twice:

* **tiered**: the gate decides; an escalation starts at the edge tier (a `tiny` JAX checkpoint in
  process, random weights, priced as an illustrative edge box) and goes to the cloud tier when
  its gate score reaches `--cloud-score`;
* **every event to the cloud**: the same events, each one sent to the cloud tier.

The cloud tier is a stand-in (no hosted model can be called here): it answers at once with a
fixed valid decision, and reports the usage the same prompt would have at a hosted model whose
tokenizer is the checkpoint's, with automatic prefix caching (cached = the prefix shared with
the key's previous prompt). Its price is gpt-4o's list price from genai-prices. Reported: calls,
tokens and USD per tier, USD per 1,000 events in each run, and the saving.

    python benchmarks/tier_economics.py        # -> results/tier_economics.json
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
import time
from pathlib import Path
from typing import Any

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion
from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.engine import JaxEngine, chat_messages
from ponder.inference.jax.tokenizer import Tokenizer
from ponder.inference.openai import common_prefix
from ponder.operators.gate import Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot
from ponder.simulate import iter_events
from ponder.types import Usage

RESULTS = Path(__file__).resolve().parent / "results"
EDGE_PRICE = Price(prompt=0.02, cached_prompt=0.0, completion=0.08, source="illustrative edge box")
ANSWER = '{"action":"inspect_sensor","severity":"medium","reason":"cloud stand-in","confidence":0.9}'


class CloudStandIn:
    """A fake cloud tier: a fixed answer, and the usage a hosted model with prefix caching would
    report for the same prompt (counted with the checkpoint's own tokenizer)."""

    name = "cloud-stand-in"

    def __init__(self, ckpt: Path) -> None:
        self.tok = Tokenizer.from_dir(ckpt)
        self.completion = len(self.tok.encode(ANSWER))
        self.last: dict[str, str] = {}

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        out = []
        for r in requests:
            text = self.tok.apply_chat_template(chat_messages(r.prefix, r.tail), add_generation_prompt=True)
            prompt = len(self.tok.encode(text))
            last = self.last.get(r.session, "")
            cached = len(self.tok.encode(text[: common_prefix(text, last)])) if last else 0
            self.last[r.session] = text
            out.append(Completion(ANSWER, Usage(prompt, min(cached, prompt), self.completion), "gpt-4o (stand-in)"))
        return out


async def run(items: list[dict], ckpt: Path, *, every_event: bool, cloud_score: float) -> dict[str, Any]:
    cloud = CloudStandIn(ckpt)
    cloud_price = Price.hosted("gpt-4o", "openai")
    tiers = [TierSpec("reflex", max_batch=1),
             TierSpec("cloud", engine=cloud, min_score=0.0 if every_event else cloud_score, max_batch=16,
                      price=cloud_price)]
    engines: dict[str, Any] = {"cloud": cloud}
    gate = iot.gate
    if every_event:
        # every event escalates, incidents open or not (renotify 0: each flagged event again)
        gate = dataclasses.replace(gate, rules=(*gate.rules, Rule("every event", lambda e: True)), renotify=0.0)
    else:
        edge = JaxEngine(ckpt, max_batch=16, session_cap_bytes=256 << 20, warmup=False)
        tiers.append(TierSpec("edge", engine=f"jax:{ckpt}", min_score=0.0, max_batch=16, price=EDGE_PRICE))
        engines["edge"] = edge
    pipe = dataclasses.replace(iot, tenant="site", tiers=tuple(tiers), gate=gate)
    sink = MemorySink()
    logic, decoder, built = pipe.build(engines=engines)
    from ponder.runtime.worker import Worker

    t0 = time.perf_counter()
    stats = await Worker(logic, decoder, MemorySource(items), sink, built, pipe.tiers,
                         tenant_weights=pipe.tenant_weights).run()
    spend = logic.reasoner.spend.rows()
    by_tier: dict[str, dict[str, float]] = {}
    for row in spend:
        t = by_tier.setdefault(row["tier"], {"calls": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                                             "completion_tokens": 0, "usd": 0.0})
        for k in t:
            t[k] += row[k]
    usd = sum(r["usd"] for r in spend)
    return {"events": stats.events, "escalations": stats.escalations, "decisions": stats.decisions,
            "wall_s": time.perf_counter() - t0, "usd": usd, "usd_per_1k_events": 1000 * usd / stats.events,
            "by_tier": by_tier, "by_tenant_usd": {r["tenant"]: 0.0 for r in spend} | {
                t: sum(r["usd"] for r in spend if r["tenant"] == t) for t in {r["tenant"] for r in spend}}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--events-per-device", type=int, default=250)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--cloud-score", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=RESULTS / "tier_economics.json")
    a = ap.parse_args(argv)
    items = list(iter_events(a.devices, a.events_per_device, a.seed))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny"
        init_model(ckpt, "tiny", seed=0)
        tiered = asyncio.run(run(items, ckpt, every_event=False, cloud_score=a.cloud_score))
        every = asyncio.run(run(items, ckpt, every_event=True, cloud_score=a.cloud_score))
    result = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "devices": a.devices,
        "events_per_device": a.events_per_device, "seed": a.seed, "cloud_score": a.cloud_score,
        "cloud_price": "gpt-4o list price (genai-prices)", "edge_price": EDGE_PRICE.source,
        "tiered": tiered, "every_event_to_cloud": every,
        "saving": 1 - tiered["usd"] / every["usd"] if every["usd"] else None,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tiered", "every_event_to_cloud", "saving")}, indent=1))
    return result


if __name__ == "__main__":
    main()

"""An edge tier on llama.cpp: `iot_monitor` over a simulated fleet, every escalation sent to
llama-cpp-python's server running a GGUF that `ponder export-gguf` wrote from a random `tiny`
checkpoint (the answers mean nothing; whether they arrive, valid, and what they cost is what
is measured). A periodic review rule escalates each device about every `--review`-th reading,
as in edge_pipeline.py.

Two set-ups on the same server and events, back to back:

* **profile**: `server="auto"` discovers the llama.cpp profile: one request at a time (the
  server runs one, behind a lock), `json_object` + schema with bounded numbers as a grid,
  greedy sampling fields, cancellable streams, cached tokens estimated;
* **profile-blind**: `server="openai"`, as a client that knows nothing about the server:
  `max_batch × max_concurrency` = 64 streams at once (each new one makes llama-cpp-python end
  the running stream early: `interrupt_requests`), `json_schema` until the server's 500 moves
  it to `json_object` with the schema's bounds as they are.

Reported per set-up: wall time, escalations, decisions by the edge tier, degraded decisions,
calls that failed or were invalid, and prompt tokens estimated cached against the prefix the
server itself logged as reused (`Llama.generate: N prefix-match hit`).

    python benchmarks/llama_cpp_tier.py                 # -> results/llama_cpp_tier.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.gguf import export_gguf
from ponder.operators.gate import Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot
from ponder.simulate import iter_events

RESULTS = Path(__file__).resolve().parent / "results"
ALIAS = "edge"
PREFIX_HIT = re.compile(r"Llama.generate: (\d+) prefix-match hit")


def start_server(gguf: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                                 ALIAS, "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama.cpp server did not start: " + log.read_text()[-2000:])


async def run_once(name: str, items: list[dict], url: str, log: Path, *, server: str, review: int) -> dict[str, Any]:
    tiers = (TierSpec("reflex", max_batch=1),
             TierSpec("edge", engine=url, model=ALIAS, server=server, min_score=0.0, max_batch=16,
                      max_concurrency=4, timeout_s=300.0))
    rule = Rule("review", lambda e: int(e.ts) // 10 % review == 0)
    pipe = dataclasses.replace(iot, tiers=tiers, gate=dataclasses.replace(iot.gate, rules=(*iot.gate.rules, rule), quiet=2))
    seen = len(PREFIX_HIT.findall(log.read_text(errors="replace")))
    sink = MemorySink()
    t0 = time.perf_counter()
    stats = await pipe.worker(MemorySource(items), sink).run()
    wall = time.perf_counter() - t0
    hits = [int(n) for n in PREFIX_HIT.findall(log.read_text(errors="replace"))[seen:]]
    ds = sink.decisions
    edge_calls = sum(d.trace.route.count("edge") for d in ds)
    failed = sum(1 for d in ds for e in d.trace.errors if e.startswith("edge:"))
    return {"setup": name, "wall_s": wall, "events": stats.events, "escalations": stats.escalations,
            "decisions": stats.decisions, "edge_decisions": sum(1 for d in ds if d.tier == "edge" and not d.degraded),
            "degraded": stats.degraded, "edge_calls": edge_calls, "edge_calls_failed_or_invalid": failed,
            "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "cached_estimated": stats.cached_prompt_tokens, "cached_server_logged": sum(hits),
            "decisions_per_s": stats.decisions / wall}


def table(result: dict) -> str:
    rows = ["| set-up | wall s | escalations | decided by edge | degraded | edge calls failed/invalid | "
            "cached tokens: estimated / server log |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        rows.append(f"| {r['setup']} | {r['wall_s']:.1f} | {r['escalations']} | {r['edge_decisions']} | "
                    f"{r['degraded']} | {r['edge_calls_failed_or_invalid']} of {r['edge_calls']} | "
                    f"{r['cached_estimated']:,} / {r['cached_server_logged']:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--events-per-device", type=int, default=80)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--review", type=int, default=8, help="escalate about every N-th reading of a device")
    ap.add_argument("--out", type=Path, default=RESULTS / "llama_cpp_tier.json")
    a = ap.parse_args(argv)
    items = list(iter_events(a.devices, a.events_per_device, a.seed))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, gguf, log = Path(tmp) / "tiny", Path(tmp) / "tiny.gguf", Path(tmp) / "server.log"
        init_model(ckpt, "tiny", seed=0)
        export_gguf(ckpt, gguf)
        proc, url = start_server(gguf, log)
        try:
            for name, server in (("profile", "auto"), ("profile-blind", "openai")):
                print(f"{name} ...", file=sys.stderr, flush=True)
                runs.append(asyncio.run(run_once(name, items, url, log, server=server, review=a.review)))
                print(json.dumps(runs[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(10)
    p = runs[0]
    result = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "devices": a.devices,
        "events_per_device": a.events_per_device, "seed": a.seed, "review": a.review, "runs": runs,
        "cached_estimate_error": (p["cached_estimated"] - p["cached_server_logged"]) / max(p["cached_server_logged"], 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()

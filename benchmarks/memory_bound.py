"""Bounded key state: `ponder run` over many keys with the hot-key bound against the same run
with every key's state in memory.

Each configuration runs in its own process (`ponder run`, the built-in iot_monitor pipeline),
alternating, so both see the same machine; peak RSS comes from the kernel's rusage of the child.
The events are N keys x E readings, interleaved by time (key k's i-th reading after every key's
(i-1)-th), the worst case for an LRU: every event touches the coldest key.

    python benchmarks/memory_bound.py --keys 1000000 --events-per-key 3 --bound 50000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = """
from dataclasses import replace
from ponder.pipelines.iot_monitor import pipeline as base
bounded = replace(base, max_hot_keys={bound})
unbounded = replace(base, max_hot_keys=10**9)
"""


def write_events(path: Path, keys: int, per_key: int, seed: int) -> int:
    rng = random.Random(seed)
    t0 = 1_764_000_000.0
    with path.open("w") as f:
        for i in range(per_key):
            lines = []
            for k in range(keys):
                lines.append(f'{{"device_id":"dev-{k:07d}","ts":{t0 + 60 * i + k * 1e-3:.3f},'
                             f'"temperature":{20 + rng.random() * 2:.2f},"vibration":{0.2 + rng.random() * 0.05:.3f}}}\n')
            f.writelines(lines)
    return keys * per_key


def run_one(attr: str, events: Path, workdir: Path) -> dict:
    out = workdir / f"{attr}.jsonl"
    t = time.perf_counter()
    # a fresh interpreter per run, reporting its own peak (the children's rusage would be the
    # maximum over all runs)
    code = ("import resource, sys; from typer.main import get_command; from ponder.cli import app; "
            "cmd = get_command(app)\n"
            "try:\n    cmd.main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "run", f"bench_pipelines:{attr}", "--input", str(events),
                           "--output", str(out)], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(workdir)})
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rss_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS")))
    summary = next(line for line in proc.stderr.splitlines() if line.startswith("events="))
    n = int(summary.split()[0].split("=")[1])
    return {"events": n, "elapsed_s": round(elapsed, 2), "events_per_s": round(n / elapsed),
            "peak_rss_mb": round(rss_kb / 1024), "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--events-per-key", type=int, default=3)
    ap.add_argument("--bound", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory_bound.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ponder-membench-") as d:
        work = Path(d)
        (work / "bench_pipelines.py").write_text(PIPELINES.format(bound=args.bound))
        events = work / "events.jsonl"
        n = write_events(events, args.keys, args.events_per_key, args.seed)
        runs: dict[str, list[dict]] = {"bounded": [], "unbounded": []}
        for _ in range(args.repeats):
            for attr in ("bounded", "unbounded"):
                r = run_one(attr, events, work)
                runs[attr].append(r)
                print(attr, r, file=sys.stderr)
    best = {k: max(v, key=lambda r: r["events_per_s"]) for k, v in runs.items()}
    result = {
        "benchmark": "memory_bound",
        "keys": args.keys, "events_per_key": args.events_per_key, "events": n, "max_hot_keys": args.bound,
        "bounded": best["bounded"], "unbounded": best["unbounded"],
        "throughput_ratio": round(best["bounded"]["events_per_s"] / best["unbounded"]["events_per_s"], 3),
        "rss_ratio": round(best["bounded"]["peak_rss_mb"] / best["unbounded"]["peak_rss_mb"], 3),
        "runs": runs,
        "command": " ".join(["python", "benchmarks/memory_bound.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("bounded", "unbounded", "throughput_ratio")}, indent=2))


if __name__ == "__main__":
    main()

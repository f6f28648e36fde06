"""The trace store's overhead on the reflex-tier benchmark: events/s without and with it.

runtime_throughput's stream and framework run (the simulator's fleet through
`iot_monitor.pipeline.worker(...)`, reflex tier), alternately `--repeat` times in one process:
without a trace store, and with one (runtime/tracestore.py: a gate row for every event and
each decision with its explanation, written to SQLite at checkpoints and at the end, inside
the timed run). Time is the process's CPU time; reported: the ratio of events per CPU second
with / without, per repeat, their median, and the ratio of the summed CPU times. Target: >= 0.95.

This machine's speed drifts by 10-30% over seconds (a shared VM), more than the effect
measured: many short pairs, in alternating order, let the drift cancel in the median.

    python benchmarks/trace_store_overhead.py        # 20k events x 25 -> results/trace_store_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tracing_overhead import RESULTS, _throughput

from ponder.runtime.tracestore import TraceStore


def run(rt, records, store_dir: Path | None) -> dict[str, Any]:
    source, sink = rt.ListSource(records, 1024), rt.CountingSink()
    store = TraceStore(store_dir / "traces.db") if store_dir is not None else None
    worker = rt.pipeline.worker(source, sink, traces=store)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = asyncio.run(worker.run())
    if store is not None:
        store.close()
    return {"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "events": stats.events,
            "escalations": stats.escalations, "decisions": sink.decisions}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "trace_store_overhead.json")
    args = ap.parse_args(argv)
    rt = _throughput()
    devices, epd = rt.fleet_shape(args.events, None)
    records, _ = rt.make_records(devices, epd, args.seed)
    ratios, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run(rt, records[:10_000], None)  # imports and caches: untimed
        run(rt, records[:10_000], Path(tmp) / "warm")
        for i in range(max(1, args.repeat)):
            pair = {}
            for with_store in ((False, True) if i % 2 == 0 else (True, False)):
                d = Path(tmp) / f"r{i}-{int(with_store)}" if with_store else None
                if d is not None:
                    d.mkdir()
                pair[with_store] = run(rt, records, d)
            off, on = pair[False], pair[True]
            assert (off["events"], off["decisions"]) == (on["events"], on["decisions"])
            ratios.append(off["cpu_s"] / on["cpu_s"])
            runs.append({"without": off, "with": on})
            print(f"repeat {i + 1}: without {off['cpu_s']:.2f}s cpu, with {on['cpu_s']:.2f}s cpu, "
                  f"events/s with/without {ratios[-1]:.3f}", file=sys.stderr, flush=True)
    result = {
        "benchmark": "trace_store_overhead", "pipeline": "iot_monitor", "tier": "reflex",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "events": len(records), "repeat": len(ratios),
        "events_per_s_ratio_median": statistics.median(ratios), "ratios": ratios,
        "summed_cpu_ratio": sum(r["without"]["cpu_s"] for r in runs) / sum(r["with"]["cpu_s"] for r in runs),
        "best_ratio": min(r["without"]["cpu_s"] for r in runs) / min(r["with"]["cpu_s"] for r in runs),
        "target": ">= 0.95", "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"events/s with the trace store / without: median {result['events_per_s_ratio_median']:.3f}, "
          f"summed {result['summed_cpu_ratio']:.3f}, best runs {result['best_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()

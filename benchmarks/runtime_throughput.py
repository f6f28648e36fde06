"""Local runtime throughput, reflex tier: the framework against a plain Python loop.

The simulator's fleet telemetry is generated first (not timed) as JSON-lines bytes wrapped in
`Record(bytes, SourcePos)` objects. Then, alternately and `--repeat` times:

* **framework**: `iot_monitor.pipeline.worker(source, sink).run()`: decode, lanes, completion
  tracking, checkpoints, the reasoner walking the tiers, decisions counted by the sink;
* **baseline**: the same per-event work in one plain loop, with none of the runtime: decode with
  the same Decoder, a dict of KeyState, `logic.observe`, and for an escalated event the reflex
  engine's answer to `reasoner.request(...)`, parsed by `parse_answer` into a Decision.

Both must agree on escalations, decisions and actions. The overhead ratio is framework time over
baseline time, per repeat (the two run back to back, in alternating order), and the reported
number is the median over repeats. Time is the process's CPU time (single-threaded work, so it
is what the event path costs, and other processes on a busy machine barely move it); wall
time is reported beside it.

    python benchmarks/runtime_throughput.py                   # 1M events -> results/runtime_throughput.json
    python benchmarks/runtime_throughput.py --events 20000 --repeat 1 --out /tmp/t.json
    python benchmarks/runtime_throughput.py --events 200000 --profile   # cProfile top-25, framework
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as _dt
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec

from ponder.connectors.base import Record
from ponder.operators.decide import parse_answer
from ponder.operators.keyed import KeyState
from ponder.pipelines.iot_monitor import pipeline
from ponder.simulate import Fleet
from ponder.types import DeadLetter, Decision, SourcePos, Usage, decision_id

RESULTS = Path(__file__).resolve().parent / "results"
TOPIC = "telemetry"


# -- input ------------------------------------------------------------------------------------


def fleet_shape(events: int, devices: int | None) -> tuple[int, int]:
    """(devices, events per device) for about `events` events. By default 1000 events per
    device (so every key gets past the gate's warm-up), with at most 1000 devices."""
    if devices is None:
        devices = max(1, min(1000, events // 1000))
    return devices, max(1, math.ceil(events / devices))


def make_records(devices: int, events_per_device: int, seed: int) -> tuple[list[Record], int]:
    """The fleet's stream as Records over JSON-lines bytes, and the stream's size in bytes."""
    enc = msgspec.json.Encoder()
    fleet = Fleet(devices, events_per_device, seed)
    records: list[Record] = []
    nbytes = 0
    offset = 0
    for batch in fleet.iter_batches():
        blob = enc.encode_lines(batch)
        nbytes += len(blob)
        for line in blob.splitlines():
            records.append(Record(line, SourcePos(TOPIC, 0, offset)))
            offset += 1
    return records, nbytes


class ListSource:
    """A Source over prepared records, batched like JsonlSource (1024 a batch) and, like it,
    yielding to the event loop between batches so lanes make progress while reading."""

    def __init__(self, records: list[Record], batch: int = 1024) -> None:
        self.records = records
        self.batch = batch

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def batches(self) -> AsyncIterator[list[Record]]:
        recs, n = self.records, self.batch
        for i in range(0, len(recs), n):
            yield recs[i : i + n]
            await asyncio.sleep(0)


class CountingSink:
    """Counts decisions (per action) and dead letters; keeps nothing."""

    def __init__(self) -> None:
        self.decisions = 0
        self.dead_letters = 0
        self.by_action: Counter[str] = Counter()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def write(self, decision: Decision) -> None:
        self.decisions += 1
        self.by_action[decision.action] += 1

    def dead(self, letter: DeadLetter) -> None:
        self.dead_letters += 1

    async def flush(self) -> None:
        pass


# -- the two contestants ------------------------------------------------------------------------


def run_framework(records: list[Record], batch: int = 1024) -> dict[str, Any]:
    source, sink = ListSource(records, batch), CountingSink()
    worker = pipeline.worker(source, sink)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = asyncio.run(worker.run())
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "events": stats.events,
        "escalations": stats.escalations,
        "decisions": sink.decisions,
        "dead_letters": sink.dead_letters,
        "keys": stats.keys,
        "by_action": dict(sorted(sink.by_action.items())),
        "checkpoints": stats.checkpoints,
    }


def run_baseline(records: list[Record]) -> dict[str, Any]:
    """The same per-event work with no lanes, batching, tracker or event loop."""
    logic, decoder, engines = pipeline.build()
    reflex = engines["reflex"]
    reasoner = logic.reasoner
    actions = reasoner.actions
    new_state = logic.new_state
    observe = logic.observe
    states: dict[str, KeyState] = {}
    by_action: Counter[str] = Counter()
    events = escalations = decisions = dead = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for rec in records:
        events += 1
        ev = decoder(rec)
        if type(ev) is DeadLetter:
            dead += 1
            continue
        st = states.get(ev.key)
        if st is None:
            st = states[ev.key] = new_state(ev.key)
        verdict = observe(st, ev)
        if not verdict.escalate:
            continue
        escalations += 1
        req = reasoner.request(st.context, ev, verdict, "reflex")
        answer, _err = parse_answer(reflex.answer(req), actions)
        if answer is None:  # the reflex tier always answers validly; mirror the fallback anyway
            action, severity, reason, confidence = reasoner.fallback_action, "info", "fallback", 0.0
        else:
            action, severity, reason, confidence = (answer.action, answer.severity, answer.reason,
                                                    answer.confidence)
        d = Decision(decision_id(ev.key, ev.source), ev.key, action, severity, reason, confidence,
                     "reflex", "reflex", Usage(), 0.0, False,
                     {f.field: f.value for f in verdict.findings[:8] if f.value is not None},
                     ts=ev.ts, source=ev.source)
        decisions += 1
        by_action[d.action] += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "events": events,
        "escalations": escalations,
        "decisions": decisions,
        "dead_letters": dead,
        "keys": len(states),
        "by_action": dict(sorted(by_action.items())),
    }


def profile_framework(records: list[Record], top: int = 25, sort: str = "tottime") -> str:
    prof = cProfile.Profile()
    prof.enable()
    run_framework(records)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(top)
    return buf.getvalue()


# -- report ---------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    fw, bl = result["framework"], result["baseline"]
    rows = [
        "| run | events/s (CPU) | events/s (wall) | CPU s | wall s | escalations | decisions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in (("framework (Worker)", fw), ("baseline (plain loop)", bl)):
        rows.append(f"| {name} | {r['events_per_cpu_s']:,.0f} | {r['events_per_s']:,.0f} | "
                    f"{r['cpu_s']:.2f} | {r['elapsed_s']:.2f} | {r['escalations']:,} | {r['decisions']:,} |")
    rows += [
        "",
        f"overhead ratio (framework / baseline, CPU time): **{result['overhead_ratio']:.3f}** "
        f"(per repeat {', '.join(f'{r:.3f}' for r in result['overhead_ratios'])}); wall-time ratio "
        f"{result['wall_overhead_ratio']:.3f} (per repeat "
        f"{', '.join(f'{r:.3f}' for r in result['wall_overhead_ratios'])})",
        f"{result['events']:,} events ({result['devices']} devices x {result['events_per_device']}), "
        f"medians of {result['repeat']} repeats, Python {result['python']}, {result['cpu_count']} CPUs",
    ]
    return "\n".join(rows)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    walls = [r["elapsed_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    n = runs[0]["events"]
    out = {k: v for k, v in runs[0].items() if k not in ("elapsed_s", "cpu_s")}
    out.update(elapsed_s=round(wall, 4), cpu_s=round(cpu, 4),
               times_s=[round(t, 4) for t in walls], cpu_times_s=[round(t, 4) for t in cpus],
               events_per_s=round(n / wall, 1), events_per_cpu_s=round(n / cpu, 1))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="about this many events (default 1M)")
    ap.add_argument("--devices", type=int, default=None,
                    help="keys in the fleet (default: events/1000, at most 1000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each; medians reported")
    ap.add_argument("--batch", type=int, default=1024, help="records per source batch")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime_throughput.json")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile top-25 of one framework run (not in the JSON)")
    ap.add_argument("--profile-sort", default="tottime", help="pstats sort key (tottime, cumulative…)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    devices, epd = fleet_shape(args.events, args.devices)
    t0 = time.perf_counter()
    records, nbytes = make_records(devices, epd, args.seed)
    say(f"generated {len(records):,} events ({nbytes / 1e6:.1f} MB JSONL, {devices} devices x {epd}) "
        f"in {time.perf_counter() - t0:.1f}s")

    # warm up both paths (imports, caches, the allocator) on a slice, untimed
    warm = records[: min(20_000, max(1, len(records) // 10))]
    run_baseline(warm)
    run_framework(warm, args.batch)

    fw_runs: list[dict[str, Any]] = []
    bl_runs: list[dict[str, Any]] = []
    ratios: list[float] = []  # process CPU time: robust to other processes on a busy machine
    wall_ratios: list[float] = []
    for i in range(max(1, args.repeat)):
        # alternate the order, so a drift in machine speed does not favour one side
        if i % 2 == 0:
            bl = run_baseline(records)
            fw = run_framework(records, args.batch)
        else:
            fw = run_framework(records, args.batch)
            bl = run_baseline(records)
        say(f"repeat {i + 1}: framework {fw['elapsed_s']:.2f}s wall {fw['cpu_s']:.2f}s cpu  "
            f"baseline {bl['elapsed_s']:.2f}s wall {bl['cpu_s']:.2f}s cpu  "
            f"ratio cpu {fw['cpu_s'] / bl['cpu_s']:.3f} wall {fw['elapsed_s'] / bl['elapsed_s']:.3f}")
        for k in ("events", "escalations", "decisions", "dead_letters", "by_action"):
            assert fw[k] == bl[k], f"framework and baseline disagree on {k}: {fw[k]} != {bl[k]}"
        fw_runs.append(fw)
        bl_runs.append(bl)
        ratios.append(fw["cpu_s"] / bl["cpu_s"])
        wall_ratios.append(fw["elapsed_s"] / bl["elapsed_s"])

    fw_s, bl_s = _summary(fw_runs), _summary(bl_runs)
    result: dict[str, Any] = {
        "benchmark": "runtime_throughput",
        "pipeline": "iot_monitor",
        "tier": "reflex",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "devices": devices,
        "events_per_device": epd,
        "events": len(records),
        "input_bytes": nbytes,
        "source_batch": args.batch,
        "repeat": len(ratios),
        "escalations": fw_s["escalations"],
        "decisions": fw_s["decisions"],
        "escalation_rate": round(fw_s["escalations"] / max(1, len(records)), 6),
        "framework": fw_s,
        "baseline": bl_s,
        "overhead_ratio_basis": "process CPU time, median of per-repeat framework/baseline",
        "overhead_ratios": [round(r, 4) for r in ratios],
        "overhead_ratio": round(statistics.median(ratios), 4),
        "wall_overhead_ratios": [round(r, 4) for r in wall_ratios],
        "wall_overhead_ratio": round(statistics.median(wall_ratios), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(table(result))
        print(f"\nwrote {args.out}")
    if args.profile:
        print(f"\ncProfile of one framework run (top 25 by {args.profile_sort}):\n")
        print(profile_framework(records, 25, args.profile_sort))
    return result


if __name__ == "__main__":
    main()

"""The gate on NAB (and on the simulator's incidents), against a plain z-score baseline.

Each NAB series is one key, its rows events in order (`ts` = row time, payload `{"value": v}`).
A labelled anomaly window is hit when the detector escalates a row inside it; the targets are
window recall >= 95% with at most 5% of events escalated, and (near) zero escalations on the
anomaly-free series (artificialNoAnomaly).

The baseline, run on the same data in the same process: an EWMA mean and variance per series
(alpha 0.01, 30 events of warm-up), escalating every event with |x - mean| / sd > 4.

Both are also scored the NAB way (ponder/evaluate/nabscore.py: NAB's own sweeper and the
runner's arithmetic; equal to Numenta's scorer, numenta/NAB, on the same files): standard, low-FP
and low-FN profiles, normalised (null detector 0, perfect 100), over the corpus, per group at
the group's own best threshold, and leave-one-group-out (each group at the threshold that is
best on the others). The gate's anomaly score is its verdict's surprise (gate.Verdict), the
quantity the router ranks by. NAB's published detectors on the shipped subset are listed
beside it (their published result files, the same scorer).

With the simulator (`ponder.simulate`, on by default) the gate also scores a seeded fleet's
telemetry: an incident is caught when its key escalates between its start and its end plus
3 intervals; every other escalation is a false one. Its cost per event is measured against
the gate as it was before this benchmark scored NAB (`--baseline-rev`, loaded from git), on
the same events in alternation.

    python benchmarks/nab_gate.py                          # benchmarks/data/nab -> results/nab_gate.json
    python benchmarks/nab_gate.py --data /path/to/nab --out /tmp/nab.json --no-sim
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import msgspec

from ponder.evaluate.nab import NabReport, evaluate, gate_detector, group_scores, scores
from ponder.evaluate.nabscore import Series
from ponder.operators.gate import GatePolicy, new_state, observe
from ponder.types import Event, SourcePos

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "nab"  # the subset shipped with the repository
RESULTS = Path(__file__).resolve().parent / "results"

# NAB's published detectors on the shipped subset (realKnownCause, artificialWithAnomaly,
# artificialNoAnomaly), scored by NAB's scorer from their published result files
PUBLISHED = {
    "ARTime": (67.12, 58.12, 72.74), "Numenta HTM": (61.30, 54.31, 66.20),
    "CAD OSE": (50.52, 44.54, 55.02), "Relative Entropy": (50.00, 38.85, 56.00),
    "Random Cut Forest": (47.06, 34.71, 56.70), "KNN CAD": (43.70, 24.62, 53.14),
    "Twitter ADVec": (33.42, 19.53, 39.61), "Windowed Gaussian": (12.07, 4.81, 16.04),
}
BASELINE_REV = "3e4775c"
_PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")  # the gate before it was scored the NAB way (issue 14)

Z_THRESHOLD = 4.0
Z_ALPHA = 0.01
Z_WARMUP = 30


def zscore_detector(key: str, ts: Sequence[float], values: Sequence[float]
                    ) -> tuple[list[float], list[bool]]:
    """The baseline: fixed threshold on |x - EWMA mean| / EWMA sd, no hysteresis."""
    mean = var = 0.0
    scores: list[float] = []
    flags: list[bool] = []
    for i, x in enumerate(values):
        if i == 0:
            mean = x
        sd = math.sqrt(var)
        z = abs(x - mean) / sd if sd > 0.0 else (0.0 if x == mean else math.inf)
        hit = i >= Z_WARMUP and z > Z_THRESHOLD
        scores.append(min(1.0, z / (2.0 * Z_THRESHOLD)) if i >= Z_WARMUP else 0.0)
        flags.append(hit)
        a = max(Z_ALPHA, 1.0 / (i + 1))
        d = x - mean
        mean += a * d
        var = (1.0 - a) * (var + a * d * d)
    return scores, flags


def _files(report: NabReport) -> dict[str, dict[str, Any]]:
    return {f.file: msgspec.to_builtins(f) for f in report.files}


def _shown(path: Path) -> str:
    """The data path as the results file records it: repo-relative when inside the repository,
    so a results file does not name one machine's checkout."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def simulate_incidents(policy: GatePolicy, devices: int, events_per_device: int,
                       seed: int) -> dict[str, Any]:
    """Gate the simulator's fleet; score escalations against its incidents."""
    from ponder.simulate import Fleet

    fleet = Fleet(devices, events_per_device, seed)
    grace = 3.0 * fleet.interval_s * 1.05  # 3 intervals, plus the simulator's +-5% jitter
    windows: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for inc in fleet.incidents:
        windows[inc.key].append((inc.start, inc.end + grace, inc.kind))
    for w in windows.values():
        w.sort()
    states: dict[str, Any] = {}
    escalations: dict[str, list[float]] = defaultdict(list)
    n = 0
    t0 = time.perf_counter()
    for i, rec in enumerate(fleet.iter_events()):
        key = rec["device_id"]
        payload = {k: v for k, v in rec.items() if k not in ("device_id", "ts")}
        st = states.get(key)
        if st is None:
            st = states[key] = new_state()
        if observe(policy, st, Event(key, rec["ts"], payload, SourcePos("sim", 0, i))).escalate:
            escalations[key].append(rec["ts"])
        n += 1
    elapsed = time.perf_counter() - t0
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    false = 0
    for key, w in windows.items():
        for a, b, kind in w:
            by_kind[kind][1] += 1
            by_kind[kind][0] += any(a <= t <= b for t in escalations[key])
    starts = {k: [a for a, _, _ in w] for k, w in windows.items()}
    for key, ts in escalations.items():
        w = windows.get(key, [])
        for t in ts:
            j = bisect_right(starts.get(key, []), t)
            if not any(w[m][0] <= t <= w[m][1] for m in range(j)):
                false += 1
    caught = sum(c for c, _ in by_kind.values())
    total = sum(t for _, t in by_kind.values())
    esc = sum(len(v) for v in escalations.values())
    return {
        "devices": devices, "events_per_device": events_per_device, "seed": seed,
        "events": n, "incidents": total, "caught": caught,
        "incident_recall": round(caught / total, 4) if total else 1.0,
        "by_kind": {k: {"caught": c, "incidents": t} for k, (c, t) in sorted(by_kind.items())},
        "escalations": esc, "false_escalations": false,
        "false_per_1k_events": round(1000.0 * false / n, 4) if n else 0.0,
        "gate_us_per_event": round(1e6 * elapsed / n, 2) if n else 0.0,
    }


def _gate_at(rev: str):
    """ponder/operators/gate.py as it was at git revision `rev`, loaded as its own module (it
    imports only ponder.types); None without git or that revision."""
    import importlib.util
    import subprocess
    import tempfile

    try:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ponder/operators/gate.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / f"gate_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"gate_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


def gate_cost(rev: str, devices: int, events_per_device: int, seed: int, rounds: int = 5
              ) -> dict[str, Any] | None:
    """CPU microseconds per event of the gate now and at `rev`, on the same simulated events,
    in alternating rounds (median of each), and the encoded state per key of each."""
    from ponder.operators import gate as now
    from ponder.simulate import Fleet

    old = _gate_at(rev)
    if old is None:
        return None
    events = []
    for i, rec in enumerate(Fleet(devices, events_per_device, seed).iter_events()):
        payload = {k: v for k, v in rec.items() if k not in ("device_id", "ts")}
        events.append(Event(rec["device_id"], rec["ts"], payload, SourcePos("sim", 0, i)))

    def once(mod) -> tuple[float, float]:
        g, states = mod.GatePolicy(), {}
        t0 = time.process_time()
        for ev in events:
            st = states.get(ev.key)
            if st is None:
                st = states[ev.key] = mod.new_state()
            mod.observe(g, st, ev)
        us = 1e6 * (time.process_time() - t0) / len(events)
        size = sum(len(msgspec.msgpack.encode(st)) for st in states.values()) / len(states)
        return us, size

    runs: dict[str, list[tuple[float, float]]] = {"now": [], "baseline": []}
    for r in range(rounds):
        for name in (("now", "baseline") if r % 2 == 0 else ("baseline", "now")):
            runs[name].append(once(now if name == "now" else old))
    med = {k: sorted(u for u, _ in v)[len(v) // 2] for k, v in runs.items()}
    return {"baseline_rev": rev, "events": len(events), "rounds": rounds,
            "us_per_event": round(med["now"], 2), "baseline_us_per_event": round(med["baseline"], 2),
            "ratio": round(med["now"] / med["baseline"], 3),
            "state_bytes_per_key": round(runs["now"][0][1]), "baseline_state_bytes_per_key": round(runs["baseline"][0][1])}


def _nab(series: dict[str, Series]) -> dict[str, Any]:
    return {"corpus": {p: {"score": round(s.normalized, 2), "threshold": s.threshold, "fp": s.fp}
                       for p, s in scores(series).items()},
            "groups": {g: {k: _plain(v) for k, v in row.items()} for g, row in group_scores(series).items()}}


def _plain(v: Any) -> Any:
    """A float to 4 places for the JSON file; NaN (a group without windows has no score) as null."""
    if not isinstance(v, float):
        return v
    return None if v != v else round(v, 4)


def markdown(result: dict[str, Any]) -> str:
    gate, base = result["gate"], result["baseline"]
    lines = ["| series | events | gate: windows hit | gate: escalated | z-score: windows hit "
             "| z-score: escalated |", "|---|---:|---:|---:|---:|---:|"]
    for name, g in gate["files"].items():
        b = base["files"][name]
        lines.append(f"| {name} | {g['events']} | {g['windows_hit']}/{g['windows']} | "
                     f"{g['escalations']} ({g['escalation_rate']:.2%}) | "
                     f"{b['windows_hit']}/{b['windows']} | "
                     f"{b['escalations']} ({b['escalation_rate']:.2%}) |")
    gt, bt = gate["totals"], base["totals"]
    lines.append(f"| **total** | {gt['events']} | **{gt['windows_hit']}/{gt['windows']} "
                 f"({gt['window_recall']:.0%})** | **{gt['escalations']} "
                 f"({gt['escalation_rate']:.2%})** | {bt['windows_hit']}/{bt['windows']} "
                 f"({bt['window_recall']:.0%}) | {bt['escalations']} "
                 f"({bt['escalation_rate']:.2%}) |")
    r = result["ratio"]
    lines.append("")
    lines.append("| detector | standard | low FP | low FN |")
    lines.append("|---|---:|---:|---:|")
    rows = [("**ponder gate**", *(result["nab"]["gate"]["corpus"][p]["score"] for p in _PROFILES)),
            *((name, *v) for name, v in PUBLISHED.items()),
            ("z-score baseline", *(result["nab"]["baseline"]["corpus"][p]["score"] for p in _PROFILES))]
    for name, *v in sorted(rows, key=lambda row: -row[1]):
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in v) + " |")
    lines.append("")
    lines.append("| group (standard) | own threshold | leave-one-group-out | its threshold | false positives |")
    lines.append("|---|---:|---:|---:|---:|")
    for g, row in result["nab"]["gate"]["groups"].items():
        own = "n/a (no windows)" if row["score"] is None else f"{row['score']:.2f}"
        held = "n/a" if row.get("logo_score") is None else f"{row['logo_score']:.2f}"
        lines.append(f"| {g} | {own} | {held} | {row.get('logo_threshold', '')} | {row.get('logo_fp', '')} |")
    lines.append("")
    lines.append(f"Anomaly-free series: gate {gt['no_anomaly_escalations']} escalations "
                 f"({gt['no_anomaly_after_probation']} after NAB's 15% probation), z-score "
                 f"{bt['no_anomaly_escalations']}. The z-score baseline escalates "
                 f"{r['escalations']}x as often as the gate, with {r['false_escalations']}x its "
                 f"false escalations.")
    sim = result.get("simulator")
    if sim:
        lines.append(f"Simulator ({sim['devices']} devices x {sim['events_per_device']} events, "
                     f"seed {sim['seed']}): {sim['caught']}/{sim['incidents']} incidents caught "
                     f"({sim['incident_recall']:.1%}), {sim['false_escalations']} false "
                     f"escalations ({sim['false_per_1k_events']} per 1k events), gate "
                     f"{sim['gate_us_per_event']} us/event.")
    cost = result.get("gate_cost")
    if cost:
        lines.append(f"Gate cost: {cost['us_per_event']} us/event against {cost['baseline_us_per_event']} "
                     f"before (rev {cost['baseline_rev']}, same events, {cost['rounds']} alternating rounds): "
                     f"{cost['ratio']}x; state {cost['state_bytes_per_key']} bytes/key against "
                     f"{cost['baseline_state_bytes_per_key']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="NAB folder (default %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS / "nab_gate.json")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="also write NAB results CSVs for both detectors here")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator check")
    ap.add_argument("--sim-devices", type=int, default=200)
    ap.add_argument("--sim-events", type=int, default=2000, help="events per device")
    ap.add_argument("--sim-seed", type=int, default=1)
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help="git revision whose gate is the cost baseline ('' to skip)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"no NAB data at {args.data}")
    policy = GatePolicy()

    t0 = time.perf_counter()
    gate_series: dict[str, Series] = {}
    gate = evaluate(args.data, gate_detector(policy), name="ponder", out_dir=args.results_dir,
                    series=gate_series)
    gate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_series: dict[str, Series] = {}
    base = evaluate(args.data, zscore_detector, name="zscore", out_dir=args.results_dir,
                    series=base_series)
    base_s = time.perf_counter() - t0

    gt, bt = gate.totals, base.totals
    result: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "data": _shown(args.data),
        "policy": {k: v for k, v in asdict(policy).items() if k != "rules"},
        "targets": {"window_recall_min": 0.95, "escalation_rate_max": 0.05},
        "gate": {"totals": msgspec.to_builtins(gt), "files": _files(gate),
                 "seconds": round(gate_s, 3)},
        "baseline": {"detector": f"|x - EWMA mean| / EWMA sd > {Z_THRESHOLD} "
                                 f"(alpha {Z_ALPHA}, warm-up {Z_WARMUP})",
                     "totals": msgspec.to_builtins(bt), "files": _files(base),
                     "seconds": round(base_s, 3)},
        "ratio": {  # baseline / gate
            "escalations": _ratio(bt.escalations, gt.escalations),
            "false_escalations": _ratio(bt.false_escalations, gt.false_escalations),
            "window_recall": _ratio(bt.window_recall, gt.window_recall),
        },
        "meets_targets": gt.window_recall >= 0.95 and gt.escalation_rate <= 0.05,
        "nab": {"gate": _nab(gate_series), "baseline": _nab(base_series),
                "published": {k: dict(zip(_PROFILES, v)) for k, v in PUBLISHED.items()}},
    }
    if not args.no_sim:
        result["simulator"] = simulate_incidents(policy, args.sim_devices, args.sim_events,
                                                 args.sim_seed)
        if args.baseline_rev:
            result["gate_cost"] = gate_cost(args.baseline_rev, min(args.sim_devices, 100),
                                            min(args.sim_events, 1000), args.sim_seed)
    result = json.loads(json.dumps(result))  # plain JSON types: what the file will hold
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(markdown(result))
        print(f"\nwrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

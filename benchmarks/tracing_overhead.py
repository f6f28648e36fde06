"""Tracing overhead on the reflex-tier benchmark: events/s with OpenTelemetry off and on.

The stream and the contestant are runtime_throughput's framework run: the simulator's fleet as
JSON-lines records, through `iot_monitor.pipeline.worker(...)` (reflex tier). Alternately and
`--repeat` times, in one process:

* **off**: no `OTEL_*` variable set, so no exporter exists (the worker's tracing is None);
* **on**: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` points at an OTLP/HTTP receiver on loopback, a
  separate process that decodes every export with opentelemetry-proto and counts its spans.
  Every escalated event's spans are built, batched, serialized and sent, and the final flush
  at the worker's close is inside the timed run. The receiver must count one `event` span per
  escalation.

Time is the process's CPU time (the exporter's thread included, the receiver's process not),
with wall time beside it. Reported: the ratio on/off of events per CPU second, per repeat and
their median, and the ratio of the best runs (least CPU time each way).

On a busy shared machine those ratios swing by more than the effect, so the cost is also
measured by its parts, each in a tight loop: what tracing adds to every event (four clock
readings) and what one traced event costs (its spans built, batched, serialized and sent to
the receiver, flushed). The estimated ratio is the off run's CPU time over itself plus those
parts times the events and the traced events. Target: >= 0.95, i.e. at most 5% fewer events/s.

    python benchmarks/tracing_overhead.py                  # 50k events x 15 -> results/tracing_overhead.json
    python benchmarks/tracing_overhead.py --events 20000 --repeat 1 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _throughput():
    """runtime_throughput.py, for its stream and its framework run."""
    spec = importlib.util.spec_from_file_location("_runtime_throughput", HERE / "runtime_throughput.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# -- the receiver (its own process) -------------------------------------------------------------


def serve() -> None:
    """An OTLP/HTTP trace endpoint on a free loopback port: POST /v1/traces decodes and counts
    spans by name, GET /count answers the counts. Prints its URL, serves until stdin closes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    counts: Counter[str] = Counter()
    ok = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            req = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    counts.update(s.name for s in ss.spans)
            counts["(exports)"] += 1
            self._send(ok, "application/x-protobuf")

        def do_GET(self) -> None:
            self._send(json.dumps(counts).encode(), "application/json")

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None: ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()  # until the benchmark closes our stdin
    server.shutdown()


@contextlib.contextmanager
def receiver():
    """(url, counts()) of a receiver process, stopped on exit."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            msg = f"the OTLP receiver did not start (it said {url!r})"
            raise RuntimeError(msg)

        def counts() -> Counter[str]:
            with urllib.request.urlopen(url + "/count", timeout=10) as r:
                return Counter(json.loads(r.read()))

        yield url, counts
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def otel_env(endpoint: str | None):
    """The OTEL_* variables as a run wants them: only the traces endpoint, or none."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    for k in saved:
        del os.environ[k]
    if endpoint:
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint + "/v1/traces"
    try:
        yield
    finally:
        os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
        os.environ.update(saved)


# -- the cost by its parts ----------------------------------------------------------------------


def part_costs(rt, records: list, url: str, traces: int) -> dict[str, float]:
    """CPU seconds tracing adds to each event, and to each traced event (best of 3 each)."""
    import asyncio

    from ponder.pipelines.iot_monitor import pipeline
    from ponder.runtime import worker as worker_mod

    now, n = worker_mod._now, 200_000
    per_event = []
    for _ in range(3):
        c0 = time.process_time()
        for _ in range(n):  # the four readings `_admit` takes with tracing on (the loop counted too)
            now()
            now()
            now()
            now()
        per_event.append((time.process_time() - c0) / n)
    # one escalated event's arguments to `record`, from a traced run
    with otel_env(url):
        worker = pipeline.worker(rt.ListSource(records), rt.CountingSink())
    seen: list[tuple] = []
    record = worker.tracing.record
    worker.tracing.record = lambda *a: (seen.append(a), record(*a))[1]
    asyncio.run(worker.run())
    if not seen:
        msg = "no event escalated in the sample: give the benchmark more events"
        raise RuntimeError(msg)
    per_trace = []
    for _ in range(3):
        with otel_env(url):
            tracing = worker_mod.from_env(pipeline.tiers, worker.engines, pipeline=pipeline.name)
        c0 = time.process_time()
        for i in range(traces):
            tracing.record(*seen[i % len(seen)])
            if i % 100 == 99:  # within the exporter's queue (2048 spans): none dropped
                tracing.provider.force_flush()
        tracing.provider.force_flush()
        per_trace.append((time.process_time() - c0) / traces)
        asyncio.run(tracing.close())
    return {"per_event_s": min(per_event), "per_trace_s": min(per_trace)}


# -- the runs -------------------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    wall = statistics.median(r["elapsed_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    n = runs[0]["events"]
    return {"events": n, "escalations": runs[0]["escalations"], "decisions": runs[0]["decisions"],
            "elapsed_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "times_s": [round(r["elapsed_s"], 4) for r in runs], "cpu_times_s": [round(r["cpu_s"], 4) for r in runs],
            "events_per_s": round(n / wall, 1), "events_per_cpu_s": round(n / cpu, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="about this many events (default 50k)")
    ap.add_argument("--devices", type=int, default=None, help="keys (default: events/1000, at most 1000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=15, help="timed runs each way; medians reported")
    ap.add_argument("--traces", type=int, default=2000, help="traced events timed for the per-trace cost")
    ap.add_argument("--out", type=Path, default=RESULTS / "tracing_overhead.json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the receiver process
    args = ap.parse_args(argv)
    if args.serve:
        serve()
        return {}
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rt = _throughput()
    devices, epd = rt.fleet_shape(args.events, args.devices)
    records, nbytes = rt.make_records(devices, epd, args.seed)
    say(f"generated {len(records):,} events ({devices} devices x {epd})")

    off_runs: list[dict[str, Any]] = []
    on_runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    wall_ratios: list[float] = []
    exported: Counter[str] = Counter()
    with receiver() as (url, counts):
        warm = records[: min(20_000, max(1, len(records) // 10))]
        for endpoint in (None, url):  # imports, caches, the exporter's first connection: untimed
            with otel_env(endpoint):
                rt.run_framework(warm)
        before = counts()
        for i in range(max(1, args.repeat)):
            # alternate the order, so a drift in machine speed favours neither
            pair = {}
            for endpoint in ((None, url) if i % 2 == 0 else (url, None)):
                with otel_env(endpoint):
                    pair[endpoint is not None] = rt.run_framework(records)
            off, on = pair[False], pair[True]
            for k in ("events", "escalations", "decisions", "by_action"):
                assert off[k] == on[k], f"tracing changed {k}: {off[k]} != {on[k]}"
            off_runs.append(off)
            on_runs.append(on)
            ratios.append(off["cpu_s"] / on["cpu_s"])  # events/s on over events/s off
            wall_ratios.append(off["elapsed_s"] / on["elapsed_s"])
            say(f"repeat {i + 1}: off {off['cpu_s']:.2f}s cpu  on {on['cpu_s']:.2f}s cpu  "
                f"events/s on/off {ratios[-1]:.3f} (wall {wall_ratios[-1]:.3f})")
        after = counts()
        parts = part_costs(rt, records[: min(len(records), 50_000)], url, args.traces)
    exported = after - before
    escalations = on_runs[0]["escalations"]
    traced = exported["event"]
    assert traced == escalations * len(on_runs), (
        f"the receiver counted {traced} traces for {escalations} escalations x {len(on_runs)} runs")

    result: dict[str, Any] = {
        "benchmark": "tracing_overhead",
        "pipeline": "iot_monitor",
        "tier": "reflex",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "devices": devices,
        "events_per_device": epd,
        "events": len(records),
        "input_bytes": nbytes,
        "repeat": len(ratios),
        "escalations": escalations,
        "escalation_rate": round(escalations / max(1, len(records)), 6),
        "exporter": "OTLP/HTTP (http/protobuf) to a receiver process on loopback",
        "spans_per_run": round(sum(v for k, v in exported.items() if not k.startswith("(")) / len(on_runs), 1),
        "exports_per_run": round(exported["(exports)"] / len(on_runs), 1),
        "off": _summary(off_runs),
        "on": _summary(on_runs),
        "ratio_basis": "events per process CPU second, tracing on over off, median of per-repeat ratios",
        "ratios": [round(r, 4) for r in ratios],
        "ratio": round(statistics.median(ratios), 4),
        "best_ratio": round(min(r["cpu_s"] for r in off_runs) / min(r["cpu_s"] for r in on_runs), 4),
        "wall_ratios": [round(r, 4) for r in wall_ratios],
        "wall_ratio": round(statistics.median(wall_ratios), 4),
        "target_ratio": 0.95,
    }
    off_cpu = result["off"]["cpu_s"]
    added = len(records) * parts["per_event_s"] + escalations * parts["per_trace_s"]
    result["parts"] = {"per_event_us": round(parts["per_event_s"] * 1e6, 4),
                       "per_traced_event_us": round(parts["per_trace_s"] * 1e6, 2),
                       "off_per_event_us": round(off_cpu / len(records) * 1e6, 3),
                       "added_cpu_s": round(added, 5)}
    result["estimated_ratio"] = round(off_cpu / (off_cpu + added), 4)
    result["meets_target"] = result["estimated_ratio"] >= result["target_ratio"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        off_s, on_s = result["off"], result["on"]
        print("| tracing | events/s (CPU) | events/s (wall) | traced events | spans exported |")
        print("| --- | ---: | ---: | ---: | ---: |")
        print(f"| off | {off_s['events_per_cpu_s']:,.0f} | {off_s['events_per_s']:,.0f} | 0 | 0 |")
        print(f"| on (OTLP/HTTP) | {on_s['events_per_cpu_s']:,.0f} | {on_s['events_per_s']:,.0f} | "
              f"{escalations:,} | {result['spans_per_run']:,.0f} |")
        print(f"\nevents/s on/off: **{statistics.median(ratios):.3f}** (CPU; per repeat "
              f"{', '.join(f'{r:.3f}' for r in ratios)}), best runs {result['best_ratio']:.3f}, "
              f"wall {statistics.median(wall_ratios):.3f}; "
              f"{len(records):,} events, {escalations} escalations, medians of {len(ratios)} repeats")
        p = result["parts"]
        print(f"by its parts: {p['per_event_us']:.3f} us an event + {p['per_traced_event_us']:.1f} us a traced "
              f"event, against {p['off_per_event_us']:.1f} us an event untraced: estimated on/off "
              f"**{result['estimated_ratio']:.4f}**")
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()

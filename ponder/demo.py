"""`ponder demo`: the embedded default job, every tier on this machine, nothing downloaded.

1. Two random checkpoints are written to a temporary directory (`init_model`): a `tiny` one
   for the edge tier, run in process, and a bigger one (`small`) for the cloud tier, served by
   `ponder serve-model` on a free loopback port as a stand-in for vLLM. The server is a child
   process, stopped when the demo ends however it ends (an error, Ctrl-C, SIGTERM).
2. A two-tenant fleet is simulated (`ponder/simulate.py`, tenants acme and globex).
3. `ponder.pipelines.iot_tiered` runs over it: gate, reflex rules, edge model, cloud model,
   each tenant's budgets.
4. The summary: per tenant and tier what was called and spent against the caps, incident
   recall, the cost per 1,000 events tiered against every event sent to the cloud tier, and how
   far the cost forecast a budget reserves by was off.

The weights are random: the answers mean nothing, while the tokens, cache hits, costs and
budgets are real.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "ServedModel", "cost_per_1k_every_event", "forecast_errors", "run_demo",
           "tables"]

# Few events may wait behind keys' model calls before the source pauses: the stream then runs
# only a little ahead of the calls, as a live stream would, rather than sending every
# escalation in the file at once (so the cost forecast learns from the first calls' usage).
DEMO_MAX_INFLIGHT = 16
# The cloud's context: iot_tiered's prompts are ~1,400 tokens to this tokenizer, and a shorter
# context leaves the server fewer cache lengths to compile for (its answer budget is cut to fit).
CLOUD_SEQ_LEN = 2048
SERVER_START_S = 180.0  # the first request to a server compiles; starting is import + load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedModel:
    """`ponder serve-model PATH` on a free loopback port, as a child process; a context manager
    that waits until `/v1/models` answers and always stops the server on exit."""

    def __init__(self, path: Path, log: Path, *, max_batch: int = 8, max_seq_len: int | None = None,
                 timeout_s: float = SERVER_START_S) -> None:
        self.path, self.log, self.max_batch, self.timeout_s = Path(path), Path(log), max_batch, timeout_s
        self.max_seq_len = max_seq_len
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ServedModel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import httpx

        self.port = _free_port()
        cmd = [sys.executable, "-m", "ponder.cli", "serve-model", str(self.path), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-batch", str(self.max_batch)]
        if self.max_seq_len:
            cmd += ["--max-seq-len", str(self.max_seq_len)]
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    msg = f"the model server exited with status {self.proc.returncode}: {self._tail()}"
                    raise RuntimeError(msg)
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/models", timeout=2.0).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    msg = (f"the model server did not answer on {self.url} within {self.timeout_s:.0f} s: "
                           f"{self._tail()}")
                    raise RuntimeError(msg)
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C does, so `finally` blocks stop the model server."""
    def raise_exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        old = signal.signal(signal.SIGTERM, raise_exit)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- the figures ----------------------------------------------------------------------------------


def _rel_error(pred: float, actual: float) -> float | None:
    return abs(pred - actual) / actual if actual else None


def forecast_errors(pairs: Iterable[tuple[float, float]]) -> dict[str, float | int]:
    """Median and 90th-percentile absolute error, relative to the actual figure, of
    (predicted, actual) pairs; pairs whose actual is 0 are left out."""
    errs = sorted(e for e in (_rel_error(p, a) for p, a in pairs) if e is not None)
    if not errs:
        return {"n": 0}
    return {"n": len(errs), "median_abs_error": statistics.median(errs),
            "p90_abs_error": errs[min(len(errs) - 1, int(0.9 * len(errs)))]}


def cost_per_1k_every_event(price: Any, calls: int, prompt: int, cached: int, completion: int) -> float | None:
    """USD per 1,000 events if every event went to the cloud tier: each event billed as the
    mean of the cloud calls measured (their prompt, cached and completion tokens) at `price`."""
    if not calls:
        return None
    return 1000.0 * price.cost(round(prompt / calls), round(cached / calls), round(completion / calls))


@dataclass
class DemoResult:
    """What a demo run measured (all of it JSON-friendly but `stats`)."""

    events: int
    devices: int
    tenants: tuple[str, ...]
    incidents: int
    stats: Any  # RunStats
    spend: list[dict]  # per (tenant, tier): calls, tokens, usd (operators/spend.py)
    budgets: list[dict]  # each budget's cap and this window's account (operators/budget.py)
    recall: float
    detected: int
    false_alarms_per_1k: float
    forecast: dict[str, dict]  # cost_usd, prompt_tokens, ...: forecast_errors over model decisions
    degraded: list[dict]  # per (tenant, tier that answered): decisions that wanted a higher tier
    tiered_usd_per_1k: float
    every_event_usd_per_1k: float | None
    cloud_mean: dict[str, float]  # the mean cloud call the every-event figure bills
    cloud_price: str
    edge_price: str
    models: dict[str, str]  # tier -> preset and where it ran
    timings: dict[str, float] = field(default_factory=dict)
    out_dir: str = ""
    server_url: str = ""

    @property
    def saving(self) -> float | None:
        if not self.every_event_usd_per_1k:
            return None
        return 1.0 - self.tiered_usd_per_1k / self.every_event_usd_per_1k

    def to_dict(self) -> dict[str, Any]:
        """Everything but the run's stats object, which is summarised."""
        s = self.stats
        out = {k: v for k, v in self.__dict__.items() if k != "stats"}
        out["tenants"] = list(self.tenants)
        out["stats"] = {"events": s.events, "keys": s.keys, "escalations": s.escalations, "decisions": s.decisions,
                        "degraded": s.degraded, "dead_letters": s.dead_letters, "by_action": dict(s.by_action),
                        "elapsed_s": s.elapsed_s}
        out["saving"] = self.saving
        return out


def _forecast(decisions: Iterable[Any]) -> dict[str, dict]:
    """The forecast's error over the decisions that called a model (their trace holds it)."""
    fields = ("cost_usd", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")
    pairs: dict[str, list[tuple[float, float]]] = {f: [] for f in fields}
    for d in decisions:
        p = d.trace.predicted if d.trace is not None else None
        if p is None:
            continue
        for f in fields:
            pairs[f].append((getattr(p, f), getattr(d.usage, f)))
    return {f: forecast_errors(v) for f, v in pairs.items()}


def run_demo(devices: int = 200, events_per_device: int = 500, seed: int = 7, out_dir: Path | None = None, *,
             tenants: int = 2, edge_preset: str = "tiny", cloud_preset: str = "small",
             progress: Callable[[Any], None] | None = None,
             log: Callable[[str], None] = lambda _msg: None) -> DemoResult:
    """Run the whole path (see the module docstring); files go to `out_dir` (a temporary
    directory, removed after, when None)."""
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ponder-demo-")))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_sigterm_unwinds())
        return _run(devices, events_per_device, seed, out_dir, tenants, edge_preset, cloud_preset,
                    progress, log, stack)


def _run(devices: int, events_per_device: int, seed: int, out: Path, tenants: int, edge_preset: str,
         cloud_preset: str, progress: Callable[[Any], None] | None, log: Callable[[str], None],
         stack: contextlib.ExitStack) -> DemoResult:
    import asyncio

    from ponder.connectors.files import JsonlSink, JsonlSource
    from ponder.evaluate.truth import read_decisions, score
    from ponder.inference.jax.checkpoint import init_model
    from ponder.pipelines import iot_tiered
    from ponder.simulate import simulate

    t0 = time.perf_counter()
    sim = simulate(devices, events_per_device, seed, out, tenants=tenants)
    log(f"simulated {sim.events:,} events from {sim.devices} devices of {len(sim.tenants)} tenants "
        f"({', '.join(sim.tenants)}) with {sim.incidents} incidents")
    models = out / "models"
    for name, preset in (("edge", edge_preset), ("cloud", cloud_preset)):
        cfg = init_model(models / name, preset, seed=0 if name == "edge" else 1)
        log(f"{name}: a {preset} checkpoint ({cfg.num_params / 1e6:.1f}M parameters, random weights) "
            f"in {models / name}")
    t_models = time.perf_counter()
    server = stack.enter_context(ServedModel(models / "cloud", out / "cloud-server.log",
                                             max_seq_len=CLOUD_SEQ_LEN))
    log(f"cloud: `ponder serve-model` on {server.url} (the stand-in for vLLM)")
    t_served = time.perf_counter()

    # a cloud call can wait behind the compiles of a cold CPU server: a generous deadline
    pipe = iot_tiered.build(f"jax:{models / 'edge'}", server.url, cloud_timeout_s=600.0)
    sink = JsonlSink(out / "decisions.jsonl")
    worker = pipe.worker(JsonlSource(out / "events.jsonl"), sink, progress=progress,
                         ledger=out / "ledger.json", max_inflight=DEMO_MAX_INFLIGHT)
    stats = asyncio.run(worker.run())
    t_run = time.perf_counter()

    reasoner = worker.logic.reasoner
    spend, budgets = reasoner.spend.rows(), reasoner.budgets.state()
    decisions = list(read_decisions(out / "decisions.jsonl"))  # about one per 1,000 events
    sc = score(out / "truth.json", decisions)
    degraded = Counter((d.tenant, d.tier) for d in decisions if d.degraded)
    cloud = [r for r in spend if r["tier"] == "cloud"]
    mean = {k: sum(r[k] for r in cloud) for k in ("calls", "prompt_tokens", "cached_prompt_tokens",
                                                 "completion_tokens")}
    usd = sum(r["usd"] for r in spend)
    every = cost_per_1k_every_event(iot_tiered.CLOUD_PRICE, mean["calls"], mean["prompt_tokens"],
                                    mean["cached_prompt_tokens"], mean["completion_tokens"])
    result = DemoResult(
        events=stats.events, devices=devices, tenants=sim.tenants, incidents=sim.incidents, stats=stats,
        spend=spend, budgets=budgets, recall=sc.incident_recall, detected=sc.detected,
        false_alarms_per_1k=sc.false_alarms_per_1k_events,
        forecast=_forecast(decisions),
        degraded=[{"tenant": t, "tier": tier, "decisions": n} for (t, tier), n in sorted(degraded.items())],
        tiered_usd_per_1k=1000.0 * usd / max(stats.events, 1), every_event_usd_per_1k=every,
        cloud_mean={k: v / mean["calls"] for k, v in mean.items() if k != "calls"} if mean["calls"] else {},
        cloud_price=iot_tiered.CLOUD_PRICE.source, edge_price=iot_tiered.EDGE_PRICE.source,
        models={"edge": f"{edge_preset}, in process (jax)", "cloud": f"{cloud_preset}, ponder serve-model"},
        timings={"simulate_and_init_s": t_models - t0, "server_start_s": t_served - t_models,
                 "pipeline_s": t_run - t_served, "total_s": t_run - t0},
        out_dir=str(out), server_url=server.url)
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


# -- the printed summary --------------------------------------------------------------------------


def _usd(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 0.01 or x == 0:
        return f"${x:,.4f}"
    return f"${x:.5f}" if x >= 1e-4 else f"${x:.2e}"


def tables(r: DemoResult) -> list[Any]:
    """The summary as rich tables: per tenant and tier, the budgets, and the run."""
    return [_tier_table(r), _budget_table(r), _run_table(r)]


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "—"


def _tier_table(r: DemoResult) -> Any:
    from rich import box
    from rich.table import Table

    # no vertical rules, and the caps left to the budgets table: it fits 80 columns
    per = Table(title=f"ponder demo: iot_tiered on a simulated fleet of {len(r.tenants)} tenants — RANDOM "
                      f"WEIGHTS (edge: {r.models['edge']}; cloud: {r.models['cloud']})",
                caption=f"USD: edge at {r.edge_price}; cloud at {r.cloud_price}. prompt, output: "
                        "tokens. cached: share of prompt tokens the server served from its cache. degraded: "
                        "decisions answered at this tier that wanted a higher one (a budget refused it, "
                        "or it failed).", box=box.SIMPLE_HEAD)
    for col in ("tenant", "tier", "calls", "prompt", "cached", "output", "USD", "degraded"):
        per.add_column(col, justify="left" if col in ("tenant", "tier") else "right")
    degraded = Counter({(d["tenant"], d["tier"]): d["decisions"] for d in r.degraded})
    keys = ("calls", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "usd")
    by_tier: dict[str, Counter] = {}
    for row in r.spend:
        by_tier.setdefault(row["tier"], Counter()).update({k: row[k] for k in keys})
    total = sum(by_tier.values(), Counter())

    def add(tenant: str, tier: str, t: Any, n_degraded: int) -> None:
        tokens = (f"{t['prompt_tokens']:,}", _share(t["cached_prompt_tokens"], t["prompt_tokens"]),
                  f"{t['completion_tokens']:,}") if tier != "all" else ("", "", "")
        per.add_row(tenant, tier, f"{t['calls']:,}", *tokens, _usd(t["usd"]), f"{n_degraded:,}")

    for row in r.spend:
        add(row["tenant"], row["tier"], row, degraded[(row["tenant"], row["tier"])])
    per.add_section()
    for tier in sorted({*by_tier, "reflex", "edge", "cloud"}):  # a tier never called shows 0
        t = by_tier.get(tier) or Counter(dict.fromkeys(keys, 0))
        add("all", tier, t, sum(n for (_, ti), n in degraded.items() if ti == tier))
    add("all", "all", total, sum(degraded.values()))
    return per


def _budget_table(r: DemoResult) -> Any:
    from rich.table import Table

    bud = Table(title="budgets (this hour's window; reserved: calls in flight)",
                caption="a call first reserves its worst case (every attempt, the whole answer budget), "
                        "so a cap turns calls away before what is spent reaches it")
    for col in ("tenant", "tier", "cap", "spent", "reserved", "used"):
        bud.add_column(col, justify="left" if col in ("tenant", "tier") else "right")
    for b in r.budgets:
        cap = b["cap_usd"]
        bud.add_row(b["tenant"], b["tier"], f"{_usd(cap)}/{b['per']}", _usd(b["spent_usd"]), _usd(b["reserved_usd"]),
                    _share(b["spent_usd"], cap))
    return bud


def _run_table(r: DemoResult) -> Any:
    from rich.table import Table

    m = r.cloud_mean
    every_how = (f"every event to the cloud: each of the {r.events:,} events billed as the mean cloud call "
                 f"measured here ({m['prompt_tokens']:,.0f} prompt tokens, {m['cached_prompt_tokens']:,.0f} of "
                 f"them cached, {m['completion_tokens']:,.0f} completion tokens) at the cloud price"
                 if m else "every event to the cloud: no cloud call was made, so nothing to bill it by")
    run = Table(title="the run", caption=every_how)
    run.add_column("metric")
    run.add_column("value", justify="right")
    s = r.stats
    rate = s.events / s.elapsed_s if s.elapsed_s else 0.0
    fc = r.forecast.get("cost_usd", {})
    rows = [("events", f"{s.events:,} ({len(r.tenants)} tenants)"), ("keys", f"{s.keys:,}"),
            ("events/s", f"{rate:,.0f}"),
            ("escalations", f"{s.escalations:,} ({1000 * s.escalations / max(1, s.events):.1f}/1k)"),
            ("degraded (budget, breaker or failure)", f"{s.degraded:,}"),
            ("dead letters", f"{s.dead_letters:,}"),
            *[(f"decisions: {a}", f"{n:,}") for a, n in s.by_action.most_common()],
            ("incident recall", f"{r.recall:.3f} ({r.detected}/{r.incidents})"),
            ("false alarms /1k events", f"{r.false_alarms_per_1k:.2f}"),
            ("USD per 1k events, tiered", _usd(r.tiered_usd_per_1k)),
            ("USD per 1k events, every event to the cloud", _usd(r.every_event_usd_per_1k)),
            ("saving", "—" if r.saving is None else f"{r.saving:.2%}"),
            ("cost forecast: median abs error", f"{fc['median_abs_error']:.1%} over {fc['n']} decisions"
             if fc.get("n") else "— (no model calls)"),
            ("time: models ready / pipeline / total",
             f"{r.timings['simulate_and_init_s'] + r.timings['server_start_s']:.0f} s / "
             f"{r.timings['pipeline_s']:.0f} s / {r.timings['total_s']:.0f} s")]
    for k, v in rows:
        run.add_row(k, v)
    return run


def environment_ready() -> str | None:
    """None, or why the demo cannot run here (the jax extra is not installed)."""
    import importlib.util

    missing = [m for m in ("jax", "tokenizers", "safetensors", "llguidance", "uvicorn")
               if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the demo runs JAX models, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed: pip install -e '.[jax]'")
    return None

"""The `ponder` command. Each command parses, calls the library and prints; heavy imports wait
until a command needs them, so `ponder --help` stays instant."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

app = typer.Typer(help="ponder: continuous model reasoning over keyed event streams.",
                  no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
out = Console()


def _source_for(path: str):
    from ponder.connectors.files import CsvSource, JsonlSource, NabSource

    if path == "-":
        return JsonlSource("-")
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.csv"))
        if not files:
            raise typer.BadParameter(f"directory {path!r} holds no CSV files")
        return NabSource(files, root=p)
    if not p.exists():
        raise typer.BadParameter(f"input {path!r} does not exist")
    if p.suffix.lower() == ".csv":
        return CsvSource(p)
    return JsonlSource(p)


def _run_pipeline(ref: str, source, sink, *, progress: bool, total: int | None = None, ledger=None,
                  traces: Path | None = None):
    from ponder.pipelines.pipeline import load_pipeline
    from ponder.runtime.tracestore import TraceStore

    try:
        pipe = load_pipeline(ref)
    except (ValueError, TypeError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    try:
        store = TraceStore(traces, pipeline=pipe.name) if traces is not None else None
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    try:
        return _run_worker(pipe, source, sink, progress=progress, total=total, ledger=ledger, traces=store)
    finally:
        if store is not None:
            store.close()


def _run_worker(pipe, source, sink, *, progress: bool, total: int | None, ledger, traces):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not progress:
        return _until_failed(lambda: pipe.worker(source, sink, ledger=ledger, traces=traces).run())
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err,
                  transient=False) as bar:
        task = bar.add_task(pipe.name, total=total, info="")

        def tick(s):
            bar.update(task, completed=s.events,
                       info=f"esc={s.escalations} dec={s.decisions} dead={s.dead_letters}")

        stats = _until_failed(lambda: pipe.worker(source, sink, progress=tick, ledger=ledger, traces=traces).run())
        tick(stats)  # the last batch's lanes drained after the last tick
    return stats


def _until_failed(main):
    """Run a worker; if it stopped on an error it could not handle, say what and exit 1."""
    from ponder.runtime.worker import WorkerFailed

    try:
        return asyncio.run(main())
    except WorkerFailed as e:
        err.print(f"[red]error:[/red] the worker stopped: {e} (nothing past that event was committed)")
        raise typer.Exit(1) from e


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="MODULE:PIPELINE, e.g. ponder.pipelines.iot_monitor:pipeline"),
    input: str = typer.Option(..., "--input", "-i", help="JSONL or CSV file, NAB directory, or - for stdin"),
    output: str = typer.Option("-", "--output", "-o", help="decisions JSONL (- for stdout)"),
    dead_letters: Optional[str] = typer.Option(None, help="dead-letter JSONL [default: OUTPUT.dead.jsonl]"),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="show a progress bar"),
    ledger: Optional[Path] = typer.Option(None, help="write the spend ledger (JSON) here at checkpoints"),
    traces: Optional[str] = typer.Option(
        None, help="trace store (SQLite) for `ponder explain` and `ponder costs` (default: "
        "OUTPUT.traces.db when OUTPUT is a file; none: keep no traces)"),
) -> None:
    """Run a pipeline over a file; decisions to OUTPUT, dead letters beside it."""
    from ponder.connectors.files import JsonlSink

    sink = JsonlSink(output, dead_letters)
    try:
        source = _source_for(input)
    except typer.BadParameter as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if traces is None:
        trace_path = Path(output + ".traces.db") if output != "-" else None
    else:
        trace_path = None if traces == "none" else Path(traces)
    stats = _run_pipeline(pipeline, source, sink, progress=progress, ledger=ledger, traces=trace_path)
    print(stats.line() + (f" dead_letter_file={sink.dead_path}" if stats.dead_letters else ""),
          file=sys.stderr)


@app.command()
def simulate(
    devices: int = typer.Option(100, help="number of devices (keys)"),
    events_per_device: int = typer.Option(1000, help="readings per device"),
    seed: int = typer.Option(0, help="random seed: same seed, same files"),
    out_dir: Path = typer.Option(Path("runs/sim"), "--out", help="output directory"),
    interval_s: float = typer.Option(10.0, help="seconds between a device's readings"),
    incident_rate: float = typer.Option(0.35, help="fraction of devices with an incident"),
    tenants: int = typer.Option(0, help="split the devices between N tenants (acme, globex, ...); "
                                        "events then carry a `tenant` field"),
    camera: bool = typer.Option(False, help="add a camera frame (a PNG data URL in `frame`) to every "
                                            "event, with labelled camera incidents"),
) -> None:
    """Simulate a fleet: DIR/events.jsonl plus DIR/truth.json (injected incidents)."""
    from ponder.simulate import simulate as sim

    try:
        s = sim(devices, events_per_device, seed, out_dir, interval_s=interval_s,
                incident_rate=incident_rate, tenants=tenants, camera=camera)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"wrote {s.events} events of {s.devices} devices and {s.incidents} incidents "
              f"{dict(s.by_kind)} to {out_dir}" + (f" (tenants: {', '.join(s.tenants)})" if s.tenants else ""))


@app.command()
def score(
    truth: Path = typer.Option(..., help="truth.json from `ponder simulate`"),
    decisions: Path = typer.Option(..., help="decisions JSONL from `ponder run`"),
    quiet_actions: str = typer.Option("none", help="comma-separated actions that are not alarms"),
) -> None:
    """Score decisions against the simulator's truth; prints JSON."""
    import msgspec

    from ponder.evaluate.truth import score as do_score

    for p in (truth, decisions):
        if not p.exists():
            err.print(f"[red]error:[/red] {str(p)!r} does not exist")
            raise typer.Exit(2)
    try:
        s = do_score(truth, decisions, quiet_actions=frozenset(quiet_actions.split(",")))
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    print(json.dumps(msgspec.to_builtins(s), indent=2))


@app.command()
def nab(
    data_dir: Path = typer.Argument(..., help="NAB data directory (with or without data/)"),
    out_dir: Path = typer.Option(Path("runs/nab"), "--out", help="results directory"),
) -> None:
    """Run the gate over NAB series and write NAB-format results."""
    from ponder.evaluate.nab import format_report, run_nab

    if not data_dir.is_dir():
        err.print(f"[red]error:[/red] {str(data_dir)!r} is not a directory")
        raise typer.Exit(2)
    from ponder.evaluate.nab import scores

    series: dict = {}
    report = run_nab(data_dir, out_dir, series=series)
    print(format_report(report))
    t = report.totals
    if any(s.windows for s in series.values()):
        print("NAB score (NAB's scorer arithmetic, best threshold per profile): " + ", ".join(
            f"{p} {s.normalized:.2f}" for p, s in scores(series).items()))
    print(f"escalation_rate={t.escalation_rate:.4f} window_recall={t.window_recall:.4f} "
          f"results={out_dir / 'ponder'}")


@app.command()
def demo(
    devices: int = typer.Option(200, help="devices to simulate"),
    events_per_device: int = typer.Option(500, help="readings per device"),
    seed: int = typer.Option(7),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="keep files here [default: a temp dir]"),
    tenants: int = typer.Option(2, help="tenants the devices are split between (acme, globex, ...)"),
    edge_preset: str = typer.Option("tiny", help="edge checkpoint preset (in process)"),
    cloud_preset: str = typer.Option("small", help="cloud checkpoint preset (served on loopback)"),
) -> None:
    """The embedded default job: a two-tenant fleet through iot_tiered, with a JAX edge model in
    process and a `ponder serve-model` cloud on loopback (random weights); summarise."""
    from ponder.demo import environment_ready, run_demo, tables

    why = environment_ready()
    if why:
        err.print(f"[red]error:[/red] {why}")
        raise typer.Exit(2)
    if tenants < 1:
        err.print(f"[red]error:[/red] --tenants must be >= 1, got {tenants}")
        raise typer.Exit(2)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("iot_tiered", total=devices * events_per_device, info="")

        def tick(s) -> None:
            bar.update(task, completed=s.events,
                       info=f"esc={s.escalations} dec={s.decisions} degraded={s.degraded} ${s.cost_usd:.4f}")

        try:
            result = run_demo(devices, events_per_device, seed, out_dir, tenants=tenants, edge_preset=edge_preset,
                              cloud_preset=cloud_preset, progress=tick, log=lambda m: bar.console.print(m))
        except ValueError as e:  # the simulator's or a preset's arguments
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
        except RuntimeError as e:  # the model server did not start, or the worker failed
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from e
        tick(result.stats)
    for t in tables(result):
        out.print(t)
    if out_dir:
        err.print(f"files kept in {out_dir}")


@app.command()
def worker(
    pipeline: str = typer.Argument(..., help="MODULE:PIPELINE"),
    brokers: str = typer.Option(..., help="bootstrap HOST:PORT"),
    group: Optional[str] = typer.Option(None, help="consumer group [default: ponder-<pipeline>]"),
    state_dir: Path = typer.Option(Path("state"), help="RocksDB state directory"),
    input_topic: Optional[str] = typer.Option(None, help="[default: the pipeline's]"),
    output_topic: Optional[str] = typer.Option(None, help="decisions topic [default: the pipeline's]"),
    dead_letter_topic: Optional[str] = typer.Option(None, help="[default: the pipeline's]"),
    partitions: int = typer.Option(16, help="partitions of topics this worker creates"),
    checkpoint_interval: float = typer.Option(2.0, help="seconds between checkpoints"),
    session_timeout_ms: int = typer.Option(10_000, help="consumer-group session timeout"),
    metrics_port: int = typer.Option(0, help="serve Prometheus /metrics on this port (0: off)"),
    ledger: Optional[Path] = typer.Option(None, help="write the spend ledger (JSON) here at checkpoints"),
    traces: Optional[str] = typer.Option(
        None, help="trace store (SQLite) for `ponder explain` and `ponder costs` "
        "(default: STATE_DIR/traces.db; none: keep no traces)"),
    runtime: str = typer.Option("native", help="native, faust (ponder[faust]) or bytewax (ponder[bytewax])"),
) -> None:
    """Run a pipeline as a Kafka consumer-group worker until SIGTERM, then drain and commit."""
    import logging

    from ponder.pipelines.kafka import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from ponder.pipelines.pipeline import load_pipeline

    if runtime not in ("native", "faust", "bytewax"):
        err.print(f"[red]error:[/red] --runtime must be native, faust or bytewax, got {runtime!r}")
        raise typer.Exit(2)
    try:
        pipe = load_pipeline(pipeline)
    except (ValueError, TypeError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if runtime != "native":
        _hosted_worker(runtime, pipe, brokers, group=group, state_dir=state_dir, input_topic=input_topic,
                       output_topic=output_topic, dead_letter_topic=dead_letter_topic, partitions=partitions,
                       session_timeout_ms=session_timeout_ms)
        return
    try:
        stats = _until_failed(lambda: run_worker(
            pipe, brokers, group=group, state_dir=state_dir, input_topic=input_topic,
            output_topic=output_topic, dead_letter_topic=dead_letter_topic, partitions=partitions,
            checkpoint_every_s=checkpoint_interval, session_timeout_ms=session_timeout_ms,
            metrics_port=metrics_port, ledger=ledger,
            traces=None if traces == "none" else Path(traces) if traces else state_dir / "traces.db"))
    except ValueError as e:  # before the run: topics that do not fit, a trace store it cannot open
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    print(stats.line(), file=sys.stderr)


def _hosted_worker(runtime: str, pipe: Any, brokers: str, **kw: Any) -> None:
    """The pipeline on another stream processor: ponder.runtime.faust or ponder.runtime.bytewax,
    which need their extra installed."""
    import importlib

    try:
        mod = importlib.import_module(f"ponder.runtime.{runtime}")
    except ImportError as e:
        err.print(f"[red]error:[/red] --runtime {runtime} needs `pip install 'ponder[{runtime}]'`: {e}")
        raise typer.Exit(2) from e
    try:
        mod.run_worker(pipe, brokers, **kw)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


@app.command()
def dev(port: int = typer.Option(0, help="port [default: a free one]")) -> None:
    """Start a local Kafka-protocol broker (Tansu, memory only) and print its address."""
    import signal
    import threading

    from ponder.connectors.kafka.dev import DevBroker

    broker = DevBroker(port or None).start()
    print(broker.bootstrap, flush=True)
    err.print(f"Kafka-protocol broker (Tansu, in memory) on {broker.bootstrap}; Ctrl-C stops it")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            if broker.proc is None or broker.proc.poll() is not None:
                err.print("[red]broker exited[/red]")
                raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


@app.command()
def publish(
    file: Optional[Path] = typer.Argument(None, help="JSONL file [default: stdin]"),
    brokers: str = typer.Option(..., help="bootstrap HOST:PORT"),
    topic: str = typer.Option(..., help="topic to publish to"),
    key_field: str = typer.Option("device_id", help="field whose value is the message key"),
    partitions: int = typer.Option(16, help="partitions if the topic must be created"),
    simulate_fleet: bool = typer.Option(False, "--simulate", help="publish a simulated fleet instead"),
    devices: int = typer.Option(100, help="with --simulate"),
    events_per_device: int = typer.Option(1000, help="with --simulate"),
    seed: int = typer.Option(0, help="with --simulate"),
    camera: bool = typer.Option(False, help="with --simulate: camera frames in every event"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Publish JSONL events (or a simulated fleet) keyed by KEY_FIELD."""
    from ponder.connectors.kafka.publish import publish_lines, simulated_lines

    if simulate_fleet:
        lines, total = simulated_lines(devices, events_per_device, seed, camera=camera)
    else:
        if file is not None and not file.exists():
            err.print(f"[red]error:[/red] {str(file)!r} does not exist")
            raise typer.Exit(2)
        fh = open(file, "rb") if file is not None else sys.stdin.buffer  # noqa: SIM115
        lines, total = (ln for ln in fh if ln.strip()), None
    n, bad = asyncio.run(publish_lines(brokers, topic, lines, key_field=key_field, partitions=partitions,
                                       total=total, console=err if progress else None))
    err.print(f"published {n} records to {topic!r}" + (f"; {bad} lines had no key field" if bad else ""))


@app.command()
def subscribe(
    brokers: str = typer.Option(..., help="bootstrap HOST:PORT"),
    topic: str = typer.Option(..., help="topic to read"),
    count: int = typer.Option(0, help="exit after N records (0: no limit)"),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="start at the oldest record"),
    idle_timeout: float = typer.Option(0.0, help="exit after S idle seconds (0: never)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line on stdout"),
) -> None:
    """Print decisions (or any JSON records) from a topic."""
    from ponder.connectors.kafka.publish import subscribe as do_subscribe

    try:
        n = asyncio.run(do_subscribe(brokers, topic, count=count, from_beginning=from_beginning,
                                     idle_timeout=idle_timeout, as_json=as_json, console=out))
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"{n} records")


@app.command()
def top(
    url: str = typer.Argument(..., help="a worker's metrics URL, e.g. http://localhost:9100/metrics"),
    interval: float = typer.Option(2.0, help="seconds between scrapes"),
    once: bool = typer.Option(False, "--once", help="print one view (two scrapes `interval` apart) and exit"),
) -> None:
    """A live view of a running worker: events/s, escalations, in flight, tier queues, latency,
    spend against budgets (from its /metrics; Ctrl-C stops it)."""
    import time

    from rich.live import Live

    from ponder.runtime.top import render, scrape, view

    if not interval > 0:
        err.print(f"[red]error:[/red] --interval must be > 0, got {interval}")
        raise typer.Exit(2)
    try:
        last = scrape(url, time.monotonic())
        if once:
            time.sleep(interval)
            out.print(render(view(last, scrape(url, time.monotonic())), url))
            return
        with Live(console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                now = scrape(url, time.monotonic())
                live.update(render(view(last, now), url), refresh=True)
                last = now
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        pass


@app.command("serve-model")
def serve_model(
    path: Path = typer.Argument(..., help="checkpoint directory (config.json, safetensors, tokenizer)"),
    port: int = typer.Option(8000, help="port to listen on"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0: every interface)"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    max_batch: int = typer.Option(8, help="most requests decoded together"),
    max_wait_ms: float = typer.Option(5.0, help="how long to collect a batch"),
    session_cap_mb: int = typer.Option(256, help="device memory for KV sessions (MiB)"),
    host_cap_mb: int = typer.Option(1024, help="host memory for spilled KV sessions (MiB)"),
    max_seq_len: Optional[int] = typer.Option(None, help="context length [default: the model's]"),
    name: Optional[str] = typer.Option(None, help="model id to report [default: the directory name]"),
    warmup: bool = typer.Option(False, "--warmup/--no-warmup", help="compile the usual shapes first"),
    api_key: Optional[list[str]] = typer.Option(
        None, "--api-key", help="a key callers must send as `Authorization: Bearer KEY` (repeat for several; "
        "default: $PONDER_SERVE_API_KEYS, comma-separated); none: an open server, one cache namespace "
        "per cache_salt"),
    speculate: bool = typer.Option(True, "--speculate/--no-speculate",
                                   help="speculative decoding for greedy requests (same answers, fewer steps)"),
    host_kv: str = typer.Option("int8", help="how KV sessions spilled to host memory are kept: int8 | int4 | none"),
    near_identical: Optional[int] = typer.Option(
        None, help="grey levels (0-255) within which a key's frame counts as its last one (reuses its "
        "features and cached KV) [default: identical frames only]"),
    frame_cache_mb: int = typer.Option(64, help="memory for cached image features (MiB)"),
    max_image_mb: int = typer.Option(4, help="largest image a request may send (MiB)"),
) -> None:
    """Serve a checkpoint with the JAX engine behind an OpenAI-compatible API."""
    if not (path / "config.json").exists():
        err.print(f"[red]error:[/red] {str(path)!r} is not a checkpoint directory (no config.json)")
        raise typer.Exit(2)
    if dtype not in ("float32", "bfloat16"):
        err.print(f"[red]error:[/red] --dtype must be float32 or bfloat16, not {dtype!r}")
        raise typer.Exit(2)
    from ponder.inference.jax.kvcache import HOST_KV
    from ponder.inference.jax.server import Access, serve
    from ponder.inference.jax.speculate import Speculation

    if host_kv not in HOST_KV:
        err.print(f"[red]error:[/red] --host-kv must be one of {', '.join(HOST_KV)}, not {host_kv!r}")
        raise typer.Exit(2)
    if near_identical is not None and not 0 <= near_identical <= 255:
        err.print(f"[red]error:[/red] --near-identical must be grey levels in 0..255, not {near_identical}")
        raise typer.Exit(2)

    keys = list(api_key or []) or [k.strip() for k in os.environ.get("PONDER_SERVE_API_KEYS", "").split(",")
                                   if k.strip()]
    try:
        Access(keys)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"serving {name or path.name} on http://{host}:{port}/v1 (Ctrl-C stops it)"
              + (f", {len(keys)} API key(s)" if keys else ", open (no --api-key)"))
    serve(str(path), host=host, port=port, max_wait_ms=max_wait_ms, dtype=dtype, max_batch=max_batch,
          session_cap_bytes=session_cap_mb << 20, host_cap_bytes=host_cap_mb << 20,
          max_seq_len=max_seq_len, model_name=name, warmup=warmup, api_keys=keys,
          speculate=Speculation() if speculate else None, host_kv=host_kv, near_identical=near_identical,
          frame_cache_bytes=frame_cache_mb << 20, max_image_bytes=max_image_mb << 20)


@app.command("init-model")
def init_model(
    out_dir: Path = typer.Argument(..., help="directory to write the checkpoint to"),
    preset: str = typer.Option("tiny", help="tiny | tiny-vl | small | qwen2.5-0.5b-shape"),
    seed: int = typer.Option(0, help="weights and tokenizer seed"),
    dtype: Optional[str] = typer.Option(None, help="float32 or bfloat16 [default: by preset]"),
) -> None:
    """Write a randomly initialised checkpoint of a preset, with a freshly trained tokenizer."""
    from ponder.inference.jax.checkpoint import init_model as do_init

    try:
        cfg = do_init(out_dir, preset, seed, dtype)
    except (ValueError, KeyError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"wrote {preset} ({cfg.num_params / 1e6:.1f}M params, seed {seed}) to {out_dir}")


@app.command("export-gguf")
def export_gguf(
    model_dir: Path = typer.Argument(..., help="checkpoint directory (config.json, safetensors, tokenizer)"),
    out: Path = typer.Argument(..., help="GGUF file to write"),
    dtype: str = typer.Option("f32", help="f32 or f16 (norms and biases stay f32)"),
) -> None:
    """Write a checkpoint as one GGUF file (weights, tokenizer, chat template) for llama.cpp."""
    from ponder.inference.jax.gguf import export_gguf as do_export

    try:
        cfg = do_export(model_dir, out, dtype)
    except (ValueError, KeyError, NotImplementedError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"wrote {out} ({cfg.num_params / 1e6:.1f}M params, {dtype})")


def _open_store(path: Path):
    from ponder.runtime.tracestore import TraceStore

    try:
        return TraceStore(path, readonly=True)
    except (FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/red] {e} (a file run keeps OUTPUT.traces.db, a worker STATE_DIR/traces.db)")
        raise typer.Exit(2) from e


def _when(text: Optional[str], flag: str) -> Optional[float]:
    from ponder.runtime.tracestore import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        err.print(f"[red]error:[/red] {flag}: {e}")
        raise typer.Exit(2) from e


def _utc(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # an event time that is no calendar time
        return str(ts)


def _render_decision(doc: dict) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    d, tok = doc["decision"], doc["tokens"]
    out.print(Panel(Text.assemble(
        (f"{d['action']}", "bold"), f" ({d['severity']}, confidence {d['confidence']:.2f}) by {d['tier']}/"
        f"{d['model']}" + (" [degraded]" if d["degraded"] else "") + f"\n{d['reason']}\n",
        f"key {d['key']!r} tenant {d['tenant']!r} event time {_utc(d['ts'])} pipeline {doc['pipeline']!r}"),
        title=f"decision {doc['decision_id']}"))
    ev = doc["event"] or {}
    out.print(Text.assemble(("event ", "bold"), f"{ev.get('source', '')} ",
                            json.dumps(ev.get("payload")) if ev.get("payload") is not None
                            else "(payload withheld: a privacy policy was in force)"))
    if doc["privacy"]:
        out.print(Text.assemble(("privacy ", "bold"), json.dumps(doc["privacy"])))
    g = Table(title=f"gate score {doc['gate']['score']}", title_justify="left")
    for c in ("kind", "field", "score", "value", "expected", "detail"):
        g.add_column(c)
    for f in doc["gate"]["findings"]:
        g.add_row(*(Text(str(f.get(c, ""))) for c in ("kind", "field", "score", "value", "expected", "detail")))
    out.print(g)
    r = Table(title="route: " + " → ".join(doc["route"]), title_justify="left")
    for c in ("step", "why", "tier", "passed over"):
        r.add_column(c)
    for st in doc["steps"]:
        r.add_row(*(Text(str(st.get(c, ""))) for c in ("step", "why", "tier")),
                  Text("; ".join(st.get("skipped", []) or [])))
    out.print(r)
    for line in doc["errors"]:
        out.print(Text.assemble(("error ", "red"), line))
    if doc["prompt"] is not None:
        out.print(Panel(Text(doc["prompt"]["prefix"] + doc["prompt"]["tail"]),
                        title="prompt as sent (after the privacy policy)"))
    for i, a in enumerate(doc["attempts"], 1):
        u = a["usage"]
        head = (f"call {i}: {a['tier']}/{a['model'] or '-'} samples={a['samples']} "
                f"tokens={u.get('prompt_tokens', 0)} (cached {u.get('cached_prompt_tokens', 0)}) "
                f"+{u.get('completion_tokens', 0)} ${u.get('cost_usd', 0.0):.6f}")
        body = [f"failed: {a['failure']}"] if a["failure"] else []
        if a["repair"]:
            body.append(f"repair note appended: {a['repair']!r}")
        body += [f"{x['text']}\n  → {'valid' if not x['error'] else 'invalid: ' + x['error']}" for x in a["outputs"]]
        out.print(Panel(Text("\n".join(body)), title=Text(head), title_align="left"))
    if doc["vote"]:
        out.print(Text.assemble(("vote ", "bold"), json.dumps(doc["vote"])))
    out.print(Text.assemble(("tokens ", "bold"), f"prompt {tok['prompt']} = new {tok['new']} + cached {tok['cached']}, "
                            f"completion {tok['completion']}" + (" (estimated)" if tok["estimated"] else ""),
                            ("  cost ", "bold"), f"${doc['cost_usd']:.8f}"
                            + (f" (forecast ${doc['predicted']['cost_usd']:.8f})" if doc["predicted"] else "")))
    t = Table(title=f"latency {d['latency_ms']:.3f} ms by stage", title_justify="left")
    for c in ("stage", "start ms", "ms"):
        t.add_column(c, justify="right" if c != "stage" else "left")
    for st in doc["stages"]:
        t.add_row(Text("  " * st["depth"] + st["name"]), f"{st['start_ms']:.3f}", f"{st['ms']:.3f}")
    out.print(t)


def _render_around(doc: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(f"key {doc['key']!r}: {len(doc['gates'])} gate verdicts within {doc['window_s']:g}s of "
                    f"{_utc(doc['around'])}"), title_justify="left")
    for c in ("event time", "tenant", "score", "escalated", "top findings"):
        t.add_column(c)
    for g in doc["gates"]:
        t.add_row(_utc(g["ts"]), Text(g["tenant"]), f"{g['score']:.3f}", "yes" if g["escalated"] else "no",
                  Text(g["reasons"]))
    out.print(t)
    for d in doc["decisions"]:
        out.print(Text(f"decision {d['decision_id']} at {_utc(d['ts'])}: {d['action']} by {d['tier']}: {d['reason']}"))
    if not doc["gates"]:
        out.print("no verdicts recorded there (no events in the window, or dropped by the store's bounds)")


def _render_costs(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    tot = report["total"]
    span = (f" from {_utc(report['since'])} to {_utc(report['until'])}"
            if report.get("since") is not None or report.get("until") is not None else "")
    out.print(f"total ${tot['usd']:.6f} over {tot['calls']} calls"
              + (f" for {tot['decisions']} decisions" if "decisions" in tot else "") + span)
    for g in ("tenant", "tier", "model", "action", "key"):
        rows = report.get(f"by_{g}")
        if rows is None:
            continue
        t = Table(title=f"by {g}" + (" (dearest)" if g == "key" else ""), title_justify="left")
        cols = [c for c in ("decisions", "calls", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")
                if not rows or c in rows[0]]
        if g == "key":
            t.add_column("tenant")
        t.add_column(g)
        for c in (*cols, "usd", "share"):
            t.add_column(c.replace("_tokens", "").replace("_", " "), justify="right")
        for r in rows:
            share = r["usd"] / tot["usd"] if tot["usd"] else 0.0
            names = [Text(str(r["tenant"]))] if g == "key" else []
            t.add_row(*names, Text(str(r[g])), *(str(r[c]) for c in cols), f"{r['usd']:.6f}", f"{share:.1%}")
        out.print(t)


@app.command()
def explain(
    decision_id: Optional[str] = typer.Argument(None, help="the decision to explain"),
    store: Path = typer.Option(Path("state/traces.db"), help="trace store: OUTPUT.traces.db of a file run, STATE_DIR/traces.db of a worker"),
    key: Optional[str] = typer.Option(None, help="with --around: a key's gate verdicts near a time"),
    around: Optional[str] = typer.Option(None, help="event time: UNIX seconds or ISO 8601 (UTC by default)"),
    window: float = typer.Option(300.0, help="with --around: seconds either side"),
    tenant: Optional[str] = typer.Option(None, help="with --key: only this tenant's key"),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout"),
) -> None:
    """Why a decision happened (DECISION_ID), or why nothing was decided (--key K --around T)."""
    from ponder.runtime.tracestore import explain_doc

    if (decision_id is None) == (key is None) or (key is None) != (around is None):
        err.print("[red]error:[/red] give a DECISION_ID, or --key KEY with --around TIME")
        raise typer.Exit(2)
    if window <= 0:
        err.print(f"[red]error:[/red] --window must be > 0, got {window}")
        raise typer.Exit(2)
    at = _when(around, "--around")
    db = _open_store(store)
    try:
        if decision_id is not None:
            sd = db.get(decision_id)
            if sd is None:
                err.print(f"[red]error:[/red] no decision {decision_id!r} in {str(store)!r} (never made, "
                          "or dropped by the store's size and age bounds)")
                raise typer.Exit(2)
            doc = explain_doc(sd)
            if as_json:
                print(json.dumps(doc, indent=2, default=str))
            else:
                _render_decision(doc)
            return
        gates, decisions = db.around(key, at, window, tenant)
    finally:
        db.close()
    doc = {"key": key, "tenant": tenant, "around": at, "window_s": window,
           "gates": [{"ts": g.ts, "tenant": g.tenant, "score": g.score, "escalated": g.escalated,
                      "reasons": g.reasons} for g in gates],
           "decisions": [{"decision_id": d.decision_id, "ts": d.ts, "action": d.action, "tier": d.tier,
                          "reason": d.reason} for d in decisions]}
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        _render_around(doc)


@app.command()
def costs(
    store: Optional[Path] = typer.Option(None, help="trace store (default: state/traces.db, a worker's)"),
    ledger: Optional[Path] = typer.Option(None, help="a spend ledger (JSON) instead of a trace store"),
    since: Optional[str] = typer.Option(None, help="event time from: UNIX seconds or ISO 8601"),
    until: Optional[str] = typer.Option(None, help="event time to: UNIX seconds or ISO 8601"),
    top: int = typer.Option(10, help="how many of the dearest keys to list"),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout"),
) -> None:
    """Spend by tenant, tier, model, action and top keys, from a trace store or a ledger."""
    from ponder.runtime.tracestore import cost_report, ledger_report

    if store is not None and ledger is not None:
        err.print("[red]error:[/red] give --store or --ledger, not both")
        raise typer.Exit(2)
    lo, hi = _when(since, "--since"), _when(until, "--until")
    if ledger is not None:
        if lo is not None or hi is not None:
            err.print("[red]error:[/red] a ledger keeps no times: --since/--until need a trace store (--store)")
            raise typer.Exit(2)
        try:
            report = ledger_report(json.loads(ledger.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            err.print(f"[red]error:[/red] cannot read the ledger {str(ledger)!r}: {e}")
            raise typer.Exit(2) from e
    else:
        db = _open_store(store or Path("state/traces.db"))
        try:
            report = cost_report(db.cost_rows(lo, hi), top=top)
        finally:
            db.close()
        report.update(since=lo, until=hi)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _render_costs(report)



@app.command()
def ui(
    store: Path = typer.Option(Path("state/traces.db"), help="trace store: OUTPUT.traces.db of a file run, STATE_DIR/traces.db of a worker"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (loopback by default: the page shows prompts and events)"),
    port: int = typer.Option(8765, help="port to listen on"),
) -> None:
    """A local page: the live decision stream, a key's timeline and each decision explained."""
    if not 0 < port < 65536:
        err.print(f"[red]error:[/red] --port must be 1-65535, got {port}")
        raise typer.Exit(2)
    _open_store(store).close()  # a missing or foreign file is reported now, not on the first poll
    try:
        from ponder.ui import serve
    except ImportError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    err.print(f"ponder ui: http://{host}:{port}/ over {store} (Ctrl-C stops)")
    try:
        serve(store, host=host, port=port)
    except RuntimeError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
if __name__ == "__main__":
    app()

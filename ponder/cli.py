"""The `ponder` command. Each command parses, calls the library and prints; heavy imports wait
until a command needs them, so `ponder --help` stays instant."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Optional

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


def _run_pipeline(ref: str, source, sink, *, progress: bool, total: int | None = None, ledger=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ponder.pipelines.pipeline import load_pipeline

    try:
        pipe = load_pipeline(ref)
    except (ValueError, TypeError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if not progress:
        return _until_failed(lambda: pipe.worker(source, sink, ledger=ledger).run())
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err,
                  transient=False) as bar:
        task = bar.add_task(pipe.name, total=total, info="")

        def tick(s):
            bar.update(task, completed=s.events,
                       info=f"esc={s.escalations} dec={s.decisions} dead={s.dead_letters}")

        stats = _until_failed(lambda: pipe.worker(source, sink, progress=tick, ledger=ledger).run())
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
) -> None:
    """Run a pipeline over a file; decisions to OUTPUT, dead letters beside it."""
    from ponder.connectors.files import JsonlSink

    sink = JsonlSink(output, dead_letters)
    try:
        source = _source_for(input)
    except typer.BadParameter as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    stats = _run_pipeline(pipeline, source, sink, progress=progress, ledger=ledger)
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
) -> None:
    """Simulate a fleet: DIR/events.jsonl plus DIR/truth.json (injected incidents)."""
    from ponder.simulate import simulate as sim

    try:
        s = sim(devices, events_per_device, seed, out_dir, interval_s=interval_s,
                incident_rate=incident_rate, tenants=tenants)
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
    report = run_nab(data_dir, out_dir)
    print(format_report(report))
    t = report.totals
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
) -> None:
    """Run a pipeline as a Kafka consumer-group worker until SIGTERM, then drain and commit."""
    import logging

    from ponder.pipelines.kafka import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from ponder.pipelines.pipeline import load_pipeline

    try:
        pipe = load_pipeline(pipeline)
    except (ValueError, TypeError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    stats = _until_failed(lambda: run_worker(
        pipe, brokers, group=group, state_dir=state_dir, input_topic=input_topic,
        output_topic=output_topic, dead_letter_topic=dead_letter_topic, partitions=partitions,
        checkpoint_every_s=checkpoint_interval, session_timeout_ms=session_timeout_ms,
        metrics_port=metrics_port, ledger=ledger))
    print(stats.line(), file=sys.stderr)


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
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Publish JSONL events (or a simulated fleet) keyed by KEY_FIELD."""
    from ponder.connectors.kafka.publish import publish_lines, simulated_lines

    if simulate_fleet:
        lines, total = simulated_lines(devices, events_per_device, seed)
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
) -> None:
    """Serve a checkpoint with the JAX engine behind an OpenAI-compatible API."""
    if not (path / "config.json").exists():
        err.print(f"[red]error:[/red] {str(path)!r} is not a checkpoint directory (no config.json)")
        raise typer.Exit(2)
    if dtype not in ("float32", "bfloat16"):
        err.print(f"[red]error:[/red] --dtype must be float32 or bfloat16, not {dtype!r}")
        raise typer.Exit(2)
    from ponder.inference.jax.server import Access, serve

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
          max_seq_len=max_seq_len, model_name=name, warmup=warmup, api_keys=keys)


@app.command("init-model")
def init_model(
    out_dir: Path = typer.Argument(..., help="directory to write the checkpoint to"),
    preset: str = typer.Option("tiny", help="tiny | small | qwen2.5-0.5b-shape"),
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


if __name__ == "__main__":
    app()

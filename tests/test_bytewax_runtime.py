"""ponder on Bytewax (ponder/runtime/bytewax.py) against a real broker (Tansu), with an edge
tier: a tiny random JAX checkpoint behind `ModelServer` on loopback, which the native worker
and the Bytewax workers (subprocesses) all call. One input topic serves every run, so decision
ids (derived from key and input position) must match the native worker's exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from bytewax_pipelines import EDGE_URL_ENV
from kafka_helpers import (log_excerpt, pipeline_worker_cmd, publish, read_all, stop, wait_committed,
                           worker_pythonpath)

PARTS = 4
KEYS = [f"pump-{i}" for i in range(6)]
PER_KEY = 60
T0 = 1_700_000_000
PIPE = "bytewax_pipelines:edge"
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def _flagged(i: int, j: int) -> bool:
    """Event i of key j escalates: every 9th, and a burst of three in a row (several decisions
    of one key in one read, whose order the runtime must keep)."""
    return (i + j) % 9 == 4 or 30 <= i - j < 33


def _inputs() -> tuple[list[bytes], list[bytes | None]]:
    """6 keys x 60 events, some flagged (escalated to the edge), and three bad
    records: not JSON, no key (in the value or the message), a time that is not one."""
    values, keys = [], []
    for i in range(PER_KEY):
        for j, k in enumerate(KEYS):
            values.append(_enc.encode({"k": k, "ts": T0 + 10 * i, "level": float((i * 7 + j) % 13),
                                       "flag": _flagged(i, j)}))
            keys.append(k.encode())
    for at, (v, k) in zip((50, 150, 250), ((b"\xff\xfe not json", b"pump-0"),
                                           (_enc.encode({"ts": T0, "level": 1.0}), None),
                                           (_enc.encode({"k": "pump-2", "ts": "yesterday"}), b"pump-2"))):
        values.insert(at, v)
        keys.insert(at, k)
    return values, keys


EXPECTED_ESCALATIONS = sum(_flagged(i, j) for i in range(PER_KEY) for j in range(len(KEYS)))


@pytest.fixture(scope="module")
def edge_url(tmp_path_factory):
    from ponder.inference.jax import checkpoint
    from ponder.inference.jax.engine import JaxEngine
    from ponder.inference.jax.server import ModelServer

    path = tmp_path_factory.mktemp("edge") / "tiny"
    checkpoint.init_model(path, "tiny", seed=0)
    engine = JaxEngine(path, max_batch=4, session_cap_bytes=16 << 20, batch_buckets=(4,), seq_buckets=(1024,),
                       chunk_buckets=(64,), model_name="tiny")
    with ModelServer(engine) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def env(edge_url) -> dict[str, str]:
    return {**os.environ, EDGE_URL_ENV: edge_url, "PYTHONPATH": worker_pythonpath(), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def topic(broker) -> tuple[str, dict[int, int]]:
    values, keys = _inputs()
    ends = asyncio.run(publish(broker, "in-bw", values, keys, PARTS))
    assert sum(ends.values()) == len(values)
    return "in-bw", ends


@pytest.fixture(scope="module")
def native(broker, topic, env, tmp_path_factory):
    """The native worker (`ponder worker`) on the input: its decisions and dead letters."""
    tmp = tmp_path_factory.mktemp("native")
    cmd = pipeline_worker_cmd(PIPE, broker, group="g-bw-native", state_dir=tmp / "state", partitions=PARTS,
                              topics="bw-native")
    cmd[cmd.index("--input-topic") + 1] = topic[0]
    log = tmp / "native.log"
    proc = _start(cmd, log, env)
    try:
        wait_committed(broker, "g-bw-native", topic[0], topic[1], procs=[proc], timeout=150)
    finally:
        assert stop(proc) == 0, log_excerpt(log)
    decisions = asyncio.run(read_all(broker, "out-bw-native", PARTS))
    dead = asyncio.run(read_all(broker, "dead-bw-native", PARTS))
    assert len(decisions) == EXPECTED_ESCALATIONS and len(dead) == 3
    assert {_dec.decode(r.value)["tier"] for r in decisions} == {"edge"}  # the model decided them all
    return decisions, dead


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env)
    deadline = time.monotonic() + 60
    while b"worker for pipeline" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            msg = f"worker did not start: {log_excerpt(log)}"
            raise AssertionError(msg)
        time.sleep(0.05)
    return proc


def _bytewax_cmd(broker: str, name: str, state_dir: Path, input_topic: str) -> list[str]:
    """The module's own entry point, which also sets the snapshot interval and read size."""
    return [sys.executable, "-m", "ponder.runtime.bytewax", PIPE, "--brokers", broker, "--group", f"g-{name}",
            "--state-dir", str(state_dir), "--input-topic", input_topic, "--output-topic", f"out-{name}",
            "--dead-letter-topic", f"dead-{name}", "--partitions", str(PARTS), "--snapshot-every-s", "0.3",
            # small reads: decisions leave a few at a time, so a kill can land mid-stream
            "--batch-size", "8"]


def _ids(records, header: str = "decision_id") -> list[str]:
    return [dict(r.headers)[header].decode() for r in records]


def _wait_for(broker: str, topic: str, want: set[str], proc: subprocess.Popen, log: Path, *,
              header: str = "decision_id", timeout: float = 120.0) -> list:
    """Poll `topic` until every id in `want` is there; fail if the worker exits first."""
    deadline = time.monotonic() + timeout
    while True:
        recs = asyncio.run(read_all(broker, topic, PARTS))
        if want <= set(_ids(recs, header)):
            return recs
        if proc.poll() is not None:
            msg = f"worker exited early with code {proc.returncode}: {log_excerpt(log)}"
            raise AssertionError(msg)
        if time.monotonic() > deadline:
            msg = f"timed out with {len(set(_ids(recs, header)) & want)} of {len(want)}: {log_excerpt(log)}"
            raise AssertionError(msg)
        time.sleep(0.2)


def _rows(records) -> list[tuple]:
    """What must match between runtimes: the decision, not its latency or spans."""
    out = []
    for r in records:
        d = _dec.decode(r.value)
        out.append((d["key"], d["ts"], d["action"], d["severity"], d["reason"], d["confidence"], d["tier"]))
    return sorted(out)


def _letters(records) -> list[tuple]:
    return sorted((dict(r.headers)["dead_letter_id"].decode(), _dec.decode(r.value)["reason"],
                   tuple(_dec.decode(r.value)["source"])) for r in records)


@pytest.fixture(scope="module")
def bytewax_run(broker, topic, native, env, tmp_path_factory):
    """`ponder worker --runtime bytewax` on the same input, until every decision and dead
    letter of the native worker is out; then SIGTERM. Its default reads (1,000 records) put
    several escalations of one key in one decide batch."""
    n_decisions, n_dead = native
    tmp = tmp_path_factory.mktemp("bw")
    log = tmp / "bw.log"
    cmd = [sys.executable, "-m", "ponder.cli", "worker", PIPE, "--runtime", "bytewax", "--brokers", broker,
           "--group", "g-bw", "--state-dir", str(tmp / "state"), "--input-topic", topic[0],
           "--output-topic", "out-bw", "--dead-letter-topic", "dead-bw", "--partitions", str(PARTS)]
    proc = _start(cmd, log, env)
    try:
        decisions = _wait_for(broker, "out-bw", set(_ids(n_decisions)), proc, log)
        dead = _wait_for(broker, "dead-bw", set(_ids(n_dead, "dead_letter_id")), proc, log,
                         header="dead_letter_id")
    finally:
        rc = stop(proc)
    assert rc == 0, log_excerpt(log)  # SIGTERM is a clean stop
    return decisions, dead


def test_same_decisions_as_the_native_worker(native, bytewax_run):
    """(a) the same decisions as the native worker: ids (key and input position), keys, times,
    actions, reasons, tiers; each once, keyed by its stream key, in its input's partition."""
    n_decisions, _ = native
    decisions, _ = bytewax_run
    assert sorted(_ids(decisions)) == sorted(_ids(n_decisions))
    assert _rows(decisions) == _rows(n_decisions)
    for r in decisions:
        d = _dec.decode(r.value)
        assert r.key.decode() == d["key"] and r.partition == d["source"][1]


def test_each_keys_decisions_in_event_order(bytewax_run):
    """(b) a key's decisions leave in the order of its events (one key: one output partition)."""
    decisions, _ = bytewax_run
    by_key: dict[str, list[float]] = {}
    for r in sorted(decisions, key=lambda r: (r.partition, r.offset)):
        d = _dec.decode(r.value)
        by_key.setdefault(d["key"], []).append(d["ts"])
    assert sorted(by_key) == KEYS
    assert all(ts == sorted(ts) and len(set(ts)) == len(ts) for ts in by_key.values()), by_key


def test_bad_records_go_to_the_dead_letter_topic_with_reason_and_position(topic, native, bytewax_run):
    """(c) each bad record is a dead letter naming why and where, as the native worker writes
    it; the stream moves on past it (every decision after it was made: test (a))."""
    _, n_dead = native
    _, dead = bytewax_run
    assert _letters(dead) == _letters(n_dead)
    letters = sorted((_dec.decode(r.value) for r in dead), key=lambda d: d["reason"])
    assert len(letters) == 3 and all(r.key is None and dict(r.headers)["reason"] for r in dead)
    reasons = [d["reason"] for d in letters]
    assert any("json" in x.lower() or "malformed" in x.lower() for x in reasons), reasons
    assert any("key field 'k' missing" in x for x in reasons), reasons
    assert any("time field 'ts'" in x for x in reasons), reasons
    assert all(d["source"][0] == topic[0] and d["stage"] == "decode" for d in letters)


def test_sigkill_mid_stream_then_restart_loses_no_decision(broker, topic, native, env, tmp_path):
    """(d) SIGKILL while decisions are still being made, then a restart from Bytewax's recovery
    snapshots: every decision the native worker made is there; a duplicate is only a second copy
    of an already emitted decision (same id, same content, same partition), never a new one."""
    n_decisions, n_dead = native
    expected = set(_ids(n_decisions))
    cmd = _bytewax_cmd(broker, "bwcrash", tmp_path / "state", topic[0])
    log = tmp_path / "crash.log"
    proc = _start(cmd, log, env)
    try:
        _wait_for_count(broker, "out-bwcrash", len(expected) // 3, proc, log)
    finally:
        proc.kill()  # SIGKILL: no flush, no final snapshot
        proc.wait()
    before = set(_ids(asyncio.run(read_all(broker, "out-bwcrash", PARTS))))
    assert len(before) < len(expected), "the kill came after the last decision: nothing was tested"
    log = tmp_path / "crash-restart.log"
    proc = _start(cmd, log, env)
    try:
        decisions = _wait_for(broker, "out-bwcrash", expected, proc, log)
        _wait_for(broker, "dead-bwcrash", set(_ids(n_dead, "dead_letter_id")), proc, log, header="dead_letter_id")
    finally:
        assert stop(proc) == 0, log_excerpt(log)
    ids = _ids(decisions)
    assert set(ids) == expected
    copies = Counter(ids)
    dups = {i for i, n in copies.items() if n > 1}
    assert all(copies[i] == 2 for i in dups)  # one crash: at most one repeat
    # resumed from a snapshot: only what the epochs after the last committed one emitted comes again
    assert len(dups) < len(before), f"all {len(before)} decisions made before the kill came again"
    assert dups <= before, "a decision made only after the restart was emitted twice"
    for i in dups:
        rs = [r for r in decisions if dict(r.headers)["decision_id"].decode() == i]
        assert len({r.partition for r in rs}) == 1 and len(set(_rows(rs))) == 1
    first = {}
    for r in decisions:
        first.setdefault(dict(r.headers)["decision_id"].decode(), r)
    assert _rows(first.values()) == _rows(n_decisions)


def _wait_for_count(broker: str, topic: str, n: int, proc: subprocess.Popen, log: Path,
                    timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(asyncio.run(read_all(broker, topic, PARTS))) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            msg = f"no {n} decisions yet (worker exit code {proc.poll()}): {log_excerpt(log)}"
            raise AssertionError(msg)
        time.sleep(0.05)


def test_escalations_of_different_keys_share_engine_batches(edge_url, monkeypatch):
    """The documented API in a user's own flow: `reason` over Kafka messages. Six keys escalate
    in one read; their edge calls go out together through the tier's batcher (max_batch 4):
    one full batch and one of the rest, not six calls one by one."""
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSourceMessage
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    from bytewax_pipelines import edge
    from ponder.runtime.bytewax import Ponder, reason

    monkeypatch.setenv(EDGE_URL_ENV, edge_url)
    msgs = [KafkaSourceMessage(k.encode(), _enc.encode({"k": k, "ts": T0 + 10 * i, "level": 1.0, "flag": i == 3}),
                               topic="t", partition=0, offset=n)
            for n, (i, k) in enumerate((i, k) for i in range(5) for k in KEYS)]
    ponder, out = Ponder(edge()), []
    flow = Dataflow("batching")
    op.output("out", reason("ponder", op.input("in", flow, TestingSource(msgs, batch_size=len(msgs))), ponder),
              TestingSink(out))
    try:
        run_main(flow)
    finally:
        ponder.close()
    assert sorted((d.key, d.ts, d.tier) for d in out) == [(k, T0 + 30.0, "edge") for k in KEYS]
    assert ponder.batchers["edge"].sizes == Counter({4: 1, 2: 1})

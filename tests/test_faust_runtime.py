"""ponder on faust-streaming (ponder/runtime/faust.py). In process, with stand-ins for faust's
events: model calls of different keys share a batch, a key's events wait behind its pending
decision, and acks go out in offset order. Against the real broker (Tansu), with an
edge tier (a tiny random JAX checkpoint behind `ponder serve-model` on loopback): the faust
worker decides what the native worker decides, keeps each key's order, dead-letters bad
records, and loses no decision across a SIGKILL (its only duplicates are replays that carry
the same decision id)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from faust_pipelines import EDGE_ENV, edge_probe
from kafka_helpers import (
    committed,
    log_excerpt,
    publish,
    read_all,
    stop,
    worker_pythonpath,
)
from test_runtime import ScriptedEngine, item, make_pipeline, seqs

from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink
from ponder.demo import ServedModel
from ponder.inference.jax.checkpoint import init_model
from ponder.runtime.faust import PonderAgent
from ponder.simulate import Fleet
from ponder.types import SourcePos, decision_id

PARTS = 4
KEYS, PER_KEY = 6, 20
SESSION_MS = 6000
# records no decoder accepts, published among the events (index in the stream -> value)
BAD = {15: b"not json {", 60: b"[1, 2, 3]", 100: b'{"ts": 1764000000.0, "temperature": 21.5}'}
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def _stream() -> tuple[list[bytes], list[bytes]]:
    """The input: a small fleet's readings with the bad records in between (values, keys)."""
    events = list(Fleet(KEYS, PER_KEY, 5).iter_events())
    values, keys = [], []
    for i, e in enumerate(events):
        if i in BAD:
            values.append(BAD[i])
            keys.append(e["device_id"].encode())  # a device's partition, among its readings
        values.append(_enc.encode(e))
        keys.append(e["device_id"].encode())
    return values, keys


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge")
    init_model(d / "edge", "tiny", seed=0)
    with ServedModel(d / "edge", d / "server.log", max_batch=8) as server:
        yield server.url


@pytest.fixture(scope="module")
def inputs(broker):
    """Two topics with the same records at the same positions: one for a clean run, one for
    the crash run."""
    values, keys = _stream()
    ends = {t: asyncio.run(publish(broker, t, values, keys, PARTS)) for t in ("in-faust", "in-faust-kill")}
    return ends, asyncio.run(read_all(broker, "in-faust", PARTS))


class _Replay:
    """The clean topic's records served once to a native worker in this process: the same
    positions the faust worker reads, hence the same decision ids."""

    def __init__(self, records) -> None:
        self._records = [Record(r.value, SourcePos(r.topic, r.partition, r.offset),
                                r.key.decode() if r.key else None) for r in records]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def batches(self):
        yield self._records


@pytest.fixture(scope="module")
def native(model, inputs):
    """What the native worker decides and dead-letters on the clean topic."""
    sink = MemorySink()
    asyncio.run(edge_probe(model).worker(_Replay(inputs[1]), sink).run())
    return sink


def _faust_cmd(broker: str, group: str, state: Path, topic: str) -> list[str]:
    return [sys.executable, "-m", "ponder.cli", "worker", "faust_pipelines:edge_probe", "--runtime", "faust",
            "--brokers", broker, "--group", group, "--state-dir", str(state), "--input-topic", f"in-{topic}",
            "--output-topic", f"out-{topic}", "--dead-letter-topic", f"dead-{topic}",
            "--partitions", str(PARTS), "--session-timeout-ms", str(SESSION_MS)]


def _start(cmd: list[str], log: Path, model: str) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONPATH": worker_pythonpath(), EDGE_ENV: model, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env)


def _wait_committed(broker: str, group: str, topic: str, ends: dict[int, int], proc, log: Path,
                    at_least: float = 1.0, timeout: float = 150.0) -> dict[int, int]:
    total = sum(ends.values())
    deadline = time.monotonic() + timeout
    while True:
        got = asyncio.run(committed(broker, group, topic, PARTS))
        if sum(min(got[p], ends[p]) for p in ends) >= at_least * total:
            return got
        assert proc.poll() is None, f"faust worker exited with {proc.returncode}:\n{log_excerpt(log)}"
        assert time.monotonic() < deadline, f"committed {got} of {ends}:\n{log_excerpt(log)}"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, log: Path) -> int:
    """SIGTERM, and the worker's exit status. faust's own stop must finish: the worker's
    forced exit after its grace period (which also exits 0) counts as a failure here."""
    try:
        rc = stop(proc)
    except subprocess.TimeoutExpired:
        pytest.fail(f"faust worker still running 60s after SIGTERM:\n{log_excerpt(log)}")
    assert b"did not stop within" not in log.read_bytes(), log_excerpt(log)
    return rc


def _outputs(broker: str, topic: str) -> tuple[list, list]:
    return (asyncio.run(read_all(broker, f"out-{topic}", PARTS)),
            asyncio.run(read_all(broker, f"dead-{topic}", PARTS)))


@pytest.fixture(scope="module")
def clean_run(broker, model, inputs, tmp_path_factory):
    """One faust worker over the clean topic to its end, then SIGTERM."""
    d = tmp_path_factory.mktemp("faust-clean")
    log = d / "worker.log"
    proc = _start(_faust_cmd(broker, "g-faust", d / "state", "faust"), log, model)
    try:
        _wait_committed(broker, "g-faust", "in-faust", inputs[0]["in-faust"], proc, log)
        rc = _stop(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, log, *_outputs(broker, "faust")


def _rows(decisions: list[dict]) -> list[tuple]:
    return sorted((d["key"], d["ts"], d["action"]) for d in decisions)


def test_faust_decides_what_the_native_worker_decides(native, clean_run):
    rc, log, out, _ = clean_run
    assert rc == 0, log_excerpt(log)
    got = [_dec.decode(r.value) for r in out]
    expected = [msgspec.to_builtins(d) for d in native.decisions]
    assert len(expected) >= 10 and {d["tier"] for d in expected} == {"edge"}  # the model decided them
    assert _rows(got) == _rows(expected)
    # the same ids, once each: a clean run has no duplicates
    assert sorted(dict(r.headers)["decision_id"].decode() for r in out) == sorted(d["decision_id"] for d in expected)
    # the native record format: keyed by the stream key, on the input's partition number
    for r in out:
        d = _dec.decode(r.value)
        assert r.key == d["key"].encode() and r.partition == d["source"][1]


def test_faust_keeps_each_keys_order(clean_run):
    _, _, out, _ = clean_run
    by_key: dict[str, list[int]] = {}
    for r in sorted(out, key=lambda r: (r.partition, r.offset)):
        d = _dec.decode(r.value)
        by_key.setdefault(d["key"], []).append(d["source"][2])
    assert len(by_key) == KEYS
    for key, offsets in by_key.items():
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), key


def test_faust_sends_bad_records_to_the_dead_letter_topic(native, clean_run, inputs):
    _, _, _, dead = clean_run
    letters = [_dec.decode(r.value) for r in dead]
    bad_at = sorted((r.partition, r.offset) for r in inputs[1] if r.value in BAD.values())
    assert len(bad_at) == len(BAD)
    assert sorted((d["source"][1], d["source"][2]) for d in letters) == bad_at
    # the reasons the native decoder gives, with the ids the native sink writes
    assert sorted((tuple(d["source"]), d["reason"], d["stage"]) for d in letters) == \
        sorted((tuple(msgspec.to_builtins(x.source)), x.reason, x.stage) for x in native.dead_letters)
    for r, d in zip(dead, letters):
        src = d["source"]
        assert dict(r.headers)["dead_letter_id"].decode() == f"{src[0]}:{src[1]}:{src[2]}:decode"


def test_a_sigkill_mid_stream_loses_no_decision(broker, model, native, inputs, tmp_path):
    """Kill the worker once a third of the input is committed, restart it on an empty state
    directory (so key states come back from the table's changelog), run to the end. Every
    decision the native worker makes is there, and no other; the only extra copies are
    replays of input past the commit (same id, same content)."""
    ends = inputs[0]["in-faust-kill"]
    log = tmp_path / "worker.log"
    cmd = _faust_cmd(broker, "g-faust-kill", tmp_path / "state", "faust-kill")
    proc = _start(cmd, log, model)
    try:
        at_kill = _wait_committed(broker, "g-faust-kill", "in-faust-kill", ends, proc, log, at_least=0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert sum(at_kill.values()) < sum(ends.values())  # killed mid-stream, not after the end
        with log.open("ab") as fh:
            fh.write(b"\n---- restart after SIGKILL ----\n")
        cmd[cmd.index("--state-dir") + 1] = str(tmp_path / "state-after")  # nothing local: the changelog
        proc = _start(cmd, log, model)
        _wait_committed(broker, "g-faust-kill", "in-faust-kill", ends, proc, log)
        assert _stop(proc, log) == 0, log_excerpt(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, dead = _outputs(broker, "faust-kill")
    # the native decisions at the crash topic's positions (same records, same offsets)
    expected = {decision_id(d.key, SourcePos("in-faust-kill", d.source.partition, d.source.offset)):
                (d.key, d.ts, d.action) for d in native.decisions}
    copies = Counter(dict(r.headers)["decision_id"].decode() for r in out)
    assert set(copies) == set(expected)  # none lost, none that the native worker would not make
    for r in out:  # a duplicate is the same decision again, never a different one
        d = _dec.decode(r.value)
        assert (d["key"], d["ts"], d["action"]) == expected[d["decision_id"]]
        if copies[d["decision_id"]] > 1:  # ... and only of input past what was committed at the kill
            assert d["source"][2] >= at_kill[d["source"][1]], (d["source"], at_kill)
    dead_ids = Counter(dict(r.headers)["dead_letter_id"].decode() for r in dead)
    assert set(dead_ids) == {f"in-faust-kill:{x.source.partition}:{x.source.offset}:decode"
                             for x in native.dead_letters}


# -- in process: the agent's lanes, batching and acks, with stand-ins for faust's events ---------


class _Event:
    """What the agent uses of a faust Event: its message and `ack()`."""

    def __init__(self, offset: int, value: bytes, acks: list[int]) -> None:
        self.message = SimpleNamespace(topic="in", partition=0, offset=offset, value=value, key=None,
                                       headers=None, generation_id=1)
        self._acks = acks

    def ack(self) -> bool:
        self._acks.append(self.message.offset)
        return True


class _Stream:
    """Yields the events, lets the model answer once all are in, and ends when all are acked
    (a faust stream never ends; the agent cancels its unfinished lanes when it does)."""

    def __init__(self, events: list[_Event], acks: list[int], release: asyncio.Event) -> None:
        self._events, self._acks, self._release = events, acks, release

    def noack(self) -> _Stream:
        return self

    async def events(self):
        for e in self._events:
            yield e
        self._release.set()
        while len(self._acks) < len(self._events):
            await asyncio.sleep(0.01)


class _Sink(MemorySink):
    def prune(self, partition: int, committed: int) -> None:
        pass


def test_the_agent_batches_across_keys_keeps_key_order_and_acks_in_offset_order():
    release = asyncio.Event()

    async def gate(requests) -> None:
        await release.wait()

    engine = ScriptedEngine(before=gate)
    pipe = make_pipeline(engine, edge_kw={"max_batch": 8, "max_wait_ms": 20.0})
    keys = ["a", "b", "c", "d"]
    # every key: flagged, two plain readings, flagged again; keys interleaved in one partition
    items = [item(k, 10 * i + j, flag=i in (0, 3)) for i in range(4) for j, k in enumerate(keys)]
    acks: list[int] = []
    events = [_Event(o, _enc.encode(it), acks) for o, it in enumerate(items)]
    table: dict[bytes, bytes] = {}
    sink = _Sink()
    agent = PonderAgent(pipe, table, sink)
    asyncio.run(asyncio.wait_for(agent.run(_Stream(events, acks, release)), 10))
    # the first escalations of all four keys went to the model as one batch
    assert [len(c) for c in engine.calls][:1] == [4]
    assert sum(len(c) for c in engine.calls) == 8
    # each key's decisions in order, each made on the state as of its own event
    for j, k in enumerate(keys):
        assert seqs(sink.decisions, k) == [j, 30 + j]
    # acked once each, in offset order, though keys finished out of order
    assert acks == list(range(len(items)))
    # the table holds each key's state as of its last event
    assert {k: msgspec.msgpack.decode(v)["offset"] for k, v in table.items()} == \
        {f"0|{k}".encode(): 12 + j for j, k in enumerate(keys)}


def test_an_offset_delivered_twice_is_acked_twice():
    """faust can hand the agent one offset twice in one generation (it seeks back after a table
    recovery or a rejoin). Both copies finishing while an earlier record is still in its lane
    must both be acked: a copy left unacked keeps faust's shutdown waiting for it forever."""
    release = asyncio.Event()

    async def gate(requests) -> None:
        await release.wait()

    engine = ScriptedEngine(before=gate)
    pipe = make_pipeline(engine)
    acks: list[int] = []
    # offset 0 waits for the model; offset 1 (a plain reading) comes twice and finishes at once
    values = [_enc.encode(item("a", 0, flag=True)), _enc.encode(item("b", 1)), _enc.encode(item("b", 1))]
    events = [_Event(o, v, acks) for o, v in zip([0, 1, 1], values)]
    agent = PonderAgent(pipe, {}, _Sink())
    asyncio.run(asyncio.wait_for(agent.run(_Stream(events, acks, release)), 10))
    assert acks == [0, 1, 1]
    assert (agent.events, agent.decisions, agent.replayed) == (3, 1, 1)

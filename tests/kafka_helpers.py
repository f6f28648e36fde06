"""Shared helpers for the tests that run against a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ponder.connectors.kafka import ensure_topics, read_to_end

FAST_GROUP = ["--session-timeout-ms", "6000"]


async def publish(brokers: str, topic: str, values: list[bytes], keys: list[bytes | None],
                  partitions: int) -> dict[int, int]:
    """Produce records; return the end offset (next offset) of every partition."""
    await ensure_topics(brokers, {topic: partitions})
    p = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=5)
    await p.start()
    ends = {i: 0 for i in range(partitions)}
    try:
        futs = [await p.send(topic, value=v, key=k) for v, k in zip(values, keys)]
        for md in await asyncio.gather(*futs):
            ends[md.partition] = max(ends[md.partition], md.offset + 1)
    finally:
        await p.stop()
    return ends


async def committed(brokers: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {p: (await c.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)}
    finally:
        await c.stop()


async def read_all(brokers: str, topic: str, partitions: int) -> list:
    out = []
    async for _, batch in read_to_end(brokers, topic, {p: 0 for p in range(partitions)}):
        out.extend(batch)
    return out


def worker_cmd(brokers: str, *, group: str, state_dir: Path, partitions: int, input_topic: str,
               output_topic: str, dead_topic: str, checkpoint: float = 0.3) -> list[str]:
    return [sys.executable, "-m", "ponder.cli", "worker", "ponder.pipelines.iot_monitor:pipeline",
            "--brokers", brokers, "--group", group, "--state-dir", str(state_dir),
            "--input-topic", input_topic, "--output-topic", output_topic,
            "--dead-letter-topic", dead_topic, "--partitions", str(partitions),
            "--checkpoint-interval", str(checkpoint), *FAST_GROUP]


def start_worker(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a worker process logging to `log` (a new file) and wait until it runs."""
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_started(proc, log)
    return proc


def wait_committed(brokers: str, group: str, topic: str, ends: dict[int, int], *, at_least: float = 1.0,
                   timeout: float = 120.0, procs: list[subprocess.Popen] = ()) -> dict[int, int]:
    """Wait until the group has committed `at_least` of all records (1.0: every partition's end)."""
    total = sum(ends.values())
    deadline = time.monotonic() + timeout
    while True:
        got = asyncio.run(committed(brokers, group, topic, len(ends)))
        done = sum(min(got[p], ends[p]) for p in ends)
        if (at_least >= 1.0 and all(got[p] >= ends[p] for p in ends)) or (at_least < 1.0 and done >= at_least * total):
            return got
        for proc in procs:
            if proc.poll() is not None:
                msg = f"worker exited early with code {proc.returncode}"
                raise AssertionError(msg)
        if time.monotonic() > deadline:
            msg = f"timed out: committed {got} of {ends}"
            raise AssertionError(msg)
        time.sleep(0.1)


def wait_started(proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Wait until a worker (logging to its own file) has its signal handlers installed."""
    deadline = time.monotonic() + timeout
    while b"worker for pipeline" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            msg = f"worker did not start: {log.read_text()[-2000:]}"
            raise AssertionError(msg)
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


_dec = msgspec.json.Decoder()


def decision_rows(records) -> list[tuple]:
    """What must match between runs: everything but ids/positions/latency."""
    rows = []
    for r in records:
        d = _dec.decode(r.value)
        rows.append((d["key"], d["ts"], d["action"], d["severity"], d["reason"], d["confidence"], d["tier"]))
    return sorted(rows)


# -- fault tests (tests/test_faults_kafka.py, tests/test_network_partition.py) -------------------

TESTS_DIR = Path(__file__).resolve().parent


def pipeline_worker_cmd(ref: str, brokers: str, *, group: str, state_dir: Path, partitions: int, topics: str,
                        checkpoint: float = 0.3, session_timeout_ms: int = 6000) -> list[str]:
    """A worker for pipeline `ref` (a tests/ module is importable: see `worker_pythonpath`) reading
    `in-TOPICS` and writing `out-TOPICS` / `dead-TOPICS`."""
    return [sys.executable, "-m", "ponder.cli", "worker", ref,
            "--brokers", brokers, "--group", group, "--state-dir", str(state_dir),
            "--input-topic", f"in-{topics}", "--output-topic", f"out-{topics}",
            "--dead-letter-topic", f"dead-{topics}", "--partitions", str(partitions),
            "--checkpoint-interval", str(checkpoint), "--session-timeout-ms", str(session_timeout_ms)]


def worker_pythonpath() -> str:
    """PYTHONPATH for a worker subprocess that loads a pipeline module from tests/."""
    return os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)


def rocks_states(state_dir: Path, group: str, topic: str, partitions: int) -> dict[str, bytes]:
    """Every key state in a (stopped) worker's RocksDB stores, as stored bytes."""
    from ponder.state.rocks import RocksStore

    out = {}
    for p in range(partitions):
        path = state_dir / group / f"{topic}-{p}"
        if path.exists():
            s = RocksStore(path)
            out.update(dict(s.items()))
            s.close()
    return out


def decision_duplicates(records) -> tuple[list[str], list[tuple]]:
    """Decision ids and (key, partition, offset, epoch) positions that occur more than once."""
    ids: dict[str, int] = {}
    at: dict[tuple, int] = {}
    for r in records:
        i = dict(r.headers)["decision_id"].decode()
        ids[i] = ids.get(i, 0) + 1
        d = _dec.decode(r.value)
        pos = (d["key"], *d["source"][1:])
        at[pos] = at.get(pos, 0) + 1
    return sorted(i for i, n in ids.items() if n > 1), sorted(p for p, n in at.items() if n > 1)


_LOG_NOISE = ("httpx: HTTP Request", "Unable connect to node", "Unable to update metadata", "NodeNotReadyError",
              "subscription_state: Updating subscribed", "Elected group leader", "Successfully synced group")


def duplicate_copies(records, ids: list[str], limit: int = 5) -> str:
    """Where each copy of the first duplicated decision ids landed: output partition, offset
    and the producer's timestamp (when the writing worker sent it), for diagnosis."""
    lines = []
    for i in ids[:limit]:
        copies = [r for r in records if dict(r.headers)["decision_id"].decode() == i]
        src = _dec.decode(copies[0].value)["source"]
        at = ", ".join(f"out[{r.partition}]@{r.offset} t={r.timestamp}" for r in copies)
        lines.append(f"{i[:12]} (input {src}): {at}")
    return "\n".join(lines)


def log_excerpt(log: Path, lines: int = 40) -> str:
    """The tail of a worker log for assertion messages, without per-request HTTP lines, the
    reconnect attempts aiokafka logs many times a second while a broker is unreachable, and
    routine group chatter."""
    all_lines = log.read_text(errors="replace").splitlines()
    kept = [ln for ln in all_lines if not any(n in ln for n in _LOG_NOISE)]
    dropped = len(all_lines) - len(kept)
    head = [f"({dropped} HTTP/reconnect/routine lines left out)"] if dropped else []
    return "\n".join(head + kept[-lines:]) or "(empty log)"


def publish_events(brokers: str, topic: str, events: list[dict], partitions: int,
                   key_field: str = "device_id") -> dict[int, int]:
    """Publish simulator events keyed by device; return every partition's end offset."""
    enc = msgspec.json.Encoder()
    return asyncio.run(publish(brokers, topic, [enc.encode(e) for e in events],
                               [e[key_field].encode() for e in events], partitions))


def rows_of(decisions) -> list[tuple]:
    """`decision_rows` of Decision objects (a local run's sink)."""
    return sorted((d.key, d.ts, d.action, d.severity, d.reason, d.confidence, d.tier) for d in decisions)

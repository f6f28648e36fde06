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

"""`ponder dev`, `publish` and `subscribe` against a real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

from kafka_helpers import read_all


def ponder(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_dev_prints_a_bootstrap_address_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "dev"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        host, port = line.split(":")
        assert host == "127.0.0.1" and int(port) != 9092
        # the address really serves the Kafka protocol
        r = ponder("publish", "--brokers", line, "--topic", "t-dev", "--partitions", "2", "--no-progress",
                   stdin='{"device_id": "a", "ts": 1}\n')
        assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_publish_file_and_stdin_keyed_by_field(broker, tmp_path):
    lines = [json.dumps({"device_id": f"d{i % 5}", "ts": 1_700_000_000 + i, "v": i}) for i in range(100)]
    f = tmp_path / "e.jsonl"
    f.write_text("\n".join(lines[:60]) + "\n\n")
    r = ponder("publish", str(f), "--brokers", broker, "--topic", "t-pub", "--partitions", "4", "--no-progress")
    assert r.returncode == 0 and "published 60 records" in r.stderr
    r = ponder("publish", "--brokers", broker, "--topic", "t-pub", "--no-progress",
               stdin="\n".join(lines[60:]) + '\n{"no_key": 1}\n')
    assert r.returncode == 0 and "published 41 records" in r.stderr and "1 lines had no key field" in r.stderr
    recs = asyncio.run(read_all(broker, "t-pub", 4))
    assert len(recs) == 101
    by_key: dict[bytes, set[int]] = {}
    for rec in recs:
        by_key.setdefault(rec.key, set()).add(rec.partition)
    assert all(len(parts) == 1 for parts in by_key.values()), "a key must map to one partition"
    # order within a key is publish order
    for key in (b"d0", b"d3"):
        seq = [json.loads(r.value)["v"] for r in sorted((r for r in recs if r.key == key), key=lambda r: r.offset)]
        assert seq == sorted(seq) and len(seq) == 20


def test_publish_simulated_fleet_then_subscribe_json(broker):
    r = ponder("publish", "--brokers", broker, "--topic", "t-sim", "--simulate", "--devices", "7",
               "--events-per-device", "30", "--no-progress", "--partitions", "3")
    assert r.returncode == 0 and "published 210 records" in r.stderr
    r = ponder("subscribe", "--brokers", broker, "--topic", "t-sim", "--from-beginning", "--json",
               "--count", "50")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(objs) == 50 and all("device_id" in o for o in objs)
    t0 = time.monotonic()
    r = ponder("subscribe", "--brokers", broker, "--topic", "t-sim", "--from-beginning", "--json",
               "--idle-timeout", "1")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 210
    assert time.monotonic() - t0 < 30


def test_subscribe_pretty_prints_decisions(broker):
    d = {"decision_id": "x", "key": "pump-7", "action": "stop_pump", "severity": "critical", "reason": "dry run",
         "confidence": 0.9, "tier": "reflex", "model": "reflex", "usage": {}, "latency_ms": 1.0,
         "degraded": False, "evidence": {}}
    r = ponder("publish", "--brokers", broker, "--topic", "t-dec", "--key-field", "key", "--no-progress",
               stdin=json.dumps(d) + "\n")
    assert r.returncode == 0
    r = ponder("subscribe", "--brokers", broker, "--topic", "t-dec", "--from-beginning", "--count", "1")
    assert r.returncode == 0
    assert "pump-7" in r.stdout and "stop_pump" in r.stdout and "dry run" in r.stdout


def test_subscribe_unknown_topic_is_a_clear_error(broker):
    r = ponder("subscribe", "--brokers", broker, "--topic", "no-such-topic-xyz", "--idle-timeout", "1", timeout=60)
    assert r.returncode == 2
    assert "topic 'no-such-topic-xyz' does not exist" in r.stderr and "Traceback" not in r.stderr

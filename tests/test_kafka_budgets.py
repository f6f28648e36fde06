"""A budget holds for a whole consumer group: two workers on a 4-partition topic, the second
joining mid-stream (partitions move, with their budget accounts), spend no more than the cap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import msgspec
from budget_pipelines import CALL_USD, CAP_USD
from kafka_helpers import (pipeline_worker_cmd, publish, read_all, stop, wait_committed, wait_started,
                           worker_pythonpath)

PARTS = 4


def start(cmd, log):
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": worker_pythonpath()}
    proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=env)
    wait_started(proc, log)
    return proc


def events(keys: range, ts: float) -> tuple[list[bytes], list[bytes]]:
    enc = msgspec.json.Encoder()
    return [enc.encode({"k": f"dev-{i}", "ts": ts}) for i in keys], [f"dev-{i}".encode() for i in keys]


def test_a_cap_holds_across_two_workers_while_partitions_move(broker, tmp_path):
    cmd = lambda i: pipeline_worker_cmd("budget_pipelines:capped", broker, group="g-budget",  # noqa: E731
                                        state_dir=tmp_path / f"state-{i}", partitions=PARTS, topics="budget")
    a = start(cmd(0), tmp_path / "a.log")
    try:
        # enough escalations to spend every partition's share: the cap is 20 calls
        ends = asyncio.run(publish(broker, "in-budget", *events(range(120), 1.0), PARTS))
        wait_committed(broker, "g-budget", "in-budget", ends, procs=[a])
        b = start(cmd(1), tmp_path / "b.log")  # takes half the partitions over, with their accounts
        deadline = time.monotonic() + 60
        while b"assigned [" not in (tmp_path / "b.log").read_bytes():
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()[-2000:]
            time.sleep(0.1)
        ends = asyncio.run(publish(broker, "in-budget", *events(range(120, 240), 2.0), PARTS))
        wait_committed(broker, "g-budget", "in-budget", ends, procs=[a, b])
        assert stop(b) == 0
    finally:
        assert stop(a) == 0
    recs = asyncio.run(read_all(broker, "out-budget", PARTS))
    decisions = [msgspec.json.decode(r.value) for r in recs]
    edge = [d for d in decisions if d["tier"] == "edge"]
    spent = sum(d["usage"]["cost_usd"] for d in edge)
    assert len({d["decision_id"] for d in decisions}) == len(decisions) == 240
    assert 0 < spent <= CAP_USD * 1.01, (len(edge), spent)
    assert len(edge) == round(spent / CALL_USD)
    refused = [d for d in decisions if d["tier"] == "reflex"]
    assert refused and all(any("budget tier=edge" in s for s in d["trace"]["skipped"]) for d in refused)
    # the second worker took partitions over and decided events there too, within the shares
    assert "assigned [" in (tmp_path / "b.log").read_text()

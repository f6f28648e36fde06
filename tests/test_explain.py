"""The trace store, `ponder explain` and `ponder costs`: a decision explains itself (the prompt
the engine received, its raw outputs and their validation, tiers tried and skipped, tokens,
cost, stages), a quiet key shows its gate verdicts, the store keeps to its bounds, and costs
add up to what the decisions say they cost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import msgspec
import pytest
from kafka_helpers import (pipeline_worker_cmd, publish, read_all, stop, wait_committed, wait_started,
                           worker_pythonpath)
from typer.testing import CliRunner

from pipeline_runs import run_module

from ponder.cli import app
from ponder.runtime.tracestore import TraceStore
from ponder.types import Decision, Event, SourcePos

runner = CliRunner()
T0 = 1_700_000_000.0

PIPELINE = '''
import json
from ponder import Budget, GatePolicy, Pipeline, Price, Rule, TierSpec
from ponder.inference.engine import Completion
from ponder.types import Usage


class Recording:
    """A scripted model tier that keeps every request it received."""

    name = "recording"

    def __init__(self):
        self.requests = []
        self.script = {}  # decision id -> answers left, in order

    async def start(self): ...
    async def stop(self): ...

    async def generate(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            left = self.script.setdefault(r.request_id, ["not json at all",
                json.dumps({"action": "alert", "severity": "high", "reason": "hot", "confidence": 0.3})])
            out.append(Completion(left.pop(0), Usage(1000, 600, 40), "rec-1", enforced=False))
        return out


edge = Recording()
pipeline = Pipeline(
    name="ex", key="k", time="ts", actions=("none", "alert"), tenant="t",
    budgets=(Budget(tier="cloud", usd=0.0),),
    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("hot", lambda e: e.payload["s"]),)),
    tiers=(TierSpec("reflex", max_batch=1),
           TierSpec("edge", engine=edge, min_score=0.5, max_batch=1, min_confidence=0.5,
                    price=Price(prompt=2.0, cached_prompt=0.5, completion=8.0)),
           TierSpec("cloud", engine="reflex", min_score=0.9, max_batch=1, cost_per_1k_tokens=1.0)))
'''


def events() -> list[dict]:
    """Two tenants' keys, one event a second; `a` escalates at seconds 10 and 40 only."""
    out = []
    for i in range(60):
        for tenant, key in (("acme", "a"), ("acme", "b"), ("globex", "a")):
            hot = key == "a" and tenant == "acme" and i in (10, 40)
            out.append({"k": key, "t": tenant, "ts": T0 + i, "s": 0.95 if hot else round(0.01 * (i % 7), 2)})
    return out


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`ponder run` over the events with a recording engine; (decisions, engine, store path)."""
    return run_module(tmp_path, monkeypatch, f"explain_pipe_{tmp_path.name}", PIPELINE, events())


def explain(*args: str) -> dict:
    r = runner.invoke(app, ["explain", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_explain_shows_what_the_engine_received_and_answered(run):
    decisions, edge, store = run
    model_made = [d for d in decisions if d.tier == "edge"]
    assert len(model_made) == 2 and len(edge.requests) == 4  # each: a garbage answer, then a repair
    d = model_made[0]
    doc = explain(d.decision_id, "--store", str(store))
    sent = [r for r in edge.requests if r.request_id == d.decision_id]
    assert len(sent) == 2
    # the prompt as the engine received it, and the repair note the second call added
    assert doc["prompt"]["prefix"] + doc["prompt"]["tail"] == sent[0].prefix + sent[0].tail
    calls = doc["attempts"]
    assert [c["tier"] for c in calls] == ["edge", "edge"]
    assert doc["prompt"]["prefix"] + doc["prompt"]["tail"] + calls[1]["repair"] == sent[1].prefix + sent[1].tail
    assert calls[1]["repair"] != ""
    assert [o["text"] for o in calls[0]["outputs"]] == ["not json at all"]
    assert calls[0]["outputs"][0]["error"] != "" and calls[1]["outputs"][0]["error"] == ""
    assert json.loads(calls[1]["outputs"][0]["text"])["confidence"] == 0.3
    # tiers: edge answered unconfidently, cloud was wanted next but its budget is spent
    assert doc["route"] == ["edge", "edge"]
    assert doc["skipped"] == d.trace.skipped and any(s.startswith("cloud: ") for s in doc["skipped"])
    assert [s["step"] for s in doc["steps"]] == ["first", "up"]
    assert doc["steps"][1]["why"] == "confidence 0.30 < 0.50 at edge"
    # tokens new vs cached and cost exactly as the decision carries them
    assert doc["tokens"] == {"prompt": 2000, "cached": 1200, "new": 800, "completion": 80, "estimated": False}
    assert doc["cost_usd"] == d.usage.cost_usd == pytest.approx(2 * (400 * 2.0 + 600 * 0.5 + 40 * 8.0) / 1e6)
    assert sum(c["usage"]["cost_usd"] for c in calls) == pytest.approx(d.usage.cost_usd)
    assert doc["gate"]["score"] == d.trace.gate_score and doc["gate"]["findings"][0]["kind"] == "rule"
    assert doc["event"]["payload"]["s"] == 0.95 and doc["event"]["ts"] == d.ts
    assert {s["name"] for s in doc["stages"]} >= {"context render", "route", "edge", "decide"}
    # the rich view shows the same prompt and outputs
    r = runner.invoke(app, ["explain", d.decision_id, "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert "not json at all" in r.stdout and "new 800 + cached 1200" in r.stdout


def test_explain_key_around_lists_the_quiet_verdicts(run):
    _, _, store = run
    doc = explain("--key", "a", "--tenant", "acme", "--around", str(T0 + 12), "--window", "5", "--store", str(store))
    # seconds 7..17 of acme/a: 11 events, one escalated (second 10)
    assert [g["ts"] for g in doc["gates"]] == [T0 + i for i in range(7, 18)]
    assert [g["escalated"] for g in doc["gates"]].count(True) == 1
    quiet = [g for g in doc["gates"] if not g["escalated"]]
    assert [g["score"] for g in quiet] == [round(0.01 * (i % 7), 2) for i in range(7, 18) if i != 10]
    assert all(g["reasons"] == f"rule * {g['score']:.2f} (hot)" for g in quiet if g["score"] > 0)
    assert [d["ts"] for d in doc["decisions"]] == [T0 + 10]
    # without a tenant both tenants' `a` show; ISO time works too
    doc = explain("--key", "a", "--around", "2023-11-14T22:13:32Z", "--window", "5", "--store", str(store))
    assert len(doc["gates"]) == 22 and doc["around"] == T0 + 12


def test_costs_add_up_to_the_decisions(run):
    decisions, _, store = run
    r = runner.invoke(app, ["costs", "--store", str(store), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["total"]["usd"] == pytest.approx(sum(d.usage.cost_usd for d in decisions))
    assert rep["total"]["decisions"] == len(decisions)
    for g in ("tenant", "tier", "action"):
        want: dict[str, float] = {}
        for d in decisions:
            want[getattr(d, g)] = want.get(getattr(d, g), 0.0) + d.usage.cost_usd
        got = {row[g]: row["usd"] for row in rep[f"by_{g}"]}
        assert got.keys() >= {k for k, v in want.items() if v}
        assert {k: pytest.approx(v) for k, v in want.items()} == {k: got.get(k, 0.0) for k in want}
    assert {row["model"] for row in rep["by_model"] if row["usd"]} == {"rec-1"}
    assert rep["by_key"][0]["key"] == "a" and rep["by_key"][0]["decisions"] == 2
    # a time range: only the decision at second 40
    r = runner.invoke(app, ["costs", "--store", str(store), "--since", str(T0 + 30), "--json"])
    late = [d for d in decisions if d.ts >= T0 + 30]
    assert json.loads(r.stdout)["total"]["usd"] == pytest.approx(sum(d.usage.cost_usd for d in late))
    r = runner.invoke(app, ["costs", "--store", str(store)])
    assert r.exit_code == 0 and "by tenant" in r.stdout


def test_costs_from_a_ledger(tmp_path: Path):
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"pipeline": "p", "spend": [
        {"tenant": "acme", "tier": "edge", "calls": 2, "prompt_tokens": 10, "cached_prompt_tokens": 4,
         "completion_tokens": 3, "usd": 0.5, "reserved_usd": 0.0},
        {"tenant": "globex", "tier": "edge", "calls": 1, "prompt_tokens": 5, "cached_prompt_tokens": 0,
         "completion_tokens": 1, "usd": 0.25, "reserved_usd": 0.0}]}))
    r = runner.invoke(app, ["costs", "--ledger", str(ledger), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["total"]["usd"] == 0.75 and rep["total"]["calls"] == 3
    assert [(row["tenant"], row["usd"]) for row in rep["by_tenant"]] == [("acme", 0.5), ("globex", 0.25)]
    assert rep["by_tier"] == [{"tier": "edge", "calls": 3, "prompt_tokens": 15, "cached_prompt_tokens": 4,
                               "completion_tokens": 4, "usd": 0.75}]
    r = runner.invoke(app, ["costs", "--ledger", str(ledger), "--since", "0"])
    assert r.exit_code == 2 and "a ledger keeps no times" in r.output


def test_unknown_decision_and_bad_arguments_exit_2(run, tmp_path: Path):
    _, _, store = run
    r = runner.invoke(app, ["explain", "0" * 32, "--store", str(store)])
    assert r.exit_code == 2 and f"no decision {'0' * 32!r}" in r.output
    r = runner.invoke(app, ["explain", "x", "--store", str(tmp_path / "missing.db")])
    assert r.exit_code == 2 and "no trace store at" in r.output
    r = runner.invoke(app, ["explain", "--key", "a", "--store", str(store)])
    assert r.exit_code == 2 and "--key KEY with --around TIME" in r.output
    r = runner.invoke(app, ["explain", "--key", "a", "--around", "yesterday", "--store", str(store)])
    assert r.exit_code == 2 and "neither UNIX seconds nor an ISO 8601 time" in r.output
    junk = tmp_path / "junk.db"
    junk.write_text("not a database " * 100)
    r = runner.invoke(app, ["explain", "x", "--store", str(junk)])
    assert r.exit_code == 2 and "is not a ponder trace store" in r.output


def _gate_rows(n: int, start: int = 0):
    from ponder.operators.gate import Verdict
    from ponder.types import Finding

    for i in range(start, start + n):
        ev = Event("k", float(i), {"v": i}, SourcePos("t", 0, i))
        yield ev, Verdict(0.1, False, [Finding("spike", "v", 0.1)])


def test_the_store_keeps_to_its_size_bound_dropping_the_oldest(tmp_path: Path):
    cap = 96 << 10
    store = TraceStore(tmp_path / "t.db", max_bytes=cap, flush_every=1_000)
    for ev, v in _gate_rows(20_000):
        store.gate(ev, v)
        if ev.source.offset % 1_000 == 999:  # flushed here: within the bound after each
            assert store.size() <= cap
    store.close()
    assert (tmp_path / "t.db").stat().st_size <= cap + (4 << 10)  # one page of slack for the header
    store = TraceStore(tmp_path / "t.db", readonly=True)
    (lo, hi, n) = store.db.execute("SELECT min(ts), max(ts), count(*) FROM gates").fetchone()
    assert hi == 19_999.0 and n == hi - lo + 1 and 0 < n < 20_000  # the newest kept, contiguous
    store.db.close()


def test_the_store_drops_rows_past_their_age(tmp_path: Path):
    now = [1000.0]
    store = TraceStore(tmp_path / "t.db", max_age_s=60.0, clock=lambda: now[0])
    for ev, v in _gate_rows(5):
        store.gate(ev, v)
    store.flush()
    now[0] += 30.0
    for ev, v in _gate_rows(3, start=5):
        store.gate(ev, v)
    store.flush()
    assert store.counts()["gates"] == 8
    now[0] += 31.0  # the first five are 61 s old, the next three 31 s
    store.prune()
    assert [r[0] for r in store.db.execute("SELECT ts FROM gates ORDER BY ts")] == [5.0, 6.0, 7.0]
    now[0] += 30.0
    store.prune()
    assert store.counts()["gates"] == 0
    store.close()
    with pytest.raises(ValueError, match="max_bytes >= 65536"):
        TraceStore(tmp_path / "u.db", max_bytes=1000)


def test_a_kafka_worker_keeps_its_traces_beside_its_state(broker, tmp_path: Path):
    """`ponder worker` writes STATE_DIR/traces.db by default: each decision on the output topic
    explains itself from it, and its costs add up to theirs."""
    state = tmp_path / "state"
    cmd = pipeline_worker_cmd("budget_pipelines:capped", broker, group="g-explain", state_dir=state,
                              partitions=2, topics="explain")
    log = tmp_path / "w.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": worker_pythonpath()})
    try:
        wait_started(proc, log)
        enc = msgspec.json.Encoder()
        ends = asyncio.run(publish(broker, "in-explain", [enc.encode({"k": f"dev-{i}", "ts": T0 + i})
                                                          for i in range(6)],
                                   [f"dev-{i}".encode() for i in range(6)], 2))
        wait_committed(broker, "g-explain", "in-explain", ends, procs=[proc])
    finally:
        assert stop(proc) == 0, log.read_text()[-2000:]
    decisions = [msgspec.json.decode(r.value, type=Decision)
                 for r in asyncio.run(read_all(broker, "out-explain", 2))]
    assert len(decisions) == 6
    store = state / "traces.db"
    for d in decisions:
        doc = explain(d.decision_id, "--store", str(store))
        assert doc["decision"]["key"] == d.key and doc["cost_usd"] == d.usage.cost_usd
        assert [a["tier"] for a in doc["attempts"]] == d.trace.route
    r = runner.invoke(app, ["costs", "--store", str(store), "--json"])
    rep = json.loads(r.stdout)
    assert rep["total"]["decisions"] == 6
    assert rep["total"]["usd"] == pytest.approx(sum(d.usage.cost_usd for d in decisions))


async def test_a_store_that_cannot_be_written_never_stops_the_stream(tmp_path: Path, caplog):
    from ponder.connectors.memory import MemorySink, MemorySource
    from ponder.operators.gate import GatePolicy, Rule
    from ponder.operators.route import TierSpec
    from ponder.pipelines.pipeline import Pipeline

    pipe = Pipeline(name="p", key="k", time="ts", actions=("none", "alert"),
                    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("all", lambda e: True),)),
                    tiers=(TierSpec("reflex", max_batch=1),))
    store = TraceStore(tmp_path / "t.db")
    store.db.close()  # every write now fails
    sink = MemorySink()
    stats = await pipe.worker(MemorySource([{"k": f"k{i}", "ts": 1.0} for i in range(5)]), sink,
                              traces=store).run()
    assert stats.decisions == len(sink.decisions) == 5
    assert "trace store" in caplog.text and "dropping 10 records" in caplog.text


async def test_with_a_privacy_policy_the_store_keeps_the_prompt_not_the_payload(tmp_path: Path):
    from ponder.connectors.memory import MemorySink, MemorySource
    from ponder.inference.engine import Completion
    from ponder.operators.gate import GatePolicy, Rule
    from ponder.operators.privacy import FieldRule, Policy, Privacy
    from ponder.operators.route import TierSpec
    from ponder.pipelines.pipeline import Pipeline
    from ponder.types import Usage

    class Echo:
        name = "echo"

        def __init__(self) -> None:
            self.prompts: list[str] = []

        async def start(self) -> None: ...
        async def stop(self) -> None: ...

        async def generate(self, requests):
            self.prompts.extend(r.prefix + r.tail for r in requests)
            answer = '{"action":"alert","severity":"high","reason":"r","confidence":0.9}'
            return [Completion(answer, Usage(10, 0, 5), "echo-1") for _ in requests]

    edge = Echo()
    pipe = Pipeline(name="p", key="k", time="ts", actions=("none", "alert"),
                    privacy=Privacy(default=Policy(fields=(FieldRule("ssn", "drop"),))),
                    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("all", lambda e: True),)),
                    tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=edge, min_score=0.5, max_batch=1)))
    store = TraceStore(tmp_path / "t.db")
    sink = MemorySink()
    await pipe.worker(MemorySource([{"k": "a", "ts": 1.0, "ssn": "123-45-6789", "v": 3}]), sink,
                      traces=store).run()
    (d,) = sink.decisions
    doc = explain(d.decision_id, "--store", str(tmp_path / "t.db"))
    assert doc["event"]["payload"] is None and doc["privacy"] == {"ssn": "drop"}
    assert doc["prompt"]["prefix"] + doc["prompt"]["tail"] == edge.prompts[0]
    store.close()  # the write-ahead log merged into the file
    raw = (tmp_path / "t.db").read_bytes()
    assert b'\\"v\\"=3' in raw and b"123-45-6789" not in raw  # the prompt's data is there, the dropped field not

"""`ponder demo` end to end at a small size, its model server's lifetime, and the tiered pipeline
through `ponder run` with a served cloud tier.

Small here means a fleet of 16 devices x 200 readings whose gate escalates 9 events: a few at
each tier for each tenant (seed 1; the routing depends on gate scores only, the edge's
`min_confidence` being 0). The cloud checkpoint is `tiny` instead of the demo's `small`, to keep
the test quick; the path is the same.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from ponder.demo import ServedModel, cost_per_1k_every_event, forecast_errors
from ponder.evaluate.truth import read_decisions
from ponder.inference.jax.checkpoint import init_model
from ponder.pipelines import iot_tiered
from ponder.simulate import simulate

SIZE = ["--devices", "16", "--events-per-device", "200", "--seed", "1"]
TENANTS = {"acme", "globex"}
MODEL_TIERS = ("edge", "cloud")


def ponder(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/models", timeout=2.0)
    except httpx.ConnectError:
        return True
    return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    started = time.time()
    r = ponder("demo", *SIZE, "--cloud-preset", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["test_started"] = started
    decisions = list(read_decisions(out / "decisions.jsonl"))
    return r, out, summary, decisions


def test_the_demo_prints_every_tenant_and_tier_and_says_the_weights_are_random(demo):
    r, _, summary, _ = demo
    text = r.stdout
    assert "RANDOM WEIGHTS" in text
    for word in ("acme", "globex", "reflex", "edge", "cloud", "incident recall", "decisions:",
                 "USD per 1k events, tiered", "every event to the cloud", "saving",
                 "cost forecast: median abs error", "budgets"):
        assert word in text, word
    # one row per tenant and tier that was called, then the totals per tier
    rows = re.findall(r"^ +(acme|globex|all) +(reflex|edge|cloud|all) +([\d,]+) ", text, re.M)
    calls = {(t, tier): int(n.replace(",", "")) for t, tier, n in rows}
    assert calls == {**{(s["tenant"], s["tier"]): s["calls"] for s in summary["spend"]},
                     **{("all", tier): sum(s["calls"] for s in summary["spend"] if s["tier"] == tier)
                        for tier in ("reflex", "edge", "cloud")},
                     ("all", "all"): sum(s["calls"] for s in summary["spend"])}
    assert "files kept in" in r.stderr


def test_the_books_balance(demo):
    _, out, summary, decisions = demo
    assert summary["tenants"] == ["acme", "globex"] and summary["events"] == 16 * 200
    spend = {(s["tenant"], s["tier"]): s for s in summary["spend"]}
    for tenant in TENANTS:
        for tier in MODEL_TIERS:
            assert spend[(tenant, tier)]["calls"] > 0, (tenant, tier)
    # every call is a tier in some decision's route; every decision's cost is in the spend
    routed = Counter((d.tenant, tier) for d in decisions for tier in d.trace.route)
    assert {k: s["calls"] for k, s in spend.items()} == dict(routed)
    total = sum(s["usd"] for s in spend.values())
    assert total == pytest.approx(sum(d.usage.cost_usd for d in decisions), rel=1e-6)
    assert all(s["usd"] == 0.0 for (_, tier), s in spend.items() if tier == "reflex")
    assert all(s["reserved_usd"] == 0.0 for s in spend.values())
    # the ledger the worker wrote says the same, and no budget passed its cap
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["spend"] == summary["spend"] and ledger["budgets"] == summary["budgets"]
    caps = {(b["tenant"], b["tier"]): b for b in summary["budgets"]}
    assert set(caps) == {("acme", "cloud"), ("globex", "cloud"), ("*", "*")}
    for (tenant, tier), b in caps.items():
        assert b["reserved_usd"] == 0.0 and b["spent_usd"] <= b["cap_usd"]
        covered = sum(s["usd"] for (t, ti), s in spend.items() if tenant in ("*", t) and tier in ("*", ti))
        if b["window_start"] <= summary["test_started"]:
            assert b["spent_usd"] == pytest.approx(covered, rel=1e-6, abs=1e-9)
        else:  # the run crossed into a new hour: the window holds only what was spent since
            assert b["spent_usd"] <= covered + 1e-9


def test_the_cost_per_1k_events_and_the_forecast(demo):
    _, _, summary, decisions = demo
    total = sum(s["usd"] for s in summary["spend"])
    assert summary["tiered_usd_per_1k"] == pytest.approx(1000 * total / summary["events"])
    cloud = [s for s in summary["spend"] if s["tier"] == "cloud"]
    calls = sum(s["calls"] for s in cloud)
    tokens = [sum(s[k] for s in cloud) for k in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens")]
    every = cost_per_1k_every_event(iot_tiered.CLOUD_PRICE, calls, *tokens)
    assert every == pytest.approx(1000 * iot_tiered.CLOUD_PRICE.cost(*(round(t / calls) for t in tokens)))
    assert summary["every_event_usd_per_1k"] == pytest.approx(every)
    assert summary["saving"] == pytest.approx(1 - summary["tiered_usd_per_1k"] / every)
    assert summary["tiered_usd_per_1k"] < every
    # the forecast is judged on each decision that called a model, against what it used
    called = [d for d in decisions if d.trace.predicted is not None]
    assert len(called) == sum(1 for d in decisions if set(d.trace.route) & set(MODEL_TIERS))
    assert summary["forecast"]["cost_usd"] == forecast_errors(
        (d.trace.predicted.cost_usd, d.usage.cost_usd) for d in called)
    assert summary["forecast"]["cost_usd"]["n"] == len(called)


def test_the_model_server_is_gone_after_the_demo(demo):
    _, out, summary, _ = demo
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", summary["server_url"])
    assert refused(summary["server_url"])
    assert "serving cloud on" in (out / "cloud-server.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_stops_its_model_server(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "demo", "--devices", "200",
                             "--cloud-preset", "tiny", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, seen = None, []
    try:
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
            url = m.group(0) if m else None
        assert url is not None, "".join(seen)
        assert not refused(url)  # serving, the demo still running
        proc.send_signal(sig)
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refused(url)


def test_the_tiered_pipeline_through_ponder_run_with_a_served_cloud(tmp_path):
    init_model(tmp_path / "edge", "tiny", seed=0)
    init_model(tmp_path / "cloud", "tiny", seed=1)
    sim = simulate(16, 200, 1, tmp_path, tenants=2)
    out, ledger = tmp_path / "decisions.jsonl", tmp_path / "ledger.json"
    with ServedModel(tmp_path / "cloud", tmp_path / "server.log", max_batch=4) as server:
        env = {**os.environ, "PONDER_EDGE_ENGINE": f"jax:{tmp_path / 'edge'}", "PONDER_CLOUD_URL": server.url}
        r = ponder("run", "ponder.pipelines.iot_tiered:pipeline", "--input", sim.events_path, "--output", str(out),
                   "--ledger", str(ledger), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"events={16 * 200} " in r.stderr and "dead_letters=0" in r.stderr
    decisions = list(read_decisions(out))
    assert {d.tenant for d in decisions} == TENANTS
    # each tier's answers come from its own model: the served one is named after its directory
    models = {d.tier: d.model for d in decisions if d.tier in MODEL_TIERS}
    assert models == {"edge": "edge", "cloud": "cloud"}
    doc = json.loads(ledger.read_text())
    assert doc["pipeline"] == "iot_tiered"
    routed = Counter((d.tenant, tier) for d in decisions for tier in d.trace.route)
    assert {(s["tenant"], s["tier"]): s["calls"] for s in doc["spend"]} == dict(routed)
    for tenant in TENANTS:
        for tier in MODEL_TIERS:
            assert routed[(tenant, tier)] > 0, (tenant, tier)
    assert sum(s["usd"] for s in doc["spend"]) == pytest.approx(sum(d.usage.cost_usd for d in decisions), rel=1e-6)
    for b in doc["budgets"]:
        assert b["reserved_usd"] == 0.0 and b["spent_usd"] <= b["cap_usd"]
    # cloud calls are billed at the stand-in hosted price, exactly from their usage
    for d in decisions:
        if d.trace.route == ["cloud"]:
            u = d.usage
            assert u.cost_usd == pytest.approx(iot_tiered.CLOUD_PRICE.cost(
                u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens), rel=1e-9)


def test_ponder_run_without_the_engines_says_which_variable_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONDER_")}
    (tmp_path / "in.jsonl").write_text("")
    r = ponder("run", "ponder.pipelines.iot_tiered:pipeline", "--input", str(tmp_path / "in.jsonl"), env=env,
               timeout=60)
    assert r.returncode == 2
    assert "needs $PONDER_EDGE_ENGINE" in " ".join(r.stderr.split())

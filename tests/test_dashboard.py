"""The Grafana dashboard checked for real: a real Prometheus (Debian's `prometheus`) scrapes a
real `ponder worker` running a stream on the test broker, and every panel's PromQL, as the
dashboard holds it, returns data from it."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from typer.testing import CliRunner
from kafka_helpers import (
    pipeline_worker_cmd,
    publish,
    stop,
    wait_started,
    worker_pythonpath,
)
from prometheus_client import CollectorRegistry

from ponder.cli import app
from ponder.runtime import top

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ponder.json"
PARTS = 2
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval would be at a 1s scrape interval, with margin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_queries(dashboard: dict) -> dict[str, str]:
    """Every panel's PromQL, by `panel title/refId`, Grafana's interval variable filled in."""
    out = {}
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out[f"{panel['title']}/{t['refId']}"] = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
    return out


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # a query Prometheus refuses (bad PromQL) says why
        body = json.load(e)
        msg = f"prometheus refused {expr!r}: {body.get('error')}"
        raise AssertionError(msg) from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def has_data(result: list[dict]) -> bool:
    """At least one series with a number (a ratio of idle rates is NaN: not data)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)


def start_prometheus(tmp: Path, port: int, target: str) -> subprocess.Popen:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` binary is not on PATH: install Debian's package "
                    "(apt-get install -y prometheus; .ci/run does)")
    cfg = tmp / "prometheus.yml"
    cfg.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ponder-worker", "static_configs": [{"targets": [target]}]}]}))
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)


def events(n: int, start: int, ts: float) -> tuple[list[bytes], list[bytes]]:
    enc = msgspec.json.Encoder()
    # new keys each time: the gate escalates a key's first event, so the stream keeps escalating
    keys = [f"dev-{i}" for i in range(start, start + n)]
    values = [enc.encode({"k": k, "ts": ts, "tenant": ("acme", "globex")[i % 2]})
              for i, k in zip(range(start, start + n), keys)]
    values.append(b"{not json")  # a poison record: a dead letter
    keys.append("poison")
    return values, [k.encode() for k in keys]


def test_dashboard_is_provisioned_with_a_unique_panel_per_query():
    dash = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dash)
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)) and len(queries) >= len(titles)
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
    # what the issue asks the dashboard to show, each by the metric that shows it
    text = " ".join(queries.values())
    for metric in ("ponder_events_total", "ponder_escalations_total", "ponder_decisions_total",
                   "ponder_stage_seconds_bucket", "ponder_tenant_cost_usd_total", "ponder_budget_remaining_usd",
                   "ponder_degraded_decisions_total", "ponder_dead_letters_total", "ponder_queue_depth",
                   "ponder_batch_size_sum", "ponder_session_hit_ratio", "ponder_engine_tokens_total"):
        assert metric in text, metric
    assert "key" not in {lab.strip() for q in queries.values() for lab in q.replace("(", ",").replace(")", ",").split(",")}


def test_every_panel_returns_data_from_a_real_prometheus_scraping_a_worker(broker, tmp_path):
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    metrics_port, prom_port = free_port(), free_port()
    cmd = [*pipeline_worker_cmd("dashboard_pipelines:pipeline", broker, group="g-dash", state_dir=tmp_path / "state",
                                partitions=PARTS, topics="dash"), "--metrics-port", str(metrics_port)]
    fh = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - lives as long as the process
    worker = subprocess.Popen(cmd, stdout=fh, stderr=fh,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": worker_pythonpath()})
    prom = None
    try:
        wait_started(worker, tmp_path / "worker.log")
        prom = start_prometheus(tmp_path, prom_port, f"127.0.0.1:{metrics_port}")
        missing = dict(queries)
        deadline = time.monotonic() + 90
        sent = 0
        while missing:
            # a live stream: rates over the last 30s stay above zero while the queries run
            asyncio.run(publish(broker, "in-dash", *events(40, sent, 1.0 + sent), PARTS))
            sent += 40
            for name, expr in list(missing.items()):
                try:
                    if has_data(query(prom_port, expr)):
                        del missing[name]
                except urllib.error.URLError:
                    break  # prometheus is still starting
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            if missing and time.monotonic() > deadline:
                pytest.fail(f"panels without data after 90s: {sorted(missing)}\n"
                            f"{(tmp_path / 'worker.log').read_text()[-2000:]}")
            time.sleep(1.0)
        # the labels are tenants and tiers, never keys
        series = query(prom_port, '{__name__=~"ponder_.*"}')
        assert not any("key" in s["metric"] for s in series)
        stage = query(prom_port, "count by (tenant, tier, stage) (ponder_stage_seconds_count)")
        got = {(s["metric"]["tenant"], s["metric"]["tier"], s["metric"]["stage"]) for s in stage}
        assert {("acme", "edge", "batch wait"), ("globex", "edge", "engine prefill"),
                ("acme", "cloud", "call"), ("globex", "edge", "context render")} <= got
        # `ponder top` reads the same worker: two scrapes while the stream flows
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        first = top.scrape(url, time.monotonic())
        asyncio.run(publish(broker, "in-dash", *events(40, sent, 1.0 + sent), PARTS))
        time.sleep(2.0)
        v = top.view(first, top.scrape(url, time.monotonic()))
        assert v.events_s > 0 and set(v.tiers) == {"edge", "cloud"} and v.budgets
        assert {tenant for tenant, _ in v.spend_usd_h} <= {"acme", "globex"}
        r = CliRunner().invoke(app, ["top", url, "--once", "--interval", "1"])
        assert r.exit_code == 0 and f"ponder top: {url}" in r.output, r.output
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        assert stop(worker) == 0


# -- the metrics themselves, exactly ----------------------------------------------------------------


def scrape(collector) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def test_a_decisions_stages_and_calls_are_observed_by_tenant_tier_and_stage():
    from ponder.runtime.metrics import DecisionTimes
    from ponder.types import Decision, Span, Trace, Usage

    call = Span("edge", 40.0, parts=[Span("batch wait", 5.0), Span("engine", 30.0, parts=[Span("prefill", 10.0)]),
                                     Span("return wait", 5.0)])
    trace = Trace(1.0, [], ["cloud", "edge"], spans=[Span("cloud", 2.0), call],
                  stages=[Span("route", 1.0), Span("route", 2.0), Span("decide", 0.5)])
    d = Decision("id", "dev-1", "alert", "high", "r", 0.9, "edge", "m", Usage(), 50.0, True, {}, trace=trace,
                 tenant="acme")
    times = DecisionTimes("p")
    times.observe(d)
    times.observe(d)
    reg = scrape(times)
    got = lambda tier, stage: reg.get_sample_value(
        "ponder_stage_seconds_sum", {"pipeline": "p", "tenant": "acme", "tier": tier, "stage": stage})
    assert got("edge", "route") == pytest.approx(2 * 0.003)  # a decision's route steps summed
    assert got("edge", "decide") == pytest.approx(2 * 0.0005)
    assert got("cloud", "call") == pytest.approx(2 * 0.002)  # a call counts for the tier it called
    assert got("edge", "batch wait") == pytest.approx(2 * 0.005)
    assert got("edge", "engine prefill") == pytest.approx(2 * 0.010)
    assert reg.get_sample_value("ponder_stage_seconds_count", {"pipeline": "p", "tenant": "acme", "tier": "edge",
                                                               "stage": "engine"}) == 2
    lat = {"pipeline": "p", "tenant": "acme", "tier": "edge"}
    assert reg.get_sample_value("ponder_decision_latency_seconds_sum", lat) == pytest.approx(0.1)
    assert reg.get_sample_value("ponder_decision_latency_seconds_bucket", {**lat, "le": "0.05"}) == 2
    assert reg.get_sample_value("ponder_decision_latency_seconds_bucket", {**lat, "le": "0.025"}) == 0


def test_batch_sizes_queue_depth_and_engine_tokens_come_from_the_batcher():
    from ponder.inference.engine import Completion, Request
    from ponder.runtime.batcher import Batcher
    from ponder.runtime.metrics import WorkerCollector
    from ponder.types import Usage

    gate = asyncio.Event()

    class Slow:
        name = "slow"

        async def generate(self, requests):
            await gate.wait()
            return [Completion("{}", Usage(100, 0, 7), "m") for _ in requests]

    async def run():
        b = Batcher(Slow(), max_batch=4, max_wait_s=0.001, max_concurrency=1)
        req = Request("s", "p", "t", 10, ("none",), {})
        tasks = [asyncio.create_task(b.submit(req)) for _ in range(6)]
        await asyncio.sleep(0.05)  # one batch of 4 at the engine, 2 queued behind it
        worker = SimpleNamespace(_batchers={"edge": b})
        reg = scrape(collector_of(worker))
        during = (reg.get_sample_value("ponder_queue_depth", {"pipeline": "p", "tier": "edge"}),
                  reg.get_sample_value("ponder_batches_inflight", {"pipeline": "p", "tier": "edge"}))
        gate.set()
        await asyncio.gather(*tasks)
        return during, scrape(collector_of(worker))

    def collector_of(worker):
        c = WorkerCollector(worker, "p")
        c.collect = c._batchers  # the batcher's families only: this worker has nothing else
        return c

    during, reg = asyncio.run(run())
    assert during == (2, 1)
    labels = {"pipeline": "p", "tier": "edge"}
    assert reg.get_sample_value("ponder_batch_size_count", labels) == 2
    assert reg.get_sample_value("ponder_batch_size_sum", labels) == 6
    assert reg.get_sample_value("ponder_batch_size_bucket", {**labels, "le": "2.0"}) == 1
    assert reg.get_sample_value("ponder_batch_size_bucket", {**labels, "le": "4.0"}) == 2
    assert reg.get_sample_value("ponder_engine_tokens_total", {**labels, "kind": "completion"}) == 42
    assert reg.get_sample_value("ponder_engine_tokens_total", {**labels, "kind": "prompt"}) == 600
    assert reg.get_sample_value("ponder_engine_busy_seconds_total", labels) > 0
    assert reg.get_sample_value("ponder_queue_depth", labels) == 0


def test_the_model_server_exports_vllms_names_for_what_means_the_same():
    from collections import deque

    from ponder.inference.jax.generate import GenResult
    from ponder.inference.jax.server import _Metrics

    feed = SimpleNamespace(inbox=deque([(3, None)]), futures={1: None, 2: None, 3: None})
    m = _Metrics(SimpleNamespace(model="tiny", feed=feed, generator=None))
    m.on_done(GenResult(tokens=[1, 2, 3], prompt_tokens=10, cached_tokens=4), 0.2)
    m.on_done(GenResult(tokens=[1], prompt_tokens=6, cached_tokens=0, finish_reason="length"), 0.4)
    get = m.registry.get_sample_value
    model = {"model_name": "tiny"}
    assert get("vllm:prompt_tokens_total", model) == 16 == get("ponder_model_prompt_tokens_total")
    assert get("vllm:generation_tokens_total", model) == 4 == get("ponder_model_completion_tokens_total")
    assert get("vllm:prefix_cache_queries_total", model) == 16
    assert get("vllm:prefix_cache_hits_total", model) == 4
    assert get("vllm:e2e_request_latency_seconds_count", model) == 2
    assert get("vllm:e2e_request_latency_seconds_sum", model) == pytest.approx(0.6)
    assert get("vllm:request_success_total", {**model, "finished_reason": "stop"}) == 1
    assert get("vllm:request_success_total", {**model, "finished_reason": "length"}) == 1
    assert get("vllm:num_requests_running", model) == 2  # 3 submitted, 1 still in the inbox
    assert get("vllm:num_requests_waiting", model) == 1

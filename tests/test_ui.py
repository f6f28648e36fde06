"""`ponder ui`: the page, loaded in headless Chromium against a store a pipeline run wrote,
shows the decision stream, a key's timeline with one point per stored row of each kind, and a
decision's explain view with the prompt the engine received; it loads nothing from elsewhere,
and the store keeps each event's numeric fields (after the privacy policy) for its plot."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from pipeline_runs import run_module

from ponder.cli import app
from ponder.operators.gate import Verdict
from ponder.operators.privacy import FieldRule, Policy, Privacy
from ponder.runtime.tracestore import ROW_BYTES, SIGNAL_FIELDS, TraceStore
from ponder.types import Event, SourcePos
from ponder.ui.app import STATIC

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "benchmarks" / "results" / "ui_screenshot.png"
T0 = 1_700_000_000.0
runner = CliRunner()

PIPELINE = '''
import json
from ponder import GatePolicy, Pipeline, Rule, TierSpec
from ponder.inference.engine import Completion
from ponder.types import Usage


class Recording:
    """A model tier that answers every request with one alert and keeps what it received."""

    name = "recording"

    def __init__(self):
        self.requests = []

    async def start(self): ...
    async def stop(self): ...

    async def generate(self, requests):
        self.requests.extend(requests)
        answer = json.dumps({"action": "alert", "severity": "high", "reason": "too hot", "confidence": 0.9})
        return [Completion(answer, Usage(800, 500, 30), "rec-1", enforced=False) for _ in requests]


edge = Recording()
pipeline = Pipeline(
    name="uipage", key="k", time="ts", actions=("none", "alert"), tenant="t",
    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("hot", lambda e: e.payload["s"]),)),
    tiers=(TierSpec("reflex", max_batch=1),
           TierSpec("edge", engine=edge, min_score=0.5, max_batch=1, cost_per_1k_tokens=0.5)))
'''


def events() -> list[dict]:
    """Two tenants' keys, one event a second; acme's `a` is hot at seconds 10 and 40."""
    out = []
    for i in range(60):
        for tenant, key in (("acme", "a"), ("acme", "b"), ("globex", "a")):
            hot = (tenant, key) == ("acme", "a") and i in (10, 40)
            out.append({"k": key, "t": tenant, "ts": T0 + i, "s": 0.95 if hot else round(0.01 * (i % 7), 2),
                        "temp": 20 + (i % 5), "note": "text is no signal", "ok": True})
    return out


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`ponder run` over the events with a recording engine: (decisions, engine, store path)."""
    return run_module(tmp_path, monkeypatch, f"ui_pipe_{tmp_path.name}", PIPELINE, events())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def server(store):
    """`ponder ui` in its own process over the run's store: (base url, decisions, engine, store)."""
    decisions, edge, path = store
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ponder.cli", "ui", "--store", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(base + "api/keys")
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"ponder ui did not start: {proc.communicate()[0].decode()}")
                time.sleep(0.1)
        yield base, decisions, edge, path
    finally:
        proc.terminate()
        proc.wait(10)


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it): "
                    "the page test needs a headless browser")
    return exe


def _browse(url: str, *args: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--virtual-time-budget=4000", *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class Page(HTMLParser):
    """The dumped DOM's parts the test checks: timeline points, stream rows, the explain view."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[dict[str, str]] = []
        self.stream: list[dict[str, str]] = []
        self.svg: dict[str, str] = {}
        self.explain: dict[str, str] = {}
        self._in: str | None = None
        self.prompt = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and a.get("id") == "timeline":
            self.svg = a
        elif "data-kind" in a:
            self.points.append(a)
        elif tag == "li" and a.get("class", "").startswith("decision"):
            self.stream.append(a)
        elif a.get("id") == "explain":
            self.explain = a
        elif a.get("id") == "explain-prompt":
            self._in = "prompt"

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "prompt":
            self.prompt += data


def _expected(path: Path, tenant: str, key: str) -> dict[str, int]:
    """Each kind's rows for one key, read from the store with plain SQL."""
    db = sqlite3.connect(path)
    try:
        gates = db.execute("SELECT escalated, payload FROM gates WHERE tenant = ? AND key = ?", (tenant, key)).fetchall()
        (decided,) = db.execute("SELECT count(*) FROM decisions WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
    finally:
        db.close()
    # a row keeps its (small) payload: the plotted signal is its numbers other than the time
    signal = sum(type(x) in (int, float) and name != "ts" for _, s in gates if s for name, x in json.loads(s).items())
    return {"signal": signal, "score": len(gates),
            "escalation": sum(e for e, _ in gates), "decision": decided}


def test_page_shows_the_stream_the_timeline_and_an_explanation(server, tmp_path: Path):
    base, decisions, edge, path = server
    hot = [d for d in decisions if (d.tenant, d.key) == ("acme", "a")]
    assert [d.ts for d in hot] == [T0 + 10, T0 + 40] and all(d.tier == "edge" for d in hot)
    chosen = hot[1]
    url = f"{base}#key=a&tenant=acme&explain={chosen.decision_id}"
    page = Page()
    page.feed(_browse(url, "--dump-dom"))

    # the timeline: exactly one point per stored row of each kind, at the rows' times
    want = _expected(path, "acme", "a")
    assert want == {"signal": 120, "score": 60, "escalation": 2, "decision": 2}  # 60 events x {s, temp}
    kinds = {k: [p for p in page.points if p["data-kind"] == k] for k in want}
    assert {k: len(v) for k, v in kinds.items()} == want
    assert (page.svg["data-key"], page.svg["data-tenant"]) == ("a", "acme")
    ours = [e for e in events() if (e["t"], e["k"]) == ("acme", "a")]
    assert sorted((float(p["data-ts"]), p["data-field"], float(p["data-value"])) for p in kinds["signal"]) == \
        sorted([(e["ts"], f, float(e[f])) for e in ours for f in ("s", "temp")])
    assert sorted(float(p["data-ts"]) for p in kinds["escalation"]) == [T0 + 10, T0 + 40]
    assert sorted(p["data-decision-id"] for p in kinds["decision"]) == sorted(d.decision_id for d in hot)

    # the stream: every decision of the run, each once
    assert sorted(li["data-decision-id"] for li in page.stream) == sorted(d.decision_id for d in decisions)

    # the explain view: the prompt exactly as the engine received it
    sent = [r for r in edge.requests if r.request_id == chosen.decision_id]
    assert len(sent) == 1
    assert page.explain.get("data-decision-id") == chosen.decision_id and "hidden" not in page.explain
    assert page.prompt == sent[0].prefix + sent[0].tail

    shot = tmp_path / "ui.png"
    _browse(url, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


def test_stream_endpoint_is_live_and_rejects_bad_input(server):
    base, decisions, _, path = server
    seen = _get(base + "api/decisions?after=0")["decisions"]
    assert sorted(d["decision_id"] for d in seen) == sorted(d.decision_id for d in decisions)
    last = max(d["rowid"] for d in seen)
    assert _get(f"{base}api/decisions?after={last}")["decisions"] == []
    # another process appends while the page polls: the next poll past `last` has it, only it
    writer = TraceStore(path)
    d = msgspec.structs.replace(decisions[0], decision_id="live-1", ts=T0 + 99)
    writer.decision(d, Event(d.key, T0 + 99, {"s": 1.0}, SourcePos("f", 0, 999), tenant=d.tenant), None)
    writer.close()
    assert [x["decision_id"] for x in _get(f"{base}api/decisions?after={last}")["decisions"]] == ["live-1"]
    for bad, text in (("api/decisions?after=x", "after must be an integer, got 'x'"),
                      ("api/timeline", "timeline needs ?key=KEY (and &tenant=T for a tenant's key)")):
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + bad)
        assert e.value.code == 400 and json.loads(e.value.read())["error"] == text
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(base + "api/explain/nope")
    assert e.value.code == 404


def test_ui_refuses_a_missing_store(tmp_path: Path):
    r = runner.invoke(app, ["ui", "--store", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and "no trace store at" in r.output


def test_page_assets_load_nothing_from_elsewhere():
    files = sorted(p.name for p in STATIC.iterdir())
    assert files == ["app.js", "index.html", "style.css"]
    for p in STATIC.iterdir():
        text = p.read_text()
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"{p.name} names a remote URL"
        assert "@import" not in text and "url(" not in text, f"{p.name} loads a resource"
    html = (STATIC / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["style.css", "app.js"]


def _gate_row(store: TraceStore, payload: dict, tenant: str = "") -> dict | None:
    store.gate(Event("k", T0, payload, SourcePos("f", 0, 0), tenant=tenant), Verdict(0.1, False, []))
    store.flush()
    gates, _ = store.timeline("k", tenant)
    return gates[-1].signal or None


def test_signal_keeps_bounded_numeric_fields_after_the_privacy_policy(tmp_path: Path):
    db = TraceStore(tmp_path / "t.db")
    wide = {f"f{i}": i for i in range(40)}
    assert _gate_row(db, {"ts": T0, "x": 1.5, "n": 3, "b": True, "s": "9", "inf": float("inf"), **wide}) == \
        {"x": 1.5, "n": 3.0, **{f"f{i}": float(i) for i in range(SIGNAL_FIELDS - 2)}}
    assert _gate_row(db, {"s": "text"}) is None
    # with a privacy policy the worker withholds payloads: the signal is what the policy lets through
    db.keep_payloads = False
    assert _gate_row(db, {"temp": 23.7}) is None
    db.privacy = Privacy(default=Policy(fields=(FieldRule("temp", "coarsen", step=5.0), FieldRule("ssn", "drop"),
                                                FieldRule("acct", "mask"))))
    assert _gate_row(db, {"temp": 23.7, "ssn": 123456789, "acct": 42, "load": 0.5}) == {"temp": 20.0, "load": 0.5}
    (raw,) = db.db.execute("SELECT payload FROM gates ORDER BY block DESC, seq DESC LIMIT 1").fetchone()
    assert json.loads(raw) == {"temp": 20.0, "load": 0.5}  # what was withheld is not on disk either
    db.close()


def test_a_gate_row_keeps_a_small_payload_whole_and_a_large_ones_numbers(tmp_path: Path):
    db = TraceStore(tmp_path / "t.db")
    small = {"ts": T0, "site": "plant-2", "temp": 21.5, "ok": True}
    assert _gate_row(db, small) == {"temp": 21.5}
    large = {"line": "x" * ROW_BYTES, "temp": 21.5, "n": 2}
    assert _gate_row(db, large) == {"temp": 21.5, "n": 2.0}
    rows = [json.loads(r) for (r,) in db.db.execute("SELECT payload FROM gates ORDER BY block, seq")]
    assert rows == [small, {"temp": 21.5, "n": 2.0}]
    db.close()


def test_a_store_from_before_the_signal_gains_it(tmp_path: Path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE decisions (decision_id TEXT PRIMARY KEY, pipeline TEXT, key TEXT, tenant TEXT, ts REAL,
            wall REAL, tier TEXT, model TEXT, action TEXT, cost_usd REAL, decision BLOB, event BLOB, explanation BLOB);
        CREATE TABLE gates (key TEXT, tenant TEXT, ts REAL, wall REAL, score REAL, escalated INTEGER, reasons TEXT);
        INSERT INTO gates VALUES ('k', '', 1700000000.0, 1.0, 0.2, 0, '');""")
    old.close()
    assert TraceStore(path, readonly=True).timeline("k", "")[0][0].signal == {}
    db = TraceStore(path, max_age_s=1e12)
    assert _gate_row(db, {"v": 2}) == {"v": 2.0}
    gates, _ = db.timeline("k", "")
    assert [(g.ts, g.signal) for g in gates] == [(T0, {}), (T0, {"v": 2.0})]
    db.close()


def test_a_store_of_one_row_per_verdict_moves_into_blocks(tmp_path: Path):
    """Stores written before gate blocks (a `gates` table, one row per verdict) are moved into
    blocks when opened: their rows, scores, reasons and signals read back the same."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE decisions (decision_id TEXT PRIMARY KEY, pipeline TEXT, key TEXT, tenant TEXT, ts REAL,
            wall REAL, tier TEXT, model TEXT, action TEXT, cost_usd REAL, decision BLOB, event BLOB, explanation BLOB);
        CREATE TABLE gates (key TEXT, tenant TEXT, ts REAL, wall REAL, score REAL, escalated INTEGER, reasons TEXT,
            signal TEXT);""")
    old.executemany("INSERT INTO gates VALUES ('k', 'default', ?, 1.0, ?, ?, ?, ?)",
                    [(T0 + i, i / 10, int(i == 2), f"r{i}", json.dumps({"v": i}) if i else None) for i in range(4)])
    old.commit()
    old.close()
    db = TraceStore(path, max_age_s=1e12)
    gates, _ = db.timeline("k", "default")
    assert [(g.ts, g.score, g.escalated, g.reasons, g.signal) for g in gates] == \
        [(T0 + i, i / 10, i == 2, f"r{i}", {"v": float(i)} if i else {}) for i in range(4)]
    assert db.counts()["gates"] == 4
    assert [r[0] for r in db.db.execute("SELECT type FROM sqlite_master WHERE name = 'gates'")] == ["view"]
    db.close()

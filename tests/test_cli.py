"""The `ponder` command end to end: simulate → run → score, dead letters, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ponder.cli import app

runner = CliRunner()
PIPE = "ponder.pipelines.iot_monitor:pipeline"


def ponder(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sim")
    r = ponder("simulate", "--devices", "120", "--events-per-device", "400", "--seed", "3", "--out", str(d))
    assert r.returncode == 0, r.stderr
    return d


def test_simulate_writes_events_and_truth(sim: Path):
    truth = json.loads((sim / "truth.json").read_text())
    lines = (sim / "events.jsonl").read_text().splitlines()
    assert len(lines) == truth["events"] == 120 * 400
    assert {i["kind"] for i in truth["incidents"]} == {"spike", "drift", "stuck", "level_shift", "dropout"}


def test_simulate_run_score_reaches_recall(sim: Path, tmp_path: Path):
    out = tmp_path / "decisions.jsonl"
    r = ponder("run", PIPE, "--input", str(sim / "events.jsonl"), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "events=48000" in r.stderr and "dead_letters=0" in r.stderr
    r = ponder("score", "--truth", str(sim / "truth.json"), "--decisions", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["events"] == 48000
    assert s["decisions"] == len(out.read_text().splitlines())
    assert s["incident_recall"] >= 0.9
    assert s["false_alarms_per_1k_events"] <= 1.0
    assert s["escalations_per_1k_events"] == pytest.approx(s["decisions"] * 1000 / 48000)


def test_run_is_deterministic_and_replays_same_ids(sim: Path, tmp_path: Path):
    outs = []
    for i in range(2):
        out = tmp_path / f"d{i}.jsonl"
        assert ponder("run", PIPE, "--input", str(sim / "events.jsonl"), "--output", str(out)).returncode == 0
        outs.append(sorted((d["decision_id"], d["action"]) for d in map(json.loads, out.read_text().splitlines())))
    assert outs[0] == outs[1]


def test_bad_lines_become_dead_letters_and_the_run_goes_on(tmp_path: Path):
    good = [{"device_id": "d1", "ts": 1_700_000_000 + 10 * i, "temperature": 20.0 + (i % 3) * 0.1}
            for i in range(100)]
    lines = [json.dumps(g) for g in good]
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"device_id": "d1", "ts": 1_700_000_500, "temperature": "hot"}))
    lines.insert(30, json.dumps({"ts": 1_700_000_600, "temperature": 1.0}))
    lines.insert(40, json.dumps([1, 2, 3]))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    r = ponder("run", PIPE, "--input", str(inp), "--output", str(tmp_path / "out.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "events=104" in r.stderr and "dead_letters=4" in r.stderr
    dead = [json.loads(x) for x in (tmp_path / "out.jsonl.dead.jsonl").read_text().splitlines()]
    assert [d["source"][2] for d in dead] == [10, 20, 30, 40]
    assert "malformed" in dead[0]["reason"].lower() or "json" in dead[0]["reason"].lower()
    assert "temperature" in dead[1]["reason"]
    assert "device_id" in dead[2]["reason"]
    assert dead[3]["raw"] == "[1, 2, 3]"


def test_run_reads_stdin_and_csv(tmp_path: Path):
    rows = [{"device_id": f"d{i % 2}", "ts": 1_700_000_000 + i, "temperature": 20.0} for i in range(50)]
    r = ponder("run", PIPE, "--input", "-", "--output", str(tmp_path / "a.jsonl"),
               stdin="\n".join(json.dumps(x) for x in rows))
    assert r.returncode == 0 and "events=50" in r.stderr
    csv = tmp_path / "in.csv"
    csv.write_text("device_id,ts,temperature\n" + "".join(f"d{i % 2},{1_700_000_000 + i},20.5\n" for i in range(50))
                   + "d1,1700000099\n")
    r = ponder("run", PIPE, "--input", str(csv), "--output", str(tmp_path / "b.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "events=51" in r.stderr and "dead_letters=1" in r.stderr
    dead = json.loads((tmp_path / "b.jsonl.dead.jsonl").read_text())
    assert dead["source"] == ["in.csv", 0, 50, 0] and "expected 3 columns, got 2" in dead["reason"]


def test_clear_errors_for_bad_arguments(tmp_path: Path):
    r = runner.invoke(app, ["run", "no_such_module:pipeline", "--input", "-"])
    assert r.exit_code == 2 and "cannot import pipeline module 'no_such_module'" in r.output
    r = runner.invoke(app, ["run", "ponder.types:Event", "--input", "-"])
    assert r.exit_code != 0
    r = runner.invoke(app, ["run", PIPE, "--input", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["simulate", "--devices", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "devices" in r.output
    r = runner.invoke(app, ["score", "--truth", str(tmp_path / "t.json"), "--decisions", str(tmp_path / "d")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_serve_model_refuses_a_bad_api_key_before_loading(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")  # never read: the key is checked first
    r = runner.invoke(app, ["serve-model", str(tmp_path), "--api-key", "good", "--api-key", "has space"])
    assert r.exit_code == 2
    assert "API key #2 is empty or holds whitespace or control characters" in " ".join(r.output.split())



def test_serve_model_refuses_bad_engine_options_before_loading(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")  # never read: the options are refused first
    r = runner.invoke(app, ["serve-model", str(tmp_path), "--host-kv", "fp8"])
    assert r.exit_code == 2 and "--host-kv must be one of int8, int4, none, not 'fp8'" in r.output
    r = runner.invoke(app, ["serve-model", str(tmp_path), "--near-identical", "300"])
    assert r.exit_code == 2 and "--near-identical must be grey levels in 0..255, not 300" in r.output

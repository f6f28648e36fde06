"""The README's pipeline is complete and runs as shown; its set-up holds exactly two commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_setup_has_exactly_two_commands():
    setup = README.read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    cmds = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert [c.strip() for c in cmds] == [
        "pip install -e '.[jax]' && ponder demo",
        "pip install -e '.[test]' && pip install --no-deps 'faust-streaming>=0.15.3' 'mode-streaming>=0.7.1' && python -m pytest -q",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pip install --no-deps 'faust-streaming>=0.15.3' 'mode-streaming>=0.7.1' && python -m pytest -q" in ci


def test_readme_pipeline_runs(tmp_path: Path):
    code = _blocks("python")[0]
    assert len(code.strip().splitlines()) <= 30
    (tmp_path / "pumps.py").write_text(code)
    rows = []
    for i in range(300):
        flow = 12.0 + 0.1 * (i % 7)
        pressure = 3.0 + 0.01 * (i % 5) + (4.0 if i >= 200 else 0.0)
        if i == 150:
            flow = 0.0
        rows.append({"pump_id": f"p{i % 3}", "ts": 1_700_000_000 + i, "flow": flow, "pressure": pressure})
    rows.insert(50, {"pump_id": "p1", "ts": "not a time", "flow": 1.0})
    (tmp_path / "readings.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "run", "pumps:pipeline", "--input",
                        "readings.jsonl", "--output", "decisions.jsonl"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "events=301" in r.stderr and "dead_letters=1" in r.stderr
    decisions = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    stops = [d for d in decisions if d["action"] == "stop_pump"]
    assert [(d["key"], d["ts"]) for d in stops] == [("p0", 1_700_000_150.0)]
    # the pressure step at i=200 (every pump) is noticed on each pump
    assert {d["key"] for d in decisions if d["ts"] >= 1_700_000_200 and d["action"] == "alert"} == {"p0", "p1", "p2"}
    dead = [json.loads(x) for x in (tmp_path / "decisions.jsonl.dead.jsonl").read_text().splitlines()]
    assert len(dead) == 1 and dead[0]["source"] == ["readings.jsonl", 0, 50, 0]
    assert "time field 'ts'" in dead[0]["reason"]

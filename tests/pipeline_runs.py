"""`ponder run` over a pipeline module a test writes: what the explain and page tests share."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from ponder.cli import app
from ponder.types import Decision


def run_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str,
               events: list[dict]) -> tuple[list[Decision], object, Path]:
    """Write `source` as module `name` in `tmp_path`, `ponder run` its `pipeline` over `events`
    -> (the decisions, the module's `edge` engine, the run's trace store)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    inp, out = tmp_path / "events.jsonl", tmp_path / "decisions.jsonl"
    inp.write_text("".join(json.dumps(e) + "\n" for e in events))
    r = CliRunner().invoke(app, ["run", f"{name}:pipeline", "--input", str(inp), "--output", str(out)])
    assert r.exit_code == 0, r.output
    decisions = [msgspec.json.decode(line, type=Decision) for line in out.read_text().splitlines()]
    return decisions, sys.modules[name].edge, Path(str(out) + ".traces.db")

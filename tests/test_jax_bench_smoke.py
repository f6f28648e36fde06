"""The JAX engine benchmark runs end to end on tiny shapes and reports what it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "jax_engine.py"


def test_quick_run_writes_every_measure(tmp_path):
    spec = importlib.util.spec_from_file_location("jax_engine_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "j.json"
    mod.main(["--quick", "--out", str(out), "--quiet"])
    data = json.loads(out.read_text())
    text = json.dumps(data)
    for word in ("append", "decode", "recompiles"):
        assert word in text, f"{word!r} missing from the benchmark JSON"
    assert data["recompiles_after_warmup"] == 0

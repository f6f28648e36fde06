"""The gate on NAB: the targets, and the results files NAB's scorer reads."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest

from ponder.evaluate.nab import HEADER, NabReport, format_report, run_nab

# The NAB subset ships with the repository (benchmarks/data/nab, MIT, its LICENSE.txt beside it),
# so a fresh clone runs these tests; PONDER_NAB_DATA points them at another copy.
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PONDER_NAB_DATA") or ROOT / "benchmarks" / "data" / "nab")
BENCH = ROOT / "benchmarks" / "nab_gate.py"

@pytest.fixture(scope="module")
def nab(tmp_path_factory: pytest.TempPathFactory) -> tuple[NabReport, Path]:
    # missing data is a failure, not a skip: these tests are the gate's targets
    assert (DATA / "data").is_dir(), f"no NAB data at {DATA}: set PONDER_NAB_DATA"
    out = tmp_path_factory.mktemp("nab")
    return run_nab(DATA, out), out


def _csvs() -> list[Path]:
    return sorted((DATA / "data").rglob("*.csv"))


def test_targets(nab: tuple[NabReport, Path]) -> None:
    report, _ = nab
    t = report.totals
    assert t.windows == 25 and t.events == sum(f.events for f in report.files)
    assert t.window_recall >= 0.95, format_report(report)
    assert t.escalation_rate <= 0.05, format_report(report)
    # Anomaly-free series: at most the very first daily rise of each of the three periodic ones
    # (art_daily_no_noise, _perfect_square_wave, _small_noise) escalates. Nothing is known
    # about the field yet, and a jump from a flat 20 to 80 is exactly what the gate is for;
    # it falls in NAB's probationary period (the first 15% of a file), which NAB's own
    # scorer ignores. After it, nothing.
    clean = [f for f in report.files if f.labelled and f.windows == 0]
    assert len(clean) == 5
    assert t.no_anomaly_escalations <= 3 and all(f.escalations <= 1 for f in clean)
    assert t.no_anomaly_after_probation == 0
    for f in report.files:
        assert f.escalation_rate <= 0.05, f


def test_results_files(nab: tuple[NabReport, Path]) -> None:
    report, out = nab
    windows = json.loads((DATA / "combined_windows.json").read_text())
    by_file = {f.file: f for f in report.files}
    assert sorted(by_file) == sorted(f"{p.parent.name}/{p.name}" for p in _csvs())
    for src in _csvs():
        key = f"{src.parent.name}/{src.name}"
        dest = out / "ponder" / src.parent.name / f"ponder_{src.name}"
        with src.open(newline="") as fh:
            rows_in = list(csv.reader(fh))[1:]
        with dest.open(newline="") as fh:
            reader = csv.reader(fh)
            assert next(reader) == list(HEADER) == [
                "timestamp", "value", "anomaly_score", "label", "escalated"]
            rows = list(reader)
        assert len(rows) == len(rows_in)
        spans = [(datetime.strptime(a, "%Y-%m-%d %H:%M:%S.%f"),
                  datetime.strptime(b, "%Y-%m-%d %H:%M:%S.%f")) for a, b in windows[key]]
        escalated = 0
        for (ts, value, score, label, esc), (ts_in, value_in) in zip(rows, rows_in):
            assert ts == ts_in
            assert float(value) == float(value_in)
            assert 0.0 <= float(score) <= 1.0
            t = datetime.strptime(ts, "%Y-%m-%d %H:%M:%S")
            assert label == ("1" if any(a <= t <= b for a, b in spans) else "0")
            assert esc in ("0", "1")
            escalated += esc == "1"
            # the score is the verdict's surprise: an escalation reaches the gate's `open`,
            # every other row stays under it, however high its findings score
            if esc == "1":
                assert float(score) >= 0.5
            else:
                assert float(score) <= 0.4995
        assert escalated == by_file[key].escalations


def test_layouts_and_missing_labels(tmp_path: Path) -> None:
    """CSVs right under the folder or under `data/`; labels optional, found up to 2 levels up."""
    rows = ["timestamp,value"] + [f"2020-01-01 {h:02d}:{m:02d}:00,{10 + (m % 3)}"
                                  for h in range(24) for m in range(0, 60, 5)]
    rows[200] = rows[200].rsplit(",", 1)[0] + ",500"
    flat = tmp_path / "flat" / "grp"
    flat.mkdir(parents=True)
    (flat / "s.csv").write_text("\n".join(rows) + "\n")
    report = run_nab(tmp_path / "flat", tmp_path / "out1")
    assert [f.file for f in report.files] == ["grp/s.csv"]
    f = report.files[0]
    assert (f.events, f.windows, f.labelled) == (288, 0, False)
    assert f.escalations == 1  # the spike at row 200
    assert report.totals.no_anomaly_escalations == 0  # not labelled anomaly-free either
    out_rows = list(csv.reader((tmp_path / "out1/ponder/grp/ponder_s.csv").open()))
    assert {r[3] for r in out_rows[1:]} == {"0"}
    assert out_rows[200][4] == "1"

    nested = tmp_path / "nab" / "data" / "grp"
    nested.mkdir(parents=True)
    (nested / "s.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "combined_windows.json").write_text(json.dumps(
        {"grp/s.csv": [["2020-01-01 16:00:00.000000", "2020-01-01 17:00:00.000000"]]}))
    report = run_nab(tmp_path / "nab", tmp_path / "out2")
    f = report.files[0]
    assert (f.windows, f.windows_hit, f.labelled) == (1, 1, True)  # row 200 is 16:35
    labels = [r[3] for r in csv.reader((tmp_path / "out2/ponder/grp/ponder_s.csv").open())][1:]
    assert labels.count("1") == 13  # 16:00 .. 17:00 inclusive, every 5 minutes
    text = format_report(report)
    assert "grp/s.csv" in text and "window recall 100.0% (1/1)" in text


def test_not_nab(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("when,what\n1,2\n")
    with pytest.raises(ValueError, match="not a NAB series"):
        run_nab(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory"):
        run_nab(tmp_path / "missing", tmp_path / "out")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_nab_gate", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_data_path(bench: ModuleType, tmp_path: Path) -> None:
    """The default data is the subset in the repository; results record it repo-relative."""
    assert bench.DATA == ROOT / "benchmarks" / "data" / "nab"
    assert (bench.DATA / "LICENSE.txt").read_text().startswith("Copyright 2014-2024 Numenta")
    assert bench._shown(bench.DATA) == "benchmarks/data/nab"
    assert bench._shown(ROOT / "benchmarks" / ".." / "benchmarks" / "data") == "benchmarks/data"
    assert bench._shown(tmp_path) == str(tmp_path)  # outside the repository: as given


def test_benchmark_json(tmp_path: Path, nab: tuple[NabReport, Path], bench: ModuleType) -> None:
    mod = bench
    out = tmp_path / "nab_gate.json"
    result = mod.main(["--data", str(DATA), "--out", str(out), "--no-sim", "--quiet"])
    data = json.loads(out.read_text())
    assert data == result
    report, _ = nab
    gate, base = data["gate"], data["baseline"]
    assert gate["totals"]["escalations"] == report.totals.escalations
    assert gate["totals"]["windows_hit"] == report.totals.windows_hit
    assert set(gate["files"]) == set(base["files"]) == {f.file for f in report.files}
    assert data["meets_targets"] is True
    assert data["ratio"]["escalations"] == round(
        base["totals"]["escalations"] / gate["totals"]["escalations"], 3)
    assert "| **total** |" in mod.markdown(data)

"""The benchmark scripts run end to end at tiny sizes and write well-formed, consistent JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def throughput(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("bench") / "runtime_throughput.json"
    result = _load("runtime_throughput").main(
        ["--events", "20000", "--repeat", "1", "--out", str(out), "--quiet"])
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("bench") / "context_size.json"
    result = _load("context_size").main(
        ["--sizes", "1000", "10000", "--keys", "1", "--no-bpe", "--out", str(out), "--quiet"])
    return result, json.loads(out.read_text())


def test_throughput_json(throughput: tuple[dict, dict]) -> None:
    result, data = throughput
    assert data == json.loads(json.dumps(result))
    for k in ("timestamp", "python", "cpu_count", "events", "escalations", "decisions",
              "overhead_ratio", "framework", "baseline"):
        assert k in data, k
    fw, bl = data["framework"], data["baseline"]
    assert data["events"] == fw["events"] == bl["events"] == 20_000
    for k in ("escalations", "decisions", "dead_letters", "by_action"):
        assert fw[k] == bl[k], k
    assert fw["decisions"] == fw["escalations"] > 0  # the reflex tier answers every escalation
    assert sum(fw["by_action"].values()) == fw["decisions"]
    assert fw["events_per_s"] > 0 and bl["events_per_s"] > 0
    assert data["overhead_ratio"] > 0 and len(data["overhead_ratios"]) == data["repeat"] == 1


def test_context_json(context: tuple[dict, dict]) -> None:
    result, data = context
    assert data == json.loads(json.dumps(result))
    small, large = data["sizes"]
    assert (small["events_per_key"], large["events_per_key"]) == (1000, 10000)
    for s in (small, large):
        for k in ("keystate_bytes", "context_bytes", "rendered_tokens", "raw_tokens",
                  "compression_ratio", "compactions", "prefix_stability",
                  "new_prefix_chars_per_event", "prompt_chars_per_event"):
            assert s[k] > 0, k
        assert s["context_bytes"] < s["keystate_bytes"]
        # the prefix changes only when the context compacts
        assert s["breaks_without_compaction"] == 0
        assert s["prefix_stability"] == s["expected_stability"]
        assert s["new_prefix_chars_per_event"] < s["prompt_chars_per_event"] / 2
    # bounded context: the prompt does not grow with history, the raw history does
    assert large["rendered_tokens"] <= small["rendered_tokens"] * 1.2
    assert large["context_bytes"] <= 1.5 * small["context_bytes"]
    assert large["raw_tokens"] > 5 * small["raw_tokens"]
    assert large["compactions"] > small["compactions"]
    assert data["flat"]["ok"] is True
    # the prefix changes once per compaction: about 1 - 1/(window/2) of steps extend it
    assert all(s["prefix_stability"] > 0.9 for s in data["sizes"])


def test_edge_pipeline_benchmark_runs_and_agrees(tmp_path: Path) -> None:
    """The edge-tier benchmark at a tiny size: every set-up makes the same decisions, all from
    the edge model, and only the session set-up serves prompt tokens from cache."""
    out = tmp_path / "edge_pipeline.json"
    result = _load("edge_pipeline").main(
        ["--devices", "3", "--events-per-device", "60", "--review", "8", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["same_decisions_in_every_setup"] is True
    runs = {r["setup"]: r for r in data["runs"]}
    assert set(runs) == {"ponder", "no session reuse", "no batching", "no speculation"}
    assert data["same_answers_with_and_without_speculation"] is True  # greedy: the same text
    decided = {r["edge_decisions"] for r in runs.values()}
    assert len(decided) == 1 and decided.pop() > 3
    assert all(r["degraded"] == 0 and r["dead_letters"] == 0 for r in runs.values())
    assert runs["no session reuse"]["cached_prompt_tokens"] == 0
    assert runs["ponder"]["cached_prompt_tokens"] > 0
    assert runs["ponder"]["prompt_tokens"] == runs["no session reuse"]["prompt_tokens"]


def test_memory_benchmark_runs_both_configurations(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "memory_bound.json"
    monkeypatch.setattr(sys, "argv", ["memory_bound.py", "--keys", "3000", "--events-per-key", "2",
                                      "--bound", "200", "--out", str(out)])
    _load("memory_bound").main()
    r = json.loads(out.read_text())
    assert r["events"] == 6000 and r["max_hot_keys"] == 200
    for run in ("bounded", "unbounded"):
        assert r[run]["events"] == 6000 and "keys=3000 " in r[run]["summary"]
        assert r[run]["events_per_s"] > 0 and r[run]["peak_rss_mb"] > 0
    assert r["throughput_ratio"] == round(r["bounded"]["events_per_s"] / r["unbounded"]["events_per_s"], 3)


# -- the edge engine's benchmarks at their --quick sizes ---------------------------------------------


def test_speculation_quick_is_identical_to_plain_and_compiles_nothing(tmp_path: Path) -> None:
    out = tmp_path / "speculation.json"
    assert _load("speculation").main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for rows in data["settings"].values() for r in rows]
    assert {r["mode"] for r in rows} == {"plain", "fixed", "adaptive", "forced_only"}
    assert all(r["same_as_plain"] for r in rows if r["mode"] != "plain")
    assert all(r["recompiles"] == 0 for r in rows)
    assert any(r["mode"] == "adaptive" and r["tokens_per_step"] > 1 for r in rows)


def test_kv_quant_quick_holds_more_sessions_with_the_same_greedy_token(tmp_path: Path) -> None:
    out = tmp_path / "kv_quant.json"
    _load("kv_quant").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for run in data["runs"]:
        kv = run["host_kv"]
        assert kv["none"]["max_abs_logit_error"] == 0.0
        assert all(kv[f]["same_greedy_token"] for f in ("none", "int8", "int4"))
        assert kv["none"]["sessions_per_gb"] < kv["int8"]["sessions_per_gb"] < kv["int4"]["sessions_per_gb"]


def test_camera_frames_quick_encodes_each_distinct_frame_once(tmp_path: Path) -> None:
    out = tmp_path / "camera_frames.json"
    _load("camera_frames").main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    clean = data["runs"]["clean"]
    distinct = data["stream"]["distinct_frames_per_key"]["clean"]
    assert clean["reencode"]["frames_encoded"] == clean["reencode"]["frames"] == data["stream"]["frames"]
    assert clean["reuse"]["frames_encoded"] == distinct < data["stream"]["frames"]
    assert clean["reuse"]["cached_tokens"] == clean["reencode"]["cached_tokens"]

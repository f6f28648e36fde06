"""Scoring decisions against truth: detection windows, grace edges, quiet actions, rates."""

from __future__ import annotations

import msgspec
import pytest

from ponder.evaluate.truth import Score, score
from ponder.simulate import Fleet
from ponder.types import Decision, Usage

TRUTH = {
    "seed": 0,
    "devices": 3,
    "events_per_device": 1000,
    "events": 2000,
    "interval_s": 10.0,  # grace defaults to 30 s
    "incidents": [
        {"key": "c", "kind": "spike", "field": "temperature", "start": 50.0, "end": 60.0},
        {"key": "a", "kind": "spike", "field": "temperature", "start": 100.0, "end": 100.0},
        {"key": "b", "kind": "stuck", "field": "humidity", "start": 500.0, "end": 900.0},
        {"key": "a", "kind": "drift", "field": "pressure", "start": 1000.0, "end": 2000.0},
    ],
}


def dec(key: str, ts: float, action: str = "alert") -> Decision:
    return Decision(
        decision_id=f"{key}@{ts}", key=key, action=action, severity="high", reason="r",
        confidence=0.9, tier="reflex", model="rules", usage=Usage(), latency_ms=0.1,
        degraded=False, evidence={}, ts=ts,
    )


DECISIONS = [
    dec("a", 99.999),  # before the spike: false
    dec("a", 100.0),  # detects the spike
    dec("a", 130.0),  # end + grace, inclusive: inside, not false
    dec("a", 130.001),  # just past grace: false
    dec("b", 600.0, "none"),  # quiet: neither detection nor false alarm
    dec("b", 700.0, "log"),  # an alarm unless "log" is quiet
    dec("a", 1500.0),  # detects the drift
    dec("z", 100.0),  # a key with no incidents: false
]


def test_hand_built_exact_numbers():
    s = score(TRUTH, DECISIONS)
    assert isinstance(s, Score)
    assert (s.incidents, s.detected, s.false_alarms, s.decisions, s.events) == (4, 3, 3, 8, 2000)
    assert s.incident_recall == 0.75
    assert s.false_alarms_per_1k_events == 1.5
    assert s.escalations_per_1k_events == 4.0
    assert s.by_kind == {
        "drift": {"incidents": 1, "detected": 1, "recall": 1.0},
        "spike": {"incidents": 2, "detected": 1, "recall": 0.5},
        "stuck": {"incidents": 1, "detected": 1, "recall": 1.0},
    }
    assert s.mean_detection_delay_s == pytest.approx((0.0 + 200.0 + 500.0) / 3)


def test_custom_quiet_actions():
    s = score(TRUTH, DECISIONS, quiet_actions=frozenset({"none", "log"}))
    assert (s.detected, s.false_alarms, s.decisions) == (2, 3, 8)
    assert s.by_kind["stuck"] == {"incidents": 1, "detected": 0, "recall": 0.0}


def test_grace_edges():
    s = score(TRUTH, DECISIONS, grace_s=0.0)
    assert (s.detected, s.false_alarms) == (3, 4)  # 130.0 now falls outside
    s = score(TRUTH, [dec("c", 90.0)])
    assert (s.detected, s.false_alarms) == (1, 0)  # exactly end + default grace
    s = score(TRUTH, [dec("c", 90.5)])
    assert (s.detected, s.false_alarms) == (0, 1)
    s = score(TRUTH, [dec("c", 90.5)], grace_s=31.0)
    assert (s.detected, s.false_alarms) == (1, 0)
    with pytest.raises(ValueError, match="grace_s must be >= 0"):
        score(TRUTH, [], grace_s=-1.0)


def test_one_alarm_detects_overlapping_windows():
    truth = {"events": 100, "interval_s": 10.0, "incidents": [
        {"key": "k", "kind": "spike", "field": "f", "start": 0.0, "end": 10.0},
        {"key": "k", "kind": "level_shift", "field": "f", "start": 20.0, "end": 200.0},
        {"key": "k", "kind": "stuck", "field": "f", "start": 300.0, "end": 310.0},
    ]}
    s = score(truth, [dec("k", 25.0)])  # inside the first's grace and the second's window
    assert (s.detected, s.false_alarms) == (2, 0)
    s = score(truth, [dec("k", 250.0)])  # between windows, past every grace
    assert (s.detected, s.false_alarms) == (0, 1)


def test_no_incidents_no_events():
    s = score({"events": 0, "interval_s": 1.0, "incidents": []}, [dec("a", 1.0, "none")])
    assert s.incident_recall == 1.0 and s.by_kind == {} and s.mean_detection_delay_s is None
    assert s.false_alarms_per_1k_events == 0.0 and s.escalations_per_1k_events == 0.0
    assert s.decisions == 1


def test_paths(tmp_path):
    truth_path = tmp_path / "truth.json"
    truth_path.write_bytes(msgspec.json.encode(TRUTH))
    dec_path = tmp_path / "decisions.jsonl"
    enc = msgspec.json.Encoder()
    dec_path.write_bytes(enc.encode_lines(DECISIONS[:4]) + b"\n" + enc.encode_lines(DECISIONS[4:]))
    assert score(truth_path, dec_path) == score(TRUTH, DECISIONS)
    assert score(str(truth_path), str(dec_path)) == score(TRUTH, iter(DECISIONS))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(enc.encode_lines(DECISIONS[:1]) + b'{"key": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a Decision"):
        score(TRUTH, bad)


def test_against_simulator_truth():
    fleet = Fleet(30, 400, 3, incident_rate=0.8)
    truth = fleet.truth()
    perfect = [dec(i.key, i.start + 5.0) for i in fleet.incidents]
    quiet = [dec(e["device_id"], e["ts"], "none") for _, e in zip(range(500), fleet.iter_events())]
    s = score(truth, perfect + quiet)
    assert s.incidents == len(fleet.incidents) > 0
    assert (s.incident_recall, s.false_alarms) == (1.0, 0)
    assert s.events == 12_000
    assert s.escalations_per_1k_events == pytest.approx((len(perfect) + 500) * 1000 / 12_000)
    assert sum(k["incidents"] for k in s.by_kind.values()) == s.incidents

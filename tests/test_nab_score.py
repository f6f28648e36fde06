"""The in-process NAB score equals Numenta's scorer (numenta/NAB's `run.py`, run on the
same results files when these numbers were recorded), and its threshold path is NAB's."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ponder.connectors.files import nab_key, read_nab
from ponder.evaluate.nab import find_series, group_scores, load_windows
from ponder.evaluate.nabscore import PROFILES, Series, nab_score

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "nab"

# nab-score's output (2 decimals) for the two detectors below over the shipped subset
OFFICIAL = {
    "rnd": {"standard": 9.71, "reward_low_FP_rate": 2.97, "reward_low_FN_rate": 23.20},
    "early": {"standard": 93.08, "reward_low_FP_rate": 93.08, "reward_low_FN_rate": 95.38},
}


def _detectors() -> dict[str, dict[str, Series]]:
    """Two seeded detectors: uniform noise, and noise under 0.8 with a 0.9 a third into each
    window, a 0.95 halfway, and a rare 0.92 anywhere (false positives)."""
    root, paths = find_series(DATA)
    wins = load_windows(DATA)
    out: dict[str, dict[str, Series]] = {"rnd": {}, "early": {}}
    for p in paths:
        key = nab_key(p, root)
        _, ts, _ = read_nab(p)
        rnd = random.Random(key)  # a str seed is hashed with sha512: the same on every run
        r = [round(rnd.random(), 4) for _ in ts]
        e = [round(0.8 * rnd.random(), 4) if rnd.random() > 0.0005 else 0.92 for _ in ts]
        for a, b in wins.get(key, []):
            i, j = ts.index(a), ts.index(b)
            e[i + (j - i) // 3] = 0.9
            e[i + (j - i) // 2] = 0.95
        out["rnd"][key] = Series(ts, r, wins.get(key, []))
        out["early"][key] = Series(ts, e, wins.get(key, []))
    return out


def test_scores_equal_numentas_scorer_on_the_same_results():
    for name, series in _detectors().items():
        got = {p: nab_score(series, p).normalized for p in PROFILES}
        assert got == pytest.approx(OFFICIAL[name], abs=0.005), name


def test_a_given_threshold_scores_as_nab_scores_a_file():
    ts = [float(i) for i in range(100)]
    scores = [0.0] * 100
    scores[50], scores[20] = 0.9, 0.8  # the window's first row; a false positive before any window
    s = {"f": Series(ts, scores, [(50.0, 59.0)])}
    best = nab_score(s)
    assert (best.threshold, best.raw, best.normalized, best.tp, best.fp) == (0.9, 1.0, 100.0, 1, 0)
    low = nab_score(s, threshold=0.8)  # the false positive costs fpWeight 0.11
    assert (low.raw, low.fp) == (pytest.approx(0.89), 1)
    assert low.normalized == pytest.approx(100 * (0.89 + 1) / 2)
    # a threshold between scores takes the row of the lowest threshold above it, as NAB does
    assert nab_score(s, threshold=0.85).raw == 1.0
    assert nab_score(s, "reward_low_FP_rate", threshold=0.8).raw == pytest.approx(0.78)
    # nothing over the threshold: every window missed, the null detector's score
    assert nab_score(s, threshold=0.95).normalized == 0.0


def test_leave_one_group_out_uses_the_other_groups_threshold():
    a = Series([float(i) for i in range(100)], [0.0] * 50 + [0.6] + [0.0] * 49, [(50.0, 59.0)])
    b = Series([float(i) for i in range(100)], [0.0] * 30 + [0.7] + [0.0] * 19 + [0.9] + [0.0] * 49,
               [(50.0, 59.0)])
    rows = group_scores({"g1/a.csv": a, "g2/b.csv": b})
    assert rows["g1"]["score"] == 100.0 and rows["g1"]["logo_threshold"] == 0.9
    assert rows["g1"]["logo_score"] == 0.0  # g2's threshold 0.9 misses g1's 0.6
    assert rows["g2"]["logo_threshold"] == 0.6 and rows["g2"]["logo_fp"] == 1


def test_bad_input_is_refused_with_its_reason():
    s = Series([0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [(0.5, 2.0)])
    with pytest.raises(ValueError, match=r"f: window \(0.5, 2.0\) does not start and end at row times"):
        nab_score({"f": s})
    with pytest.raises(ValueError, match="f: 3 times but 2 scores"):
        nab_score({"f": Series([0.0, 1.0, 2.0], [0.0, 0.0], [])})
    with pytest.raises(ValueError, match="unknown NAB profile 'strict'"):
        nab_score({"f": s}, "strict")

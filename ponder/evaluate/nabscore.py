"""The NAB score, computed in process the way Numenta's scorer computes it.

NAB's runner (numenta/NAB) optimises one threshold per detector and profile over the whole
corpus, scores each file at it, sums, and normalises so that the null detector scores 0 and a
perfect one 100. The per-row arithmetic is NAB's own sweeper, copied unchanged
(`nab_sweeper.py`); this module only does the runner's bookkeeping, without pandas. Its
results equal Numenta's scorer (numenta/NAB `run.py`, pandas) on the same results files
(`tests/test_nab_score.py`).

A threshold can also be given: leave-one-group-out picks it on the other groups and scores the
held-out group at it (`benchmarks/nab_gate.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from ponder.evaluate.nab_sweeper import Sweeper

__all__ = ["PROFILES", "NabScore", "Series", "nab_score"]

# NAB's config/profiles.json: weights of true positives, false negatives and false positives
PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0},
}
PROBATION = 0.15


class Series(msgspec.Struct, frozen=True):
    """One file's rows: times (epoch seconds, ascending), anomaly scores in [0, 1], and its
    labelled windows as (start, end) row times."""

    ts: Sequence[float]
    scores: Sequence[float]
    windows: Sequence[tuple[float, float]]


class NabScore(msgspec.Struct, frozen=True):
    profile: str
    threshold: float
    raw: float  # the summed sweep score at the threshold
    normalized: float  # 100 * (raw - null) / (perfect - null); nan without windows
    tp: int
    fp: int  # rows at or over the threshold outside every window (after probation)
    windows: int


def nab_score(series: Mapping[str, Series], profile: str = "standard",
              threshold: float | None = None) -> NabScore:
    """The corpus's NAB score under `profile`: at `threshold`, or at the one that maximises
    it (NAB's optimiser: every distinct score is a candidate)."""
    if profile not in PROFILES:
        msg = f"unknown NAB profile {profile!r}; one of {', '.join(PROFILES)}"
        raise ValueError(msg)
    sweeper = Sweeper(probationPercent=PROBATION, costMatrix=PROFILES[profile])
    rows = []
    windows = 0
    for name, s in series.items():
        if len(s.ts) != len(s.scores):
            msg = f"{name}: {len(s.ts)} times but {len(s.scores)} scores"
            raise ValueError(msg)
        ts = list(s.ts)
        present = set(ts)
        for lo, hi in s.windows:
            if lo not in present or hi not in present:
                msg = f"{name}: window ({lo}, {hi}) does not start and end at row times"
                raise ValueError(msg)
        windows += len(s.windows)
        rows.extend(sweeper.calcSweepScore(ts, list(s.scores), [tuple(w) for w in s.windows], name))
    by_threshold = sweeper.calcScoreByThreshold(rows)
    if threshold is None:
        best = max(by_threshold, key=lambda t: t.score)  # the first of equals, as NAB's optimiser
    else:
        # NAB's scoreDataSet: the row of this threshold, or of the lowest one above it
        best, prev = by_threshold[-1], None
        for t in by_threshold:
            if t.threshold == threshold:
                best = t
                break
            if t.threshold < threshold:
                best = prev if prev is not None else t
                break
            prev = t
    w = PROFILES[profile]
    null, perfect = -w["fnWeight"] * windows, w["tpWeight"] * windows
    normalized = 100.0 * (best.score - null) / (perfect - null) if windows else float("nan")
    return NabScore(profile, float(best.threshold), float(best.score), normalized, best.tp, best.fp, windows)

"""Score decisions against a simulator's truth: incident recall, false alarms, escalation rate.

An alarm is a decision whose action is not quiet. It detects every incident of its key whose
window `[start, end + grace]` holds its ts; an alarm inside no window is a false alarm.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from ponder.types import Decision

__all__ = ["Score", "score", "read_decisions"]


class Score(msgspec.Struct, frozen=True):
    """How a run's decisions compare with the truth; rates are per 1000 input events."""

    incident_recall: float
    false_alarms_per_1k_events: float
    escalations_per_1k_events: float
    decisions: int
    events: int
    incidents: int
    detected: int
    false_alarms: int
    by_kind: dict[str, dict]
    mean_detection_delay_s: float | None = None  # first alarm minus start, over detected ones


def read_decisions(path: str | os.PathLike[str]) -> Iterator[Decision]:
    """Yield the decisions of a JSONL file, one per non-blank line."""
    dec = msgspec.json.Decoder(Decision)
    with Path(path).open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield dec.decode(line)
            except msgspec.DecodeError as e:
                msg = f"{path}:{n}: not a Decision: {e}"
                raise ValueError(msg) from e


def _load_truth(truth: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(truth, dict):
        return truth
    return msgspec.json.decode(Path(truth).read_bytes())


class _Windows:
    """One key's incident windows, sorted by start, with a running max of their ends so a
    lookup can stop scanning back as soon as no earlier window can reach the ts."""

    def __init__(self, items: list[tuple[float, float, int]]) -> None:
        items.sort()
        self.starts = [s for s, _, _ in items]
        self.ends = [e for _, e, _ in items]
        self.ids = [i for _, _, i in items]
        reach, running = [], float("-inf")
        for e in self.ends:
            running = max(running, e)
            reach.append(running)
        self.reach = reach

    def hits(self, ts: float) -> list[int]:
        out = []
        k = bisect_right(self.starts, ts) - 1
        while k >= 0 and self.reach[k] >= ts:
            if self.ends[k] >= ts:
                out.append(self.ids[k])
            k -= 1
        return out


def score(truth: dict[str, Any] | str | os.PathLike[str],
          decisions: Iterable[Decision] | str | os.PathLike[str], *,
          quiet_actions: frozenset[str] = frozenset({"none"}),
          grace_s: float | None = None) -> Score:
    """Score `decisions` against `truth` (a truth dict, or the path of a truth.json)."""
    t = _load_truth(truth)
    events = int(t["events"])
    incs = t["incidents"]
    grace = 3.0 * float(t["interval_s"]) if grace_s is None else float(grace_s)
    if grace < 0:
        msg = f"grace_s must be >= 0, got {grace}"
        raise ValueError(msg)
    per_key: dict[str, list[tuple[float, float, int]]] = {}
    for i, inc in enumerate(incs):
        per_key.setdefault(inc["key"], []).append((inc["start"], inc["end"] + grace, i))
    windows = {k: _Windows(v) for k, v in per_key.items()}

    if isinstance(decisions, (str, os.PathLike)):
        decisions = read_decisions(decisions)
    first_alarm: dict[int, float] = {}
    n_decisions = false_alarms = 0
    for d in decisions:
        n_decisions += 1
        if d.action in quiet_actions:
            continue
        w = windows.get(d.key)
        hit = w.hits(d.ts) if w is not None else []
        if not hit:
            false_alarms += 1
        for i in hit:
            if d.ts < first_alarm.get(i, float("inf")):
                first_alarm[i] = d.ts

    by_kind: dict[str, dict] = {}
    for i, inc in enumerate(incs):
        k = by_kind.setdefault(inc["kind"], {"incidents": 0, "detected": 0, "recall": 1.0})
        k["incidents"] += 1
        k["detected"] += i in first_alarm
    for k in by_kind.values():
        k["recall"] = k["detected"] / k["incidents"]
    by_kind = dict(sorted(by_kind.items()))

    detected = len(first_alarm)
    delays = [first_alarm[i] - incs[i]["start"] for i in first_alarm]
    per_1k = 1000.0 / events if events else 0.0
    return Score(
        incident_recall=detected / len(incs) if incs else 1.0,
        false_alarms_per_1k_events=false_alarms * per_1k,
        escalations_per_1k_events=n_decisions * per_1k,
        decisions=n_decisions,
        events=events,
        incidents=len(incs),
        detected=detected,
        false_alarms=false_alarms,
        by_kind=by_kind,
        mean_detection_delay_s=sum(delays) / len(delays) if delays else None,
    )

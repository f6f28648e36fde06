"""Run the gate over the Numenta Anomaly Benchmark (NAB) and score its escalations.

Each CSV is one key; its rows are replayed in order as events with the row's timestamp (UTC) as
event time and payload `{"value": v}`. A labelled anomaly window counts as hit when the gate
escalates at least one row inside it (bounds included); an escalation inside no window is a false
escalation. Files whose window list is empty are labelled anomaly-free, so every escalation there
is false (`no_anomaly_escalations`).

Results are written in NAB's results layout and format, so NAB's own scorer can read them:
`OUT/ponder/<group>/ponder_<name>.csv` with columns `timestamp,value,anomaly_score,label,escalated`
(`label` is 1 inside a labelled window, NAB's convention; `escalated` is 1 where the gate asked
for reasoning).
"""

from __future__ import annotations

import csv
import json
from bisect import bisect_right
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from ponder.connectors.files import nab_key, read_nab
from ponder.evaluate.nabscore import PROFILES, NabScore, Series, nab_score
from ponder.operators.gate import GatePolicy, new_state, observe
from ponder.types import Event, SourcePos

__all__ = [
    "NabFile",
    "NabTotals",
    "NabReport",
    "Detector",
    "gate_detector",
    "load_windows",
    "find_series",
    "score_flags",
    "run_nab",
    "evaluate",
    "format_report",
    "group_scores",
    "scores",
]

HEADER = ("timestamp", "value", "anomaly_score", "label", "escalated")
WINDOWS_FILE = "combined_windows.json"
PROBATION = 0.15  # NAB's probationary share of each file: the detector is still learning

# A detector maps one series (key, epoch seconds, values) to (scores in [0, 1], escalated flags).
Detector = Callable[[str, Sequence[float], Sequence[float]], tuple[list[float], list[bool]]]


class NabFile(msgspec.Struct, frozen=True):
    """One series' result."""

    file: str  # key as in NAB's labels files: `group/name.csv`
    events: int
    escalations: int
    escalation_rate: float
    windows: int
    windows_hit: int
    false_escalations: int = 0  # escalations inside no labelled window
    probation_escalations: int = 0  # escalations in NAB's probationary period (first 15%)
    labelled: bool = False  # whether the windows file lists this series


class NabTotals(msgspec.Struct, frozen=True):
    events: int
    escalations: int
    escalation_rate: float
    windows: int
    windows_hit: int
    window_recall: float  # windows_hit / windows (1.0 when there are no windows)
    no_anomaly_escalations: int  # escalations in series labelled anomaly-free
    false_escalations: int = 0
    no_anomaly_after_probation: int = 0  # ... after NAB's probationary period


class NabReport(msgspec.Struct, frozen=True):
    files: list[NabFile]
    totals: NabTotals
    detector: str = "ponder"


def _epoch(stamp: str) -> float:
    """NAB window bound (`2014-04-10 07:15:00.000000`) as UTC epoch seconds."""
    dt = datetime.fromisoformat(stamp.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _lookup(data_dir: Path, name: str) -> Path | None:
    """`name` in data_dir or one of its parents, up to two levels up."""
    for d in (data_dir, *list(data_dir.parents)[:2]):
        p = d / name
        if p.is_file():
            return p
    return None


def load_windows(data_dir: Path) -> dict[str, list[tuple[float, float]]] | None:
    """NAB's `combined_windows.json` near data_dir, as key -> [(start, end)] epoch seconds; None
    when there is no such file."""
    path = _lookup(Path(data_dir).resolve(), WINDOWS_FILE)
    if path is None:
        return None
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        msg = f"{path}: expected an object of file -> windows, got {type(raw).__name__}"
        raise ValueError(msg)
    out: dict[str, list[tuple[float, float]]] = {}
    for key, wins in raw.items():
        try:
            out[key] = sorted((_epoch(a), _epoch(b)) for a, b in wins)
        except (TypeError, ValueError) as e:
            msg = f"{path}: bad window for {key!r}: {e}"
            raise ValueError(msg) from e
    return out


def find_series(data_dir: Path) -> tuple[Path, list[Path]]:
    """The CSV root (data_dir, or its `data/` subfolder when present) and its CSVs, sorted."""
    data_dir = Path(data_dir)
    root = data_dir / "data" if (data_dir / "data").is_dir() else data_dir
    if not root.is_dir():
        msg = f"{str(data_dir)!r} is not a directory"
        raise ValueError(msg)
    return root, sorted(root.rglob("*.csv"))


def gate_detector(policy: GatePolicy | None = None) -> Detector:
    """The gate as a NAB detector: score = the verdict's surprise (what the router ranks by),
    flag = escalation."""
    g = policy or GatePolicy()

    def detect(key: str, ts: Sequence[float], values: Sequence[float]
               ) -> tuple[list[float], list[bool]]:
        st = new_state()
        scores: list[float] = []
        flags: list[bool] = []
        for i, (t, v) in enumerate(zip(ts, values, strict=True)):
            verdict = observe(g, st, Event(key, t, {"value": v}, SourcePos("nab", 0, i)))
            scores.append(min(1.0, max(0.0, verdict.surprise)))
            flags.append(verdict.escalate)
        return scores, flags

    return detect


def score_flags(file: str, ts: Sequence[float], flags: Sequence[bool],
                windows: list[tuple[float, float]] | None) -> NabFile:
    """Count hits and false escalations of one series' flags against its windows."""
    wins = windows or []
    starts = [a for a, _ in wins]
    hit = [False] * len(wins)
    esc = false = early = 0
    probation = int(PROBATION * len(ts))
    for i, (t, f) in enumerate(zip(ts, flags, strict=True)):
        if not f:
            continue
        esc += 1
        early += i < probation
        inside = False
        # windows are sorted by start; scan back over those that start at or before t
        for j in range(bisect_right(starts, t) - 1, -1, -1):
            if wins[j][1] >= t:
                hit[j] = inside = True
        false += not inside
    n = len(ts)
    return NabFile(file=file, events=n, escalations=esc, escalation_rate=esc / n if n else 0.0,
                   windows=len(wins), windows_hit=sum(hit), false_escalations=false,
                   probation_escalations=early, labelled=windows is not None)


def _labels(ts: Sequence[float], windows: list[tuple[float, float]] | None) -> list[int]:
    """NAB's label per row: 1 inside a labelled window (bounds included), else 0."""
    wins = windows or []
    starts = [a for a, _ in wins]
    return [1 if any(wins[m][1] >= t for m in range(bisect_right(starts, t))) else 0 for t in ts]


def _totals(files: list[NabFile]) -> NabTotals:
    events = sum(f.events for f in files)
    esc = sum(f.escalations for f in files)
    wins = sum(f.windows for f in files)
    hit = sum(f.windows_hit for f in files)
    clean = [f for f in files if f.labelled and f.windows == 0]
    return NabTotals(
        events=events, escalations=esc, escalation_rate=esc / events if events else 0.0,
        windows=wins, windows_hit=hit, window_recall=hit / wins if wins else 1.0,
        no_anomaly_escalations=sum(f.escalations for f in clean),
        false_escalations=sum(f.false_escalations for f in files),
        no_anomaly_after_probation=sum(f.escalations - f.probation_escalations for f in clean))


def evaluate(data_dir: Path, detector: Detector, *, name: str = "ponder",
             out_dir: Path | None = None, series: dict[str, Series] | None = None) -> NabReport:
    """Run `detector` over every NAB series under data_dir; write results files when out_dir is
    given (`out_dir/<name>/<group>/<name>_<file>.csv`), and put each labelled file's times,
    scores (as written: 4 places) and windows into `series` when given, for `nab_score`."""
    data_dir = Path(data_dir)
    root, paths = find_series(data_dir)
    all_windows = load_windows(data_dir)
    files: list[NabFile] = []
    for path in paths:
        key = nab_key(path, root)
        stamps, ts, values = read_nab(path)
        scores, flags = detector(key, ts, values)
        windows = None if all_windows is None else all_windows.get(key)
        files.append(score_flags(key, ts, flags, windows))
        if series is not None and windows is not None:
            series[key] = Series(ts, [round(x, 4) for x in scores], windows)
        if out_dir is not None:
            rel = path.relative_to(root)
            dest = Path(out_dir) / name / rel.parent / f"{name}_{rel.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            labels = _labels(ts, windows)
            with dest.open("w", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(HEADER)
                for row in zip(stamps, values, scores, labels, flags, strict=True):
                    w.writerow((row[0], repr(row[1]), f"{row[2]:.4f}", row[3], int(row[4])))
    return NabReport(files=files, totals=_totals(files), detector=name)


def run_nab(data_dir: Path, out_dir: Path, policy: GatePolicy | None = None,
            series: dict[str, Series] | None = None) -> NabReport:
    """Run the gate over the NAB series under data_dir and write NAB results files to
    `out_dir/ponder/<group>/ponder_<name>.csv`."""
    return evaluate(data_dir, gate_detector(policy), name="ponder", out_dir=out_dir, series=series)


def scores(series: dict[str, Series]) -> dict[str, NabScore]:
    """The NAB score under each profile, each at its own best threshold (as NAB's runner)."""
    return {p: nab_score(series, p) for p in PROFILES}


def group_scores(series: dict[str, Series], profile: str = "standard") -> dict[str, dict[str, float]]:
    """Per NAB group: its score at its own best threshold, and leave-one-group-out: at the
    threshold that is best on the other groups. Groups without windows have no normalised
    score; their false positives at the threshold are reported instead."""
    groups = sorted({k.split("/")[0] for k in series})
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        test = {k: v for k, v in series.items() if k.split("/")[0] == g}
        train = {k: v for k, v in series.items() if k.split("/")[0] != g}
        own = nab_score(test, profile)
        row = {"score": own.normalized, "threshold": own.threshold, "fp": own.fp}
        if train:
            th = nab_score(train, profile).threshold
            held = nab_score(test, profile, th)
            row |= {"logo_score": held.normalized, "logo_threshold": th, "logo_fp": held.fp}
        out[g] = row
    return out


def format_report(report: NabReport) -> str:
    """A plain-text table: one row per series, then the totals."""
    rows = [("file", "events", "escalated", "rate", "windows hit", "false")]
    for f in report.files:
        rows.append((f.file, str(f.events), str(f.escalations), f"{f.escalation_rate:.2%}",
                     f"{f.windows_hit}/{f.windows}", str(f.false_escalations)))
    t = report.totals
    rows.append(("total", str(t.events), str(t.escalations), f"{t.escalation_rate:.2%}",
                 f"{t.windows_hit}/{t.windows}", str(t.false_escalations)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"escalation rate {t.escalation_rate:.2%}, window recall {t.window_recall:.1%} "
                 f"({t.windows_hit}/{t.windows}), escalations on anomaly-free series "
                 f"{t.no_anomaly_escalations}")
    return "\n".join(lines)

"""Gate: should this event pay for reasoning? A cheap per-key surprise score in [0, 1].

Every signal is normalised by what this key's own history has shown to be ordinary, so one
policy serves a calm sensor, a spiky load balancer and a daily cycle alike. Per numeric field:

* spike: the value's distance from its expectation, in units of a robust noise scale, against
  the largest such distance seen recently (a decaying maximum). The expectation is a fast EWMA
  and, once a seasonal profile predicts the field well, the profile too; a point counts only
  when both find it odd, so a daily ramp at its usual hour is no spike.
* level_shift / drift: a two-sided CUSUM of the deviation from the slow level (or from the
  seasonal profile when that predicts better), against the largest excursion seen recently.
  After it fires the slow level jumps to the fast one, so a step is reported once.
* seasonal profile: per configured period (a day and a week by default) a bounded profile of
  expected value and spread per phase bin, learnt once the field has spanned a whole period and
  trusted only when its error is well below the plain level's.
* stuck: the value repeats exactly for many events while the field normally changes.
* dropout: a numeric field that was present goes missing.
Per categorical field: a value never seen before, after warm-up, in a field whose values are
not new all the time. Per key: a gap in event time. Plus user rules over the event.

A field that only ever increased during warm-up (a counter or clock) is not scored.

Hysteresis: the first event whose score reaches `open` opens an incident and escalates. While the
incident is open the gate escalates again only for a clearly higher score, for a field (or a
non-deviation kind) not yet in the incident, or after a cool-down that doubles with each repeat;
`quiet` events under `close` end the incident. State is bounded whatever the stream length.

>>> from ponder.types import Event, SourcePos
>>> g, st = GatePolicy(), new_state()
>>> vs = [10.0 + (i % 5) * 0.1 for i in range(200)] + [25.0]
>>> out = [observe(g, st, Event("k", i, {"v": v}, SourcePos("t", 0, i))) for i, v in enumerate(vs)]
>>> sum(v.escalate for v in out), out[-1].escalate, out[-1].findings[0].kind
(1, True, 'spike')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import msgspec

from ponder.types import Event, Finding

__all__ = ["GatePolicy", "GateState", "Rule", "Verdict", "new_state", "observe"]

MAX_FIELDS = 32  # numeric and categorical fields tracked per key (each kind)
MAX_VALUES = 32  # distinct values remembered per categorical field
_DEVIATIONS = frozenset({"spike", "rate", "level_shift", "drift"})


@dataclass(frozen=True)
class Rule:
    """A user rule: `when(event)` true (or a float score) flags the event."""

    name: str
    when: Callable[[Event], bool | float]
    score: float = 1.0
    field: str = "*"


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate. Defaults were tuned on NAB and on the simulator's incidents (see
    benchmarks/nab_gate.py).

    Surprise signals are ratios `u` of a statistic to its threshold; a finding scores
    `(u - 1 + width) / (2 * width)` clipped to [0, 1], so `u = 1` scores 0.5, the default `open`.
    """

    warmup: int = 30  # events of a field before its signals score
    open: float = 0.5  # score that opens an incident (and escalates)
    close: float = 0.2  # score under which an incident quiets down
    quiet: int = 20  # events under `close` that end an incident
    cooldown: int = 200  # events before an open incident escalates again; doubles each time
    renotify: float = 0.3  # score increase over the incident's peak that escalates again
    width: float = 0.5  # half-width of the score ramp around a threshold, in units of it
    alpha_fast: float = 0.2  # fast EWMA: the short-term expectation
    alpha_slow: float = 0.01  # slow EWMA: the level
    alpha_scale: float = 0.02  # robust scales (EWMA of clipped absolute deviations)
    decay: float = 0.002  # per event, of the recent maxima that thresholds adapt to
    spike_decay: float = 0.002  # per event, of the recent maximum distance a spike must beat
    spike_z: float = 7.0  # least |value - expected| / noise scale that is a spike
    spike_ratio: float = 1.3  # ... and its least ratio to the recent maximum of that distance
    cusum_k: float = 1.0  # CUSUM slack, in scale units
    cusum_clip: float = 5.0  # one event adds at most this to the CUSUM
    cusum_h: float = 25.0  # least CUSUM that is a level shift or drift
    cusum_ratio: float = 1.5  # ... and its least ratio to the recent maximum
    seasons: tuple[tuple[float, int], ...] = ((86400.0, 48), (604800.0, 168))  # (period s, bins)
    season_alpha: float = 0.2  # per period: how fast a seasonal profile follows change
    season_gain: float = 0.5  # trust a profile whose error is under this share of the level's
    stuck: tuple[int, int] = (12, 60)  # identical repeats: score 0.5 .. 1
    stuck_min_change: float = 0.5  # share of steps that change, for a field to "normally vary"
    gap: tuple[float, float] = (6.0, 20.0)  # event interval / typical interval: score 0 .. 1
    new_value: float = 0.7  # score of a categorical value never seen before
    dropout: float = 0.6  # score of a numeric field gone missing (null or NaN)
    max_missing: float = 0.05  # ... when it was missing at most this share of the time
    rules: tuple[Rule, ...] = ()
    fields: tuple[str, ...] | None = None  # score only these payload fields (None: all)

    def __post_init__(self) -> None:
        def bad(why: str) -> None:
            raise ValueError(f"GatePolicy: {why}")

        if not 0.0 <= self.close < self.open <= 1.0:
            bad(f"needs 0 <= close < open <= 1, got close={self.close} open={self.open}")
        for name in ("warmup", "quiet", "cooldown"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha_fast", "alpha_slow", "alpha_scale", "decay", "spike_decay",
                     "season_alpha"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                bad(f"{name} must be within (0, 1), got {v}")
        if not 0.0 < self.width <= 1.0:
            bad(f"width must be within (0, 1], got {self.width}")
        for name in ("spike_z", "cusum_h", "cusum_clip"):
            if not getattr(self, name) > 0.0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cusum_k < 0.0 or self.renotify < 0.0:
            bad("cusum_k and renotify must be >= 0")
        if self.spike_ratio < 1.0 or self.cusum_ratio < 1.0:
            bad("spike_ratio and cusum_ratio must be >= 1")
        if not 0.0 < self.season_gain <= 1.0:
            bad(f"season_gain must be within (0, 1], got {self.season_gain}")
        for period, bins in self.seasons:
            if not (period > 0.0 and math.isfinite(period)) or not 1 <= bins <= 1024:
                bad(f"a season needs a period > 0 and 1..1024 bins, got {(period, bins)}")
        lo, hi = self.stuck
        if not 2 <= lo < hi:
            bad(f"stuck needs 2 <= low < high, got {self.stuck}")
        lo_g, hi_g = self.gap
        if not 1.0 < lo_g < hi_g:
            bad(f"gap needs 1 < low < high, got {self.gap}")
        for name in ("new_value", "dropout", "stuck_min_change", "max_missing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"{name} must be within [0, 1], got {getattr(self, name)}")
        # how long a field must last before any seasonal profile starts (a quarter period)
        span = 0.25 * min((p for p, _ in self.seasons), default=math.inf)
        object.__setattr__(self, "_season_span", span)


class Season(msgspec.Struct, array_like=True):
    """A seasonal profile of one field: expected value and spread per phase bin."""

    t0: float  # event time it started learning
    err: float = 0.0  # robust mean |value - profile|: how well it predicts
    n: int = 0  # predictions made
    bins: dict[int, list[float]] = {}  # bin -> [mean, spread, visits]; only bins seen


class FieldGate(msgspec.Struct, array_like=True):
    """What the gate keeps per numeric field: a fixed number of floats, the regime memory and,
    per configured season, at most its number of bins."""

    n: int = 0
    t0: float = 0.0  # event time of the first value
    last: float = 0.0
    fast: float = 0.0
    fdev: float = 0.0  # robust scale of value - fast
    fabs: float = 0.0  # unclipped mean |value - fast|: a floor for fdev
    slow: float = 0.0
    sdev: float = 0.0  # robust scale of value - slow
    sabs: float = 0.0  # unclipped mean |value - slow|
    rmax: float = 0.0  # decaying max of past |value - expected|
    rmax2: float = 0.0  # ... and the runner-up, so one outlier does not raise the bar alone
    cpos: float = 0.0
    cneg: float = 0.0
    cpeak: float = 0.0  # peak of the current CUSUM excursion
    cmax: float = 0.0  # decaying max of the peaks of past CUSUM excursions
    basis: int = 0  # what the CUSUM measures against: 0 the slow level, j the j-th season
    changes: float = 1.0  # EWMA of "the value changed this step"
    run: int = 0  # repeats of the current value
    up: int = 0  # strictly increasing steps since the first value (counter detection)
    counter: bool = False
    nulls: int = 0  # consecutive missing values
    missing: float = 0.0  # EWMA of "the value was missing"
    regimes: list[float] = []  # [level, n when left, ...]: levels the field settled at before
    seasons: list[Season | None] = []


class CatGate(msgspec.Struct, array_like=True):
    seen: list[str] = []
    novelty: float = 1.0  # EWMA of "the value was new"
    n: int = 0


class GateState(msgspec.Struct):
    n: int = 0
    dt: float = 0.0  # typical event interval (EWMA)
    last_ts: float = 0.0
    fields: dict[str, FieldGate] = {}
    cats: dict[str, CatGate] = {}
    open: bool = False
    peak: float = 0.0
    quiet_run: int = 0
    last_escalation: int = -1
    repeats: int = 0  # cool-down escalations of the open incident
    kinds: list[str] = []  # what the open incident has escalated for


class Verdict(msgspec.Struct, frozen=True):
    score: float
    escalate: bool
    findings: list[Finding]
    reason: str = ""


def new_state() -> GateState:
    return GateState()


def _ramp(x: float, lo: float, hi: float) -> float:
    if x <= lo:
        return 0.0
    return 1.0 if x >= hi else (x - lo) / (hi - lo)


def _season(g: GatePolicy, fg: FieldGate, ts: float, v: float, dt: float,
            floor: float) -> tuple[int, float, float]:
    """Fold `v` into the seasonal profiles; return (season number from 1, expected, scale) of
    the best trusted one, (0, 0.0, 0.0) when none is, or (-1, 0.0, 0.0) when the one in use
    has not seen this phase yet."""
    best = (0, 0.0, 0.0)
    best_err = g.season_gain * fg.sdev  # a profile must beat the plain level clearly
    gap = False
    if len(fg.seasons) < len(g.seasons):
        fg.seasons.extend([None] * (len(g.seasons) - len(fg.seasons)))
    for j, (period, nbins) in enumerate(g.seasons):
        sp = fg.seasons[j]
        if sp is None:
            # a profile starts once the field has lasted a quarter period: short-lived
            # streams never pay for it
            if ts - fg.t0 < 0.25 * period:
                continue
            sp = fg.seasons[j] = Season(ts)
        b = min(nbins - 1, int((ts % period) / period * nbins))
        cell = sp.bins.get(b)
        learnt = ts - sp.t0 >= period and sp.n >= 10
        err = sp.err
        # the profile in use stays in use unless another is clearly better
        bar = err if j + 1 == fg.basis else 1.25 * err
        if cell is None:
            sp.bins[b] = [v, 0.0, 1.0]
            gap = gap or (learnt and j + 1 == fg.basis and err < g.season_gain * fg.sdev)
            continue
        m, d, c = cell
        r = v - m
        scale = max(d, 0.5 * err, floor)
        if learnt and bar < best_err:
            best, best_err = (j + 1, m, scale), bar
        # fold in: `season_alpha` per period whatever the sampling rate, and after the first
        # period clipped, so one odd period cannot rewrite the profile
        visits = max(1.0, period / nbins / dt) if dt > 0.0 else 1.0
        a = max(1.0 / (c + 1.0), g.season_alpha / visits)
        clip = 3.0 * scale if learnt else math.inf
        cell[0] = m + a * max(-clip, min(clip, r))
        cell[1] = d + a * (min(abs(r), clip) - d)
        cell[2] = min(c + 1.0, 1e6)
        # the profile's error is robust too: an anomaly must not cost the trust that finds it
        ae = max(g.alpha_scale, 1.0 / (sp.n + 1.0))
        sp.err = err + ae * (min(abs(r), 3.0 * max(err, floor) if sp.n >= 10 else math.inf) - err)
        sp.n += 1
    return (-1, 0.0, 0.0) if gap and best[0] == 0 else best


MAX_REGIMES = 4


def _remember(fg: FieldGate, level: float, tol: float) -> None:
    """Note that the field sat at `level` until now."""
    reg = fg.regimes
    for k in range(0, len(reg), 2):
        if abs(reg[k] - level) <= tol:
            reg[k], reg[k + 1] = level, float(fg.n)
            return
    if len(reg) < 2 * MAX_REGIMES:
        reg.extend((level, float(fg.n)))
        return
    k = min(range(0, len(reg), 2), key=lambda i: reg[i + 1])  # the longest ago
    reg[k], reg[k + 1] = level, float(fg.n)


def _known(g: GatePolicy, fg: FieldGate, v: float, noise: float) -> bool:
    """Whether `v` (or the fast mean) is back at a level the field sat at recently."""
    reg = fg.regimes
    horizon = 2.0 / g.decay
    for k in range(0, len(reg), 2):
        level = reg[k]
        if fg.n - reg[k + 1] > horizon:
            continue
        tol = 0.25 * abs(level - fg.slow) + 3.0 * noise
        if min(abs(v - level), abs(fg.fast - level)) <= tol:
            return True
    return False


def _numeric(g: GatePolicy, fg: FieldGate, name: str, v: float, ts: float, dt: float,
             learn: bool, out: list[Finding]) -> None:
    """Score one numeric value against the field's state, then fold it in."""
    if fg.n == 0:
        fg.t0 = ts
        fg.slow = fg.fast = fg.last = v
        fg.n = 1
        return
    diff = v - fg.last
    if fg.counter:
        fg.last = v
        return
    if diff > 0.0 and fg.up == fg.n - 1:
        fg.up += 1
        if fg.up >= g.warmup:
            fg.counter = True  # a clock or counter: its level says nothing
            fg.seasons = []
            return
    floor = 1e-9 * (abs(fg.slow) + 1.0)
    s_fast = max(fg.fdev, 0.1 * fg.fabs, floor)
    s_slow = max(fg.sdev, 0.1 * fg.sabs, floor)
    r_fast = v - fg.fast
    # expectation: the fast mean, and the seasonal profile where it predicts well; a point is
    # odd only when odd against both
    r, scale, expected = r_fast, s_fast, fg.fast
    basis, e_season, s_season = (_season(g, fg, ts, v, dt, max(floor, 0.1 * s_slow))
                                 if ts - fg.t0 >= g._season_span else (0, 0.0, 0.0))
    if basis > 0:
        if basis != fg.basis:
            # the CUSUM's reference changed: its history says nothing about the new one
            fg.basis, fg.cpos, fg.cneg, fg.cpeak, fg.cmax = basis, 0.0, 0.0, 0.0, 0.0
        r_season = v - e_season
        if abs(r_season) / s_season < abs(r_fast) / s_fast:
            r, scale, expected = r_season, s_season, e_season
        zc, base, c_scale = r_season / s_season, e_season, s_season
    elif basis < 0:
        zc = None  # a phase the trusted profile has not seen yet: no CUSUM evidence either way
        base, c_scale = fg.slow, s_slow
    else:
        if fg.basis:
            fg.basis, fg.cpos, fg.cneg, fg.cpeak, fg.cmax = 0, 0.0, 0.0, 0.0, 0.0
        zc, base, c_scale = (v - fg.slow) / s_slow, fg.slow, s_slow
    ar = abs(r)
    w = g.width
    scored = fg.n >= g.warmup
    if scored:
        t = max(g.spike_z * scale, g.spike_ratio * fg.rmax2)
        s = _ramp(ar / t, 1.0 - w, 1.0 + w)
        if s > 0.0 and not (basis <= 0 and _known(g, fg, v, s_fast)):
            out.append(Finding("spike", name, s, v, expected,
                               f"{r:+.4g} off expected, threshold {t:.4g}"))
        if zc is not None:
            zc = max(-g.cusum_clip, min(g.cusum_clip, zc))
            fg.cpos = max(0.0, fg.cpos + zc - g.cusum_k)
            fg.cneg = max(0.0, fg.cneg - zc - g.cusum_k)
        c = max(fg.cpos, fg.cneg)
        h = max(g.cusum_h, g.cusum_ratio * fg.cmax)
        s = _ramp(c / h, 1.0 - w, 1.0 + w)
        # back at a level it sat at before (a square wave, a machine switching modes): no news
        known = s > 0.0 and not fg.basis and _known(g, fg, v, s_fast)
        fg.cmax *= 1.0 - g.decay
        if s > 0.0 and not known:
            kind = "level_shift" if abs(fg.fast - base) > 4.0 * c_scale else "drift"
            out.append(Finding(kind, name, s, v, base,
                               f"cusum {c:.0f} vs {h:.0f}, recent mean {fg.fast:.4g} vs {base:.4g}"))
        if s >= 1.0:
            # restart from the new level, so one step is one incident; a key that was not
            # already in an incident learns that excursions this large happen
            fg.cpos = fg.cneg = fg.cpeak = 0.0
            if not fg.basis:
                _remember(fg, fg.slow, 3.0 * s_fast)
                fg.slow = fg.fast
            if learn and not known:
                fg.cmax = max(fg.cmax, h)
        elif c == 0.0:
            # an excursion ended by itself: it was ordinary
            fg.cmax = max(fg.cmax, fg.cpeak)
            fg.cpeak = 0.0
        else:
            fg.cpeak = max(fg.cpeak, c)
        keep = 1.0 - g.spike_decay
        if ar > fg.rmax * keep:
            fg.rmax, fg.rmax2 = ar, fg.rmax * keep
        else:
            fg.rmax, fg.rmax2 = fg.rmax * keep, max(fg.rmax2 * keep, ar)
    lo, hi = g.stuck
    if diff == 0.0:
        fg.run += 1
        if scored and fg.run >= lo and fg.changes >= g.stuck_min_change:
            s = 0.5 + 0.5 * min(1.0, (fg.run - lo) / (hi - lo))
            out.append(Finding("stuck", name, s, v, None, f"same value {fg.run + 1} times"))
    else:
        fg.run = 0
    # fold the value in: plain means until warm, then EWMAs of deviations clipped at 4 scales,
    # so an outlier cannot inflate the scale it is measured against
    d = v - fg.slow
    if fg.n < g.warmup:
        a = 1.0 / (fg.n + 1)
        fg.fdev += a * (abs(r_fast) - fg.fdev)
        fg.fabs = fg.fdev
        fg.slow += a * d
        fg.sdev += a * (abs(d) - fg.sdev)
        fg.sabs = fg.sdev
    else:
        # weights start as plain means and settle to the EWMA rates
        a = max(g.alpha_scale, 1.0 / (fg.n + 1))
        fg.fdev += a * (min(abs(r_fast), 4.0 * s_fast) - fg.fdev)
        fg.fabs += a * (abs(r_fast) - fg.fabs)
        dc = max(-4.0 * s_slow, min(4.0 * s_slow, d))
        fg.slow += max(g.alpha_slow, 1.0 / (fg.n + 1)) * dc
        fg.sdev += a * (abs(dc) - fg.sdev)
        fg.sabs += a * (abs(d) - fg.sabs)
    fg.fast += g.alpha_fast * (v - fg.fast)
    if fg.run < lo:  # a stuck run does not teach the field that it is normally still
        fg.changes += max(g.alpha_slow, 1.0 / fg.n) * ((1.0 if diff != 0.0 else 0.0) - fg.changes)
    fg.missing -= g.alpha_slow * fg.missing
    fg.last = v
    fg.n += 1
    fg.nulls = 0


def _categorical(g: GatePolicy, st: GateState, name: str, v: str, out: list[Finding]) -> None:
    cg = st.cats.get(name)
    if cg is None:
        if len(st.cats) >= MAX_FIELDS:
            return
        cg = st.cats[name] = CatGate()
    v = v[:64]
    new = v not in cg.seen
    if new:
        # a field whose values are often new (ids, free text) says nothing by a new one
        if cg.n >= g.warmup and cg.novelty < 0.05 and len(cg.seen) < MAX_VALUES:
            out.append(Finding("new_value", name, g.new_value, v, None, "value never seen before"))
        if len(cg.seen) < MAX_VALUES:
            cg.seen.append(v)
    a = max(0.02, 1.0 / (cg.n + 1))
    cg.novelty += a * ((1.0 if new else 0.0) - cg.novelty)
    cg.n += 1


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def observe(g: GatePolicy, st: GateState, event: Event) -> Verdict:
    """Score one event of a key and decide whether it escalates; updates `st` in place."""
    findings: list[Finding] = []
    ts = event.ts
    if st.n > 0:
        dt = ts - st.last_ts
        if st.n >= g.warmup and st.dt > 0.0:
            s = _ramp(dt / st.dt, *g.gap)
            if s > 0.0:
                findings.append(Finding("gap", "*", s, dt, st.dt, f"{dt:.0f}s since previous event"))
        if dt > 0.0:
            st.dt = dt if st.dt == 0.0 else st.dt + 0.05 * (min(dt, 10.0 * st.dt) - st.dt)
    st.last_ts = ts
    st.n += 1
    for name, v in event.payload.items():
        if g.fields is not None and name not in g.fields:
            continue
        if isinstance(v, bool):
            _categorical(g, st, name, "true" if v else "false", findings)
        elif isinstance(v, (int, float)) and _finite(v):
            fg = st.fields.get(name)
            if fg is None:
                if len(st.fields) >= MAX_FIELDS:
                    continue
                fg = st.fields[name] = FieldGate()
            _numeric(g, fg, name, float(v), ts, st.dt, not st.open, findings)
        elif v is None or isinstance(v, float):
            fg = st.fields.get(name)
            if fg is not None and not fg.counter:
                fg.nulls += 1
                if fg.nulls == 1 and fg.n >= g.warmup and fg.missing <= g.max_missing:
                    findings.append(Finding("dropout", name, g.dropout, None, fg.fast, "value missing"))
                fg.missing += g.alpha_slow * (1.0 - fg.missing)
        elif isinstance(v, str):
            _categorical(g, st, name, v, findings)
    for rule in g.rules:
        hit = rule.when(event)
        if hit:
            s = rule.score if hit is True else float(hit)
            findings.append(Finding("rule", rule.field, max(0.0, min(1.0, s)), None, None, rule.name))
    return _hysteresis(g, st, findings)


def _hysteresis(g: GatePolicy, st: GateState, findings: list[Finding]) -> Verdict:
    score = max((f.score for f in findings), default=0.0)
    escalate = False
    why = ""
    if score >= g.open:
        # deviations of one field are one story (a spike turning into a level shift); other
        # kinds, and other fields, are news
        kinds = sorted({("deviation" if f.kind in _DEVIATIONS else f.kind) + ":" + f.field
                        for f in findings if f.score >= g.open})
        if not st.open:
            st.open, st.peak, st.kinds, st.repeats = True, score, kinds[:MAX_FIELDS], 0
            escalate, why = True, "incident opened"
        else:
            new = [k for k in kinds if k not in st.kinds]
            if new and len(st.kinds) < MAX_FIELDS:
                st.kinds.extend(new[: MAX_FIELDS - len(st.kinds)])
                escalate, why = True, "new finding " + ",".join(new)
            elif score >= st.peak + g.renotify:
                escalate, why = True, f"score rose {st.peak:.2f}->{score:.2f}"
            elif st.n - st.last_escalation >= g.cooldown << min(st.repeats, 16):
                st.repeats += 1
                escalate, why = True, "incident persists"
            st.peak = max(st.peak, score)
        st.quiet_run = 0
    elif st.open:
        if score < g.close:
            st.quiet_run += 1
            if st.quiet_run >= g.quiet:
                st.open, st.peak, st.kinds, st.quiet_run, st.repeats = False, 0.0, [], 0, 0
        else:
            st.quiet_run = 0
    if escalate:
        st.last_escalation = st.n
    findings.sort(key=lambda f: -f.score)
    return Verdict(score, escalate, findings, why)

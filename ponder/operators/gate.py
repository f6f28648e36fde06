"""Gate: should this event pay for reasoning? A cheap per-key surprise score in [0, 1].

Every signal is measured against what this key's own history shows to be ordinary, so one policy
serves a calm sensor, a spiky load balancer and a daily cycle alike. Per numeric field:

* spike: the distance of the value from its expectation, against a robust noise scale and
  against the size of the large distances that recur lately (a bar that relaxes while they
  stop recurring). The expectation is a fast EWMA and, where a seasonal profile predicts the
  field well, the profile as well: a point counts only when odd against both, so the daily ramp
  at its usual hour is no spike.
* rate: departures (jumps to a large distance) arriving faster than they have lately, a CUSUM
  of them: a burst of spikes where single spikes are routine.
* level_shift / drift: a two-sided CUSUM of the deviation from the slow level (or from the
  trusted seasonal profile), against the largest excursion seen lately. After it fires the slow
  level restarts at the recent one, so one step is one incident; a return to a level the field
  sat at before (a square wave, a machine switching modes) is no news.
* seasonal profiles: per configured period (a day and a week by default) the expected value and
  spread per phase bin. A profile starts once the field has lasted a quarter period (short-lived
  streams never pay for it). It is trusted once its predictions from earlier periods are
  clearly better than the plain level (robust error under `season_gain` of the level's spread)
  and on average no worse than twice the fast mean's (a cycle that drifts against the period
  fails this); a phase counts once it was seen in two earlier periods.
* stuck: the value repeats exactly, longer than its runs of repeats lately and at least
  `stuck[0]` times, while the field normally changes. While stuck, its other signals pause.
* dropout: a numeric field that is normally present is null (or NaN).
A number the statistics cannot hold, NaN, ±inf or beyond ±`MAX_ABS` (where differences and
sums would overflow), is a missing value. A field whose name is longer than `MAX_NAME` is not
scored, nor are lists and objects.
Per categorical field: a value never seen before, after warm-up, in a field whose values are not
new all the time. Per key: a gap in event time, against a bar that rises while gaps that long recur
(and relaxes as they stop). Plus user rules over the event. A numeric field
that only increased during warm-up (a clock, a counter) is not scored.

Hysteresis: the first event whose score reaches `open` opens an incident and escalates. While
the incident is open the gate escalates again only for a clearly higher score, for a field (or a
non-deviation kind) not yet in the incident, or after a cool-down that doubles with each repeat;
`quiet` events under `close` end the incident. The level-shift bar does not learn from events
inside an open incident. The state is bounded whatever the stream length (see `FieldGate`).

Surprise (`Verdict.surprise`): how much news an event is, in one scale for every key. An
escalation's score, its part past `open` divided by `1 + ` the key's incidents before this one
lately (each counts 1, forgotten at `decay` per event; an incident's follow-ups keep the share
its onset got): an incident in a key that has had others lately ranks below one in a key where
they are rare, as an anomaly likelihood would rank it. Every other event stays under `open`,
however high its findings score. The router chooses tiers by it; `ponder
nab` writes it as NAB's anomaly score (benchmarks/nab_gate.py: NAB's own scoring).

`observe` runs the user rules, and checks the event time, before it changes any state: a rule
that raises, or an event time that is not finite, leaves the key's state as it was. After that
nothing raises for any payload of JSON values (what the decoder lets through).

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

MAX_FIELDS = 32  # numeric fields, and categorical fields, tracked per key
FRAMES = 4  # frames an image field remembers: a scene, and a few passing changes
MAX_VALUES = 32  # distinct values remembered per categorical field
MAX_REGIMES = 4  # levels remembered per numeric field
MAX_NAME = 128  # characters of a field name the state keeps: longer fields are not scored
MAX_ABS = 1e100  # largest magnitude scored: squares and sums of such values stay finite
_DEVIATIONS = frozenset({"spike", "rate", "level_shift", "drift"})
_UNDER_OPEN = 0.999  # a share of `open` that rounds (to 4 places) below it


@dataclass(frozen=True)
class Rule:
    """A user rule: `when(event)` true (or a float score) flags the event."""

    name: str
    when: Callable[[Event], bool | float]
    score: float = 1.0
    field: str = "*"


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate. The defaults were tuned on NAB and on the simulator's incidents
    (benchmarks/nab_gate.py).

    A signal is a ratio `u` of a statistic to its threshold; its finding scores 0 up to
    `u = 1 - width`, 0.5 at `u = 1` (the default `open`), and past it `1 - exp(-(u - 1) / width) / 2`,
    rising towards 1 without reaching it, so the strongest news ranks first. Decays and rates
    are per event of the field.
    """

    warmup: int = 30  # events of a field before its signals score
    open: float = 0.5  # score that opens an incident (and escalates)
    close: float = 0.2  # score under which an incident quiets down
    quiet: int = 20  # events under `close` that end an incident
    cooldown: int = 200  # events before an open incident escalates again; doubles each time
    renotify: float = 0.3  # rise of the score over the incident's peak that escalates again
    width: float = 0.5  # half-width of the score ramp around a threshold, in units of it
    alpha_fast: float = 0.2  # fast EWMA: the short-term expectation
    alpha_slow: float = 0.01  # slow EWMA: the level
    alpha_scale: float = 0.02  # robust scales: EWMAs of absolute deviations clipped at 4 scales
    decay: float = 0.002  # how fast the CUSUM bars and remembered levels are forgotten
    spike_z: float = 7.0  # least |value - expected| / noise scale that is a spike
    spike_ratio: float = 1.3  # ... and its least ratio to the large distances that recur
    spike_decay: float = 0.006  # rate of the EWMA of how often large distances occur
    spike_recur: float = 4.0  # ... they recur (count fully) at spike_decay / spike_recur or more
    cusum_k: float = 1.1  # CUSUM slack, in scale units
    cusum_clip: float = 5.0  # most one event adds to the CUSUM
    cusum_h: float = 25.0  # least CUSUM that is a level shift or drift
    cusum_ratio: float = 1.5  # ... and its least ratio to the recent largest (also for bursts)
    burst_k: float = 0.05  # rate: a large jump adds 1 to its CUSUM, every event takes this off
    burst_h: float = 2.5  # least such CUSUM that is a burst
    seasons: tuple[tuple[float, int], ...] = ((86400.0, 48), (604800.0, 168))  # (period s, bins)
    season_alpha: float = 0.2  # per period: how fast a profile follows change
    season_gain: float = 0.5  # trust a profile whose error is under this share of the level's
    stuck: tuple[int, int] = (12, 60)  # identical repeats: score 0.5 .. 1
    stuck_min_change: float = 0.5  # share of steps that change, for a field to "normally vary"
    gap: tuple[float, float] = (6.0, 20.0)  # event interval / typical interval: score 0 .. 1
    new_value: float = 0.7  # score of a categorical value never seen before
    frame_change: float = 0.7  # score of an image (camera frame) unlike the key's previous one
    near_identical: int | None = None  # grey levels within which a frame is unlike no other
    dropout: float = 0.6  # score of a numeric field gone missing ...
    max_missing: float = 0.05  # ... when it was missing at most this share of the time
    rules: tuple[Rule, ...] = ()
    fields: tuple[str, ...] | None = None  # score only these payload fields (None: all)

    def __post_init__(self) -> None:
        def bad(why: str) -> None:
            raise ValueError(f"GatePolicy: {why}")

        if not 0.0 <= self.close < self.open <= 1.0:
            bad(f"needs 0 <= close < open <= 1, got close={self.close} open={self.open}")
        for name in ("warmup", "quiet", "cooldown"):
            if not getattr(self, name) >= 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha_fast", "alpha_slow", "alpha_scale", "decay", "spike_decay",
                     "season_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                bad(f"{name} must be within (0, 1), got {getattr(self, name)}")
        if not 0.0 < self.width <= 1.0:
            bad(f"width must be within (0, 1], got {self.width}")
        for name in ("spike_z", "cusum_h", "cusum_clip", "burst_h", "burst_k"):
            if not getattr(self, name) > 0.0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("cusum_k", "renotify"):
            if not getattr(self, name) >= 0.0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("spike_ratio", "cusum_ratio"):
            if not getattr(self, name) >= 1.0:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.season_gain <= 1.0:
            bad(f"season_gain must be within (0, 1], got {self.season_gain}")
        for season in self.seasons:
            period, bins = season
            if not (0.0 < period < math.inf and isinstance(bins, int) and 1 <= bins <= 1024):
                bad(f"a season is (period s > 0, 1..1024 bins), got {season!r}")
        lo, hi = self.stuck
        if not 2 <= lo < hi:
            bad(f"stuck needs 2 <= low < high, got {self.stuck}")
        lo_g, hi_g = self.gap
        if not 1.0 < lo_g < hi_g:
            bad(f"gap needs 1 < low < high, got {self.gap}")
        t = self.near_identical
        if t is not None and not (isinstance(t, int) and 0 <= t <= 255):
            bad(f"near_identical must be None or grey levels in [0, 255], got {t!r}")
        for name in ("new_value", "frame_change", "dropout", "stuck_min_change", "max_missing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(f"{name} must be within [0, 1], got {getattr(self, name)}")
        # a field must last this long before any seasonal profile starts
        span = 0.25 * min((p for p, _ in self.seasons), default=math.inf)
        object.__setattr__(self, "_season_span", span)


class Season(msgspec.Struct, array_like=True):
    """A seasonal profile of one field."""

    t0: float  # event time it started learning
    err: float = 0.0  # robust mean |value - profile| of predictions from earlier periods
    mae: float = 0.0  # ... and the plain mean, over about two periods
    fae: float = 0.0  # the plain mean |value - fast mean| over the same events
    n: int = 0  # such predictions
    # phase bin -> [mean, spread, visits, periods visited, last period visited]; bins seen only
    bins: dict[int, list[float]] = {}


class FieldGate(msgspec.Struct, array_like=True):
    """What the gate keeps per numeric field: 28 numbers, at most `MAX_REGIMES` remembered
    levels and, per configured season, 5 numbers per bin seen (at most `bins`)."""

    n: int = 0
    t0: float = 0.0  # event time of the first value
    last: float = 0.0
    fast: float = 0.0
    fdev: float = 0.0  # robust scale of value - fast
    fabs: float = 0.0  # mean |value - fast|: a tenth of it floors fdev
    slow: float = 0.0
    sdev: float = 0.0  # robust scale of value - slow
    sabs: float = 0.0  # mean |value - slow|
    big: float = 0.0  # size of the large distances from expectation (a relaxing max)
    brate: float = 0.0  # EWMA of "the distance was large"
    last_r: float = 0.0  # the last |value - fast mean|
    bc: float = 0.0  # CUSUM of departures from expectation
    bpeak: float = 0.0  # peak of its current excursion
    bmax: float = 0.0  # decaying max of the peaks of its past excursions
    cpos: float = 0.0  # CUSUM of deviations up
    cneg: float = 0.0  # ... and down
    cpeak: float = 0.0
    cmax: float = 0.0
    basis: int = 0  # what the CUSUM measures against: 0 the slow level, j the j-th season
    changes: float = 1.0  # EWMA of "the value changed this step"
    run: int = 0  # repeats of the current value
    runmax: float = 0.0  # decaying max of past runs of repeats
    up: int = 0  # strictly increasing steps since the first value
    counter: bool = False  # only increased during warm-up: not scored
    nulls: int = 0  # consecutive missing values
    missing: float = 0.0  # EWMA of "the value was missing"
    settled: int = 0  # when the slow level last restarted
    regimes: list[float] = []  # [level, n when last there, ...]: levels the field sat at
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
    gmax: float = 0.0  # the longest gap lately, in typical intervals (a relaxing max)
    onsets: float = 0.0  # incidents opened lately (each counts 1, forgotten at `decay` per event)
    scale: float = 1.0  # the open incident's share of its score past `open` that is news
    # image field -> the frames it showed lately: (digest prefix, fingerprint, decaying count)
    frames: dict[str, list[tuple[str, bytes, float]]] = {}


class Verdict(msgspec.Struct, frozen=True):
    score: float  # the most surprising finding's score
    escalate: bool
    findings: list[Finding]
    reason: str = ""
    # what the privacy policy withheld or transformed in this event: field -> action, no values
    privacy: dict[str, str] = {}
    # how much news the event is (None: as much as its score); see "Surprise" above
    news: float | None = None

    @property
    def surprise(self) -> float:
        return self.score if self.news is None else self.news


def new_state() -> GateState:
    return GateState()


def _ramp(x: float, lo: float, hi: float) -> float:
    if x <= lo:
        return 0.0
    return 1.0 if x >= hi else (x - lo) / (hi - lo)


def _past(u: float, width: float) -> float:
    """The score of a statistic at `u` times its threshold: 0 up to `1 - width`, 0.5 at the
    threshold, then towards 1 without reaching it, so a value far past its bar still ranks
    above one just past it (the NAB score, and a budget, want the strongest news first)."""
    if u <= 1.0:
        return _ramp(u, 1.0 - width, 1.0) * 0.5
    return 1.0 - 0.5 * math.exp(-(u - 1.0) / width)


def _season(g: GatePolicy, fg: FieldGate, ts: float, v: float, dt: float,
            floor: float) -> tuple[int, float, float]:
    """Fold `v` into the seasonal profiles; return (season number from 1, expected, scale) of
    the best trusted one, (0, 0.0, 0.0) when none is, or (-1, 0.0, 0.0) when the one in use
    does not know this phase well enough yet."""
    best = (0, 0.0, 0.0)
    best_err = g.season_gain * fg.sdev  # a profile must beat the plain level clearly
    gap = False
    if len(fg.seasons) < len(g.seasons):
        fg.seasons.extend([None] * (len(g.seasons) - len(fg.seasons)))
    for j, (period, nbins) in enumerate(g.seasons):
        sp = fg.seasons[j]
        if sp is None:
            if ts - fg.t0 < 0.25 * period:
                continue
            sp = fg.seasons[j] = Season(ts)
        b = min(nbins - 1, int((ts % period) / period * nbins))
        k = float(ts // period)
        # visits of one bin per period: the profile follows change at `season_alpha` per
        # period whatever the sampling rate
        visits = max(1.0, period / nbins / dt) if dt > 0.0 else 1.0
        # trusted once it has predicted a quarter period's worth of events from earlier periods
        learnt = ts - sp.t0 >= period and sp.n * dt >= 0.25 * period
        err = sp.err
        bar = err if j + 1 == fg.basis else 1.25 * err  # the profile in use stays unless beaten
        cell = sp.bins.get(b)
        if cell is None:
            sp.bins[b] = [v, 0.0, 1.0, 1.0, k]
            gap = gap or (learnt and j + 1 == fg.basis)
            continue
        m, d, c, periods, last = cell
        if k != last:
            periods = cell[3] = min(periods + 1.0, 1e9)
            cell[4] = k
        r = v - m
        scale = max(d, 0.5 * err, floor)
        if learnt:
            # the phase was seen in two earlier periods at least, and the profile predicts no
            # worse than twice the fast mean on average (a cycle drifting against the period does)
            if periods >= 3.0:
                if bar < best_err and sp.mae < 2.0 * sp.fae:
                    best, best_err = (j + 1, m, scale), bar
            elif j + 1 == fg.basis:
                gap = True
        # fold in, clipped after the first period, so one odd period cannot rewrite the profile
        a = max(1.0 / (c + 1.0), g.season_alpha / visits)
        clip = 3.0 * scale if ts - sp.t0 >= period else math.inf
        cell[0] = m + a * max(-clip, min(clip, r))
        cell[1] = d + a * (min(abs(r), clip) - d)
        cell[2] = min(c + 1.0, 1e9)
        if periods >= 2.0:
            # a prediction from an earlier period; its error is robust, so an anomaly does not
            # cost the trust that finds it
            ae = max(g.alpha_scale, 1.0 / (sp.n + 1.0))
            cap = 3.0 * max(err, floor) if sp.n >= 10 else math.inf
            sp.err = err + ae * (min(abs(r), cap) - err)
            am = 1.0 / (sp.n + 1.0)
            am = am if am > dt / (2.0 * period) else dt / (2.0 * period)
            sp.mae += am * (abs(r) - sp.mae)
            sp.fae += am * (abs(v - fg.fast) - sp.fae)
            sp.n += 1
    return (-1, 0.0, 0.0) if gap and best[0] == 0 else best


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
    k = min(range(0, len(reg), 2), key=lambda i: reg[i + 1])  # the one left longest ago
    reg[k], reg[k + 1] = level, float(fg.n)


def _known(g: GatePolicy, fg: FieldGate, x: float, noise: float) -> bool:
    """Whether `x` is at a level the field sat at recently: within a quarter of the way from
    the current level, plus 3 noise scales."""
    reg = fg.regimes
    horizon = 2.0 / g.decay
    for k in range(0, len(reg), 2):
        level = reg[k]
        if fg.n - reg[k + 1] <= horizon and \
                abs(x - level) <= 0.25 * abs(level - fg.slow) + 3.0 * noise:
            return True
    return False


def _numeric(g: GatePolicy, fg: FieldGate, name: str, v: float, ts: float, dt: float,
             learn: bool, out: list[Finding]) -> None:
    """Score one numeric value against the field's state, then fold it in."""
    n = fg.n
    if n == 0:
        fg.t0 = ts
        fg.slow = fg.fast = fg.last = v
        fg.n = 1
        return
    diff = v - fg.last
    if fg.counter:
        fg.last = v
        return
    if diff > 0.0 and fg.up == n - 1:
        fg.up += 1
        if fg.up >= g.warmup:
            fg.counter = True  # a clock or a counter: its level says nothing
            fg.seasons = []
            return
    scored = n >= g.warmup
    # stuck: a value repeated longer than the field's runs of repeats lately (and `stuck[0]`),
    # in a field that normally changes; while stuck, nothing else is scored nor learnt
    lo, hi = g.stuck
    lo_run = g.cusum_ratio * fg.runmax
    lo_run = lo_run if lo_run > lo else lo
    fg.runmax *= 1.0 - g.decay
    if diff == 0.0:
        fg.run += 1
        if fg.run >= lo_run and fg.changes >= g.stuck_min_change:
            if scored:
                s = 0.5 + 0.5 * min(1.0, (fg.run - lo_run) / (hi - lo))
                out.append(Finding("stuck", name, s, v, None, f"same value {fg.run + 1} times"))
            fg.n = n + 1
            fg.nulls = 0
            return
    else:
        if fg.run > fg.runmax:
            fg.runmax = float(fg.run)  # runs this long happen (a float, as the state stores it)
        fg.run = 0
    fast, slow = fg.fast, fg.slow
    floor = 1e-9 * (abs(slow) + 1.0)
    s_fast = fg.fdev if fg.fdev > 0.1 * fg.fabs else 0.1 * fg.fabs
    s_fast = s_fast if s_fast > floor else floor
    s_slow = fg.sdev if fg.sdev > 0.1 * fg.sabs else 0.1 * fg.sabs
    s_slow = s_slow if s_slow > floor else floor
    r_fast = v - fast
    # the expectation: the fast mean, or the seasonal profile where it predicts well and finds
    # the value less odd
    r, scale, expected = r_fast, s_fast, fast
    if ts - fg.t0 >= g._season_span:  # type: ignore[attr-defined]
        basis, e_season, s_season = _season(g, fg, ts, v, dt, max(floor, 0.1 * s_slow))
    else:
        basis, e_season, s_season = 0, 0.0, 0.0
    # a remembered level the field is at again is refreshed, and refined while the field holds
    # still (so a slow drift does not drag it along)
    reg = fg.regimes
    still = fg.cpos == 0.0 and fg.cneg == 0.0
    for k in range(0, len(reg), 2):
        if abs(fast - reg[k]) <= 3.0 * s_fast:
            if still:
                reg[k] += 0.05 * (fast - reg[k])
            reg[k + 1] = float(n)
    zc: float | None
    if basis > 0:
        if basis != fg.basis:
            # the CUSUM's reference changed: its history says nothing about the new one
            fg.basis, fg.cpos, fg.cneg, fg.cpeak, fg.cmax = basis, 0.0, 0.0, 0.0, 0.0
        r_season = v - e_season
        if abs(r_season) / s_season < abs(r_fast) / s_fast:
            r, scale, expected = r_season, s_season, e_season
        zc, base, c_scale = r_season / s_season, e_season, s_season
    elif basis < 0:
        zc, base, c_scale = None, slow, s_slow  # a phase the profile in use cannot judge yet
    else:
        if fg.basis:
            fg.basis, fg.cpos, fg.cneg, fg.cpeak, fg.cmax = 0, 0.0, 0.0, 0.0, 0.0
        zc, base, c_scale = (v - slow) / s_slow, slow, s_slow
    ar = abs(r)
    hi_w = 1.0 + g.width  # past this ratio a CUSUM restarts
    if scored:
        # spike
        t_abs = g.spike_z * scale
        recur = g.spike_recur * fg.brate / g.spike_decay
        t = g.spike_ratio * fg.big * (recur if recur < 1.0 else 1.0)
        t = t if t > t_abs else t_abs
        s = _past(ar / t, g.width)
        if s > 0.0 and not (basis <= 0 and _known(g, fg, v, s_fast)):
            out.append(Finding("spike", name, s, v, expected,
                               f"{r:+.4g} off expected, threshold {t:.4g}"))
        # departures: large distances from the expected, twice the last distance from the fast
        # mean (neither the way back nor the lag after a step counts again); how large they are
        # and how often
        af = abs(r_fast)
        depart = ar > t_abs and af > 2.0 * fg.last_r
        fg.last_r = af
        if depart:
            fg.big = ar if ar > fg.big else fg.big + 0.01 * (ar - fg.big)
            fg.brate += g.spike_decay * (1.0 - fg.brate)
        else:
            fg.brate -= g.spike_decay * fg.brate
        # rate: departures faster than lately
        bc = fg.bc + (1.0 if depart else 0.0) - g.burst_k
        bc = bc if bc > 0.0 else 0.0
        hb = g.cusum_ratio * fg.bmax
        hb = hb if hb > g.burst_h else g.burst_h
        s = _past(bc / hb, g.width)
        if s > 0.0:
            out.append(Finding("rate", name, s, v, expected,
                               f"large deviations arriving fast ({bc:.1f} vs {hb:.1f})"))
        fg.bmax *= 1.0 - g.decay
        if bc >= hi_w * hb:  # clearly a burst: it restarts
            bc = fg.bpeak = 0.0
            fg.bmax = max(fg.bmax, hb)
        elif bc == 0.0:
            fg.bmax = max(fg.bmax, fg.bpeak)  # an excursion ended by itself: it was ordinary
            fg.bpeak = 0.0
        elif bc > fg.bpeak:
            fg.bpeak = bc
        fg.bc = bc
        # level shift / drift
        if zc is not None:
            clip = g.cusum_clip
            zc = clip if zc > clip else (-clip if zc < -clip else zc)
            cp = fg.cpos + zc - g.cusum_k
            cn = fg.cneg - zc - g.cusum_k
            fg.cpos = cp if cp > 0.0 else 0.0
            fg.cneg = cn if cn > 0.0 else 0.0
        c = fg.cpos if fg.cpos > fg.cneg else fg.cneg
        h = g.cusum_ratio * fg.cmax
        h = h if h > g.cusum_h else g.cusum_h
        s = _past(c / h, g.width)
        # back at a level it sat at before (a square wave, a machine switching modes): no news
        known = s > 0.0 and not fg.basis and (_known(g, fg, v, s_fast)
                                              or _known(g, fg, fast, s_fast))
        if s > 0.0 and not known:
            kind = "level_shift" if abs(fast - base) > 4.0 * c_scale else "drift"
            out.append(Finding(kind, name, s, v, base,
                               f"cusum {c:.0f} vs {h:.0f}, recent mean {fast:.4g} vs {base:.4g}"))
        fg.cmax *= 1.0 - g.decay
        if c >= hi_w * h:
            # restart from the recent level, so one step is one incident; a key not already in
            # an incident learns that excursions this large happen
            fg.cpos = fg.cneg = fg.cpeak = 0.0
            if not fg.basis:
                if n - fg.settled >= g.warmup:  # a level it sat at, not a step on the way
                    _remember(fg, slow, 3.0 * s_fast)
                fg.slow = slow = fast
                fg.settled = n
            if learn and not known:
                fg.cmax = max(fg.cmax, h)
        elif c == 0.0:
            fg.cmax = max(fg.cmax, fg.cpeak)
            fg.cpeak = 0.0
        elif c > fg.cpeak:
            fg.cpeak = c
    # fold the value in: plain means until warm, then EWMAs (starting as plain means) of
    # deviations clipped at 4 scales, so an outlier cannot inflate the scale it is measured by
    d = v - slow
    ad, af = abs(d), abs(r_fast)
    if n < g.warmup:
        a = 1.0 / (n + 1)
        fg.fdev = fg.fabs = fg.fdev + a * (af - fg.fdev)
        fg.slow = slow + a * d
        fg.sdev = fg.sabs = fg.sdev + a * (ad - fg.sdev)
    else:
        a = 1.0 / (n + 1)
        a_scale = a if a > g.alpha_scale else g.alpha_scale
        a_slow = a if a > g.alpha_slow else g.alpha_slow
        cf, cs = 4.0 * s_fast, 4.0 * s_slow
        fg.fdev += a_scale * ((af if af < cf else cf) - fg.fdev)
        fg.fabs += a_scale * (af - fg.fabs)
        dc = d if ad < cs else (cs if d > 0.0 else -cs)
        fg.slow = slow + a_slow * dc
        fg.sdev += a_scale * ((ad if ad < cs else cs) - fg.sdev)
        fg.sabs += a_scale * (ad - fg.sabs)
    fg.fast = fast + g.alpha_fast * r_fast
    a = 1.0 / n
    a = a if a > g.alpha_slow else g.alpha_slow
    fg.changes += a * ((1.0 if diff != 0.0 else 0.0) - fg.changes)
    fg.missing -= g.alpha_slow * fg.missing
    fg.last = v
    fg.n = n + 1
    fg.nulls = 0


def _categorical(g: GatePolicy, st: GateState, name: str, v: str, out: list[Finding]) -> None:
    cg = st.cats.get(name)
    if cg is None:
        if len(st.cats) >= MAX_FIELDS or len(name) > MAX_NAME:
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


def _rules(g: GatePolicy, event: Event) -> list[Finding]:
    """The user rules' findings. They run before any state changes, so one that raises leaves
    the key's state as it was (the runtime dead-letters the event)."""
    findings: list[Finding] = []
    for rule in g.rules:
        hit = rule.when(event)
        if hit:
            s = float(rule.score if hit is True else hit)
            if s != s:
                msg = f"rule {rule.name!r} returned NaN"
                raise ValueError(msg)
            findings.append(Finding("rule", rule.field, max(0.0, min(1.0, s)), None, None,
                                    rule.name))
    return findings


def observe(g: GatePolicy, st: GateState, event: Event) -> Verdict:
    """Score one event of a key and decide whether it escalates; updates `st` in place."""
    ruled = _rules(g, event)
    ts = event.ts
    if not -math.inf < ts < math.inf:
        msg = f"event time {ts!r} of key {event.key!r} is not a finite number"
        raise ValueError(msg)
    findings: list[Finding] = []
    if st.n > 0:
        dt = ts - st.last_ts
        if st.n >= g.warmup and st.dt > 0.0:
            lo, hi = g.gap  # 0 at lo, 0.5 halfway, then rising as other findings do
            mid = 0.5 * (lo + hi)
            u = dt / st.dt
            # gaps this long recur in this key (a device that sleeps, a batch upload): the bar
            # rises to clear them, and relaxes while they stop recurring
            bar = g.cusum_ratio * st.gmax
            bar = bar if bar > mid else mid
            s = _past(u / bar, (hi - lo) / (2.0 * mid))
            if s > 0.0:
                findings.append(Finding("gap", "*", s, dt, st.dt,
                                        f"{dt:.0f}s since previous event"))
            if u > lo and u > st.gmax:
                st.gmax = u
        st.gmax -= g.decay * st.gmax
        if dt > 0.0:
            st.dt = dt if st.dt == 0.0 else st.dt + 0.05 * (min(dt, 10.0 * st.dt) - st.dt)
    st.last_ts = ts
    st.n += 1
    learn = not st.open
    only = g.fields
    skip = _frames(g, st, event.images, findings) if event.images else ()
    for name, v in event.payload.items():
        if only is not None and name not in only:
            continue
        if skip and name in skip:  # an image's reference: judged as a frame, not a category
            continue
        if v.__class__ is float or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            if -MAX_ABS <= v <= MAX_ABS:  # False for NaN; exact for an int of any size
                fg = st.fields.get(name)
                if fg is None:
                    if len(st.fields) >= MAX_FIELDS or len(name) > MAX_NAME:
                        continue
                    fg = st.fields[name] = FieldGate()
                _numeric(g, fg, name, float(v), ts, st.dt, learn, findings)
                continue
            v = None  # NaN, ±inf or too large to fold in: missing
        if v is None:
            fg = st.fields.get(name)
            if fg is not None and not fg.counter:
                fg.nulls += 1
                if fg.nulls == 1 and fg.n >= g.warmup and fg.missing <= g.max_missing:
                    findings.append(Finding("dropout", name, g.dropout, None, fg.fast,
                                            "value missing"))
                fg.missing += g.alpha_slow * (1.0 - fg.missing)
        elif isinstance(v, str):
            _categorical(g, st, name, v, findings)
        elif isinstance(v, bool):
            _categorical(g, st, name, "true" if v else "false", findings)
    findings.extend(ruled)
    return _hysteresis(g, st, findings)


def _frames(g: GatePolicy, st: GateState, images, out: list[Finding]) -> set[str]:
    """A finding for each frame unlike every frame its field has shown lately: a categorical
    field's `new_value`, for images. A field remembers its FRAMES most shown frames (digest
    prefix, fingerprint, a count that decays like the gate's levels), so a scene coming back
    after a passing change is not news again, and a new scene stops being news once it stays.
    Unlike: another image, or with `near_identical` set, one further than that many grey
    levels from it. The field's first frame only starts its memory. Returns the image fields."""
    fields = set()
    for img in images:
        fields.add(img.field)
        seen = st.frames.get(img.field)
        if seen is None:
            if len(st.frames) < MAX_FIELDS:
                st.frames[img.field] = [(img.digest[:16], img.fingerprint, 1.0)]
            continue
        digest, near = img.digest[:16], g.near_identical
        hit = next((i for i, (d, fp, _) in enumerate(seen)
                    if d == digest or (near is not None and img.near(fp, near))), None)
        seen[:] = [(d, fp, w * (1.0 - g.decay)) for d, fp, w in seen]
        if hit is None:
            d = min(img.distance(fp) for _, fp, _ in seen)
            out.append(Finding("frame_change", img.field, g.frame_change, img.ref, None,
                               f"frame unlike any lately: up to {d} grey levels from the closest"))
            if len(seen) >= FRAMES:
                seen.remove(min(seen, key=lambda f: f[2]))
            seen.append((digest, img.fingerprint, 1.0))
        else:
            d, fp, w = seen[hit]
            seen[hit] = (d, fp, w + 1.0)
    return fields


def _hysteresis(g: GatePolicy, st: GateState, findings: list[Finding]) -> Verdict:
    score = float(max((f.score for f in findings), default=0.0))  # a policy may give ints
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
        if why == "incident opened":
            # an incident is less news in a key that has had others lately (an anomaly
            # likelihood: what is routine for this key ranks below what is rare for another);
            # its follow-ups keep the scale its onset set
            st.scale = 1.0 / (1.0 + st.onsets)
            st.onsets += 1.0
        news = g.open + (score - g.open) * st.scale
    else:
        news = min(score, _UNDER_OPEN * g.open)  # an event not escalated never outranks one that is
    st.onsets -= g.decay * st.onsets
    findings.sort(key=lambda f: -f.score)
    return Verdict(score, escalate, findings, why, news=news)

"""Gate: should this event pay for reasoning? A cheap per-key surprise score in [0, 1].

Signals per numeric field, each scored by a linear ramp between "normal" and "certainly odd":

* spike: the value leaves the field's decaying envelope (its recent range) by several sd. An
  envelope, unlike a plain z-score, learns that a square wave's two levels are both normal.
* rate: a step larger than any recent step (decaying max of |diff|).
* level_shift / drift: two-sided CUSUM of the deviation from a slow mean, in units of the slow
  sd. Seasonal swings inflate that sd, so a daily cycle does not accumulate.
* stuck: the value repeats exactly for many events while the field normally changes.
* dropout: a normally present numeric field goes missing.
Per categorical field: a value never seen before (after warm-up). Plus a gap in event time, and
user rules over the event.

Hysteresis: the first event over `open` opens an incident and escalates. While the incident
is open, the gate escalates again only for a clearly higher score, a new kind of finding or
after `cooldown` events; `quiet` events under `close` end the incident.

>>> from ponder.types import Event, SourcePos
>>> g, st = GatePolicy(), new_state()
>>> vs = [10.0 + (i % 5) * 0.1 for i in range(200)] + [25.0]
>>> out = [observe(g, st, Event("k", i, {"v": v}, SourcePos("t", 0, i))) for i, v in enumerate(vs)]
>>> sum(v.escalate for v in out), out[-1].escalate, out[-1].findings[0].kind
(1, True, 'spike')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from ponder.types import Event, Finding

__all__ = ["GatePolicy", "GateState", "Rule", "Verdict", "new_state", "observe"]


@dataclass(frozen=True)
class Rule:
    """A user rule: `when(event)` true (or a float score) flags the event."""

    name: str
    when: Callable[[Event], bool | float]
    score: float = 1.0
    field: str = "*"


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds of the gate. Defaults were tuned on NAB (see benchmarks/nab_gate.py)."""

    warmup: int = 30  # events of a field before its numeric signals score
    open: float = 0.5  # score that opens an incident
    close: float = 0.2  # score under which an incident quiets down
    quiet: int = 20  # events under `close` that end an incident
    cooldown: int = 200  # events between repeat escalations within one incident
    renotify: float = 0.3  # score increase over the incident's peak that escalates again
    alpha_slow: float = 0.01
    alpha_fast: float = 0.2
    envelope_decay: float = 0.002
    spike: tuple[float, float] = (1.0, 4.0)  # sd outside the envelope: score 0 .. 1
    rate: tuple[float, float] = (1.3, 3.0)  # |diff| / decaying max |diff|
    cusum_k: float = 1.5  # slack, in slow sd
    cusum: tuple[float, float] = (12.0, 40.0)  # CUSUM sum: score 0 .. 1
    stuck: tuple[int, int] = (12, 60)  # identical repeats: score 0.5 .. 1
    stuck_min_change: float = 0.8  # fraction of steps that change, for a field to "normally vary"
    gap: tuple[float, float] = (6.0, 20.0)  # event interval / typical interval
    new_value: float = 0.7
    dropout: float = 0.6
    rules: tuple[Rule, ...] = ()
    fields: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.close < self.open <= 1.0:
            msg = f"GatePolicy needs 0 <= close < open <= 1, got close={self.close} open={self.open}"
            raise ValueError(msg)


class FieldGate(msgspec.Struct, array_like=True):
    n: int = 0
    slow: float = 0.0
    var: float = 0.0
    fast: float = 0.0
    hi: float = -math.inf
    lo: float = math.inf
    dmax: float = 0.0
    last: float = 0.0
    cpos: float = 0.0
    cneg: float = 0.0
    changes: float = 0.0  # EWMA of "the value changed this step"
    run: int = 0
    nulls: int = 0


class GateState(msgspec.Struct):
    n: int = 0
    dt: float = 0.0
    last_ts: float = 0.0
    fields: dict[str, FieldGate] = {}
    seen: dict[str, list[str]] = {}
    open: bool = False
    peak: float = 0.0
    quiet_run: int = 0
    last_escalation: int = -1
    kinds: list[str] = []


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


def _numeric(g: GatePolicy, fg: FieldGate, name: str, v: float, out: list[Finding]) -> None:
    """Score one numeric value against the field's state, then fold it in."""
    if fg.n == 0:
        fg.slow = fg.fast = fg.hi = fg.lo = fg.last = v
        fg.n = 1
        return
    sd = math.sqrt(fg.var) + 1e-9 * (abs(fg.slow) + 1.0)
    diff = v - fg.last
    adiff = abs(diff)
    if fg.n >= g.warmup:
        outside = max(v - fg.hi, fg.lo - v, 0.0) / max(sd, (fg.hi - fg.lo) * 0.05, 1e-12)
        s = _ramp(outside, *g.spike)
        if s > 0.0:
            out.append(Finding("spike", name, s, v, fg.slow, f"{outside:.1f} sd outside recent range"))
        if fg.dmax > 0.0:
            s = _ramp(adiff / fg.dmax, *g.rate)
            if s > 0.0:
                out.append(Finding("rate", name, s, v, fg.last, f"step {diff:+.4g} vs max {fg.dmax:.4g}"))
        z = (v - fg.slow) / sd
        fg.cpos = max(0.0, fg.cpos + z - g.cusum_k)
        fg.cneg = max(0.0, fg.cneg - z - g.cusum_k)
        c = max(fg.cpos, fg.cneg)
        s = _ramp(c, *g.cusum)
        if s > 0.0:
            kind = "drift" if abs(fg.fast - fg.slow) < 3.0 * sd else "level_shift"
            out.append(Finding(kind, name, s, v, fg.slow, f"cusum {c:.0f}, mean {fg.fast:.4g} vs {fg.slow:.4g}"))
    if diff == 0.0:
        fg.run += 1
        lo, hi = g.stuck
        if fg.run >= lo and fg.changes >= g.stuck_min_change * 0.5 and fg.n >= g.warmup:
            s = 0.5 + 0.5 * min(1.0, (fg.run - lo) / max(1, hi - lo))
            out.append(Finding("stuck", name, s, v, None, f"same value {fg.run + 1} times"))
    else:
        fg.run = 0
    # Step 2: fold the value in. Deviations are clipped at 4 sd so an outlier cannot inflate
    # the variance it is measured against.
    a = g.alpha_slow
    d = v - fg.slow
    if fg.n > g.warmup:
        d = max(-4.0 * sd, min(4.0 * sd, d))
        fg.slow += a * d
        fg.var = (1.0 - a) * (fg.var + a * d * d)
    else:
        w = 1.0 / (fg.n + 1)  # plain running mean/variance until the EWMA has history
        fg.slow += w * d
        fg.var = (1.0 - w) * (fg.var + w * d * d)
    fg.fast += g.alpha_fast * (v - fg.fast)
    decay = g.envelope_decay
    fg.hi = v if v > fg.hi else fg.hi - decay * (fg.hi - fg.slow)
    fg.lo = v if v < fg.lo else fg.lo - decay * (fg.lo - fg.slow)
    fg.dmax = adiff if adiff > fg.dmax else fg.dmax * (1.0 - decay)
    fg.changes += a * ((1.0 if diff != 0.0 else 0.0) - fg.changes)
    fg.last = v
    fg.n += 1
    fg.nulls = 0


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
            v = str(v).lower()
        if isinstance(v, (int, float)) and math.isfinite(v):
            fg = st.fields.get(name)
            if fg is None:
                if len(st.fields) >= 32:
                    continue
                fg = st.fields[name] = FieldGate()
            _numeric(g, fg, name, float(v), findings)
        elif v is None or isinstance(v, float):
            fg = st.fields.get(name)
            if fg is not None and fg.n >= g.warmup:
                fg.nulls += 1
                if fg.nulls == 1:
                    findings.append(Finding("dropout", name, g.dropout, None, fg.slow, "value missing"))
        elif isinstance(v, str):
            seen = st.seen.get(name)
            if seen is None:
                if len(st.seen) >= 32:
                    continue
                seen = st.seen[name] = []
            if v not in seen:
                if st.n > g.warmup:
                    findings.append(Finding("new_value", name, g.new_value, v[:64], None,
                                            "value never seen before"))
                if len(seen) < 64:
                    seen.append(v[:64])
    for rule in g.rules:
        hit = rule.when(event)
        if hit:
            s = rule.score if hit is True else float(hit)
            findings.append(Finding("rule", rule.field, min(1.0, s), None, None, rule.name))
    return _hysteresis(g, st, findings)


def _hysteresis(g: GatePolicy, st: GateState, findings: list[Finding]) -> Verdict:
    score = max((f.score for f in findings), default=0.0)
    escalate = False
    why = ""
    if score >= g.open:
        kinds = sorted({f"{f.kind}:{f.field}" for f in findings if f.score >= g.open})
        if not st.open:
            st.open, st.peak, st.kinds = True, score, kinds
            escalate, why = True, "incident opened"
        else:
            new = [k for k in kinds if k not in st.kinds]
            if new:
                st.kinds.extend(new)
                escalate, why = True, "new finding " + ",".join(new)
            elif score >= st.peak + g.renotify:
                escalate, why = True, f"score rose {st.peak:.2f}->{score:.2f}"
            elif st.n - st.last_escalation >= g.cooldown:
                escalate, why = True, "incident persists"
            st.peak = max(st.peak, score)
        st.quiet_run = 0
    elif st.open:
        if score < g.close:
            st.quiet_run += 1
            if st.quiet_run >= g.quiet:
                st.open, st.peak, st.kinds, st.quiet_run = False, 0.0, [], 0
        else:
            st.quiet_run = 0
    if escalate:
        st.last_escalation = st.n
    findings.sort(key=lambda f: -f.score)
    return Verdict(score, escalate, findings, why)

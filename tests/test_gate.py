"""The gate: what it escalates, what it leaves alone, hysteresis, bounded state, policy checks."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest

from ponder.operators.gate import GatePolicy, GateState, Rule, Verdict, new_state, observe
from ponder.types import Event, SourcePos

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def run(values: list[Any], *, dt: float = 60.0, field: str = "v", g: GatePolicy | None = None,
        st: GateState | None = None, extra: dict[str, Any] | None = None,
        start: int = 0) -> list[Verdict]:
    """Feed one key `values` of one field (or whole payload dicts), one event every `dt` s."""
    g = g or GatePolicy()
    st = st if st is not None else new_state()
    out = []
    for i, v in enumerate(values, start):
        payload = v if isinstance(v, dict) else {field: v, **(extra or {})}
        out.append(observe(g, st, Event("k", T0 + i * dt, payload, SourcePos("t", 0, i))))
    return out


def escalations(out: list[Verdict]) -> list[tuple[int, str]]:
    """(index, top finding kind) of each escalated event."""
    return [(i, v.findings[0].kind) for i, v in enumerate(out) if v.escalate]


def noise(n: int, seed: int = 1, mu: float = 10.0, sd: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mu, sd) for _ in range(n)]


# --- what it catches --------------------------------------------------------------------------


def test_spike() -> None:
    vals = noise(500)
    vals[400] += 10.0
    assert escalations(run(vals)) == [(400, "spike")]


def test_spike_below_the_noise_is_not_one() -> None:
    vals = noise(500)
    vals[400] = 13.5  # 3.5 sd
    assert escalations(run(vals)) == []


def test_level_shift_escalates_once() -> None:
    vals = noise(400) + noise(2000, seed=2, mu=18.0)
    out = run(vals)
    assert escalations(out) == [(400, "spike")]
    kinds = {f.kind for f in out[400].findings}
    assert kinds >= {"spike"}
    # the shift is a CUSUM finding too while it builds, in the same incident
    assert any(f.kind == "level_shift" for v in out[400:420] for f in v.findings)


def test_drift() -> None:
    # 12 sd over 200 events, then stays: caught while it ramps, a few times at most
    vals = noise(500) + [x + 12.0 * (i + 1) / 200 for i, x in enumerate(noise(200, seed=3))] \
        + noise(1000, seed=4, mu=22.0)
    esc = escalations(run(vals))
    assert esc and 500 <= esc[0][0] < 700 and esc[0][1] in ("drift", "level_shift")
    assert len(esc) <= 3


def test_stuck() -> None:
    g = GatePolicy()
    vals = noise(300) + [10.5] * 100 + noise(300, seed=5)
    out = run(vals, g=g)
    # the value repeats from index 300; the run reaches stuck[0] repeats at index 300 + stuck[0]
    assert escalations(out) == [(300 + g.stuck[0], "stuck")]
    assert out[300 + g.stuck[0]].findings[0].score == 0.5


def test_a_field_that_rarely_changes_is_not_stuck() -> None:
    rng = random.Random(6)
    vals = [float(rng.random() < 0.05) for _ in range(3000)]  # mostly 0, an occasional 1
    assert all(k != "stuck" for _, k in escalations(run(vals)))


@pytest.mark.parametrize("missing", [None, math.nan])
def test_dropout(missing: float | None) -> None:
    vals: list[Any] = noise(300)
    vals[200] = missing
    out = run(vals)
    assert escalations(out) == [(200, "dropout")]
    assert out[200].findings[0].field == "v"


def test_a_field_often_missing_does_not_drop_out() -> None:
    vals: list[Any] = noise(2000)
    for i in range(0, 2000, 7):
        vals[i] = None
    assert escalations(run(vals)) == [(7 * 5, "dropout")]  # learnt after the first few


def test_new_categorical_value() -> None:
    payloads = [{"v": x, "status": "ok"} for x in noise(200)]
    payloads[150]["status"] = "sensor_fault"
    out = run(payloads)
    assert escalations(out) == [(150, "new_value")]
    assert out[150].findings[0].value == "sensor_fault"
    # seen once, it is no longer new
    payloads[180]["status"] = "sensor_fault"
    assert escalations(run(payloads)) == [(150, "new_value")]


def test_identifiers_are_not_new_values() -> None:
    payloads = [{"v": x, "request": f"req-{i}", "ok": True} for i, x in enumerate(noise(500))]
    assert escalations(run(payloads)) == []


def test_gap() -> None:
    g, st = GatePolicy(), new_state()
    out = run(noise(100), st=st, g=g)
    # the next event comes 30 intervals late
    late = observe(g, st, Event("k", T0 + 130 * 60.0, {"v": 10.0}, SourcePos("t", 0, 100)))
    assert escalations(out) == []
    assert late.escalate and late.findings[0].kind == "gap"
    # 31 intervals against the bar halfway between gap=(6, 20): past it, rising towards 1
    assert late.findings[0].score == pytest.approx(1.0 - 0.5 * math.exp(-(31 / 13 - 1) / (7 / 13)))


def test_rule() -> None:
    g = GatePolicy(rules=(Rule("too hot", lambda e: e.payload["v"] > 12.5, field="v"),
                          Rule("a bit cold", lambda e: 0.3 if e.payload["v"] < 7.5 else 0.0)))
    vals = [10.0 + max(-2.0, min(2.0, x - 10.0)) for x in noise(300)]
    vals[150], vals[200] = 12.6, 7.4  # within the noise, but past what the rules allow
    out = run(vals, g=g)
    assert escalations(out) == [(150, "rule")]
    assert out[150].findings[0].detail == "too hot" and out[150].findings[0].field == "v"
    assert not out[200].escalate and out[200].score == pytest.approx(0.3)
    assert [(f.kind, f.score) for f in out[200].findings if f.kind == "rule"] == [("rule", 0.3)]


def test_counters_and_clocks_are_not_scored() -> None:
    payloads = [{"v": x, "seq": i, "uptime": 1000.0 + 60.0 * i} for i, x in enumerate(noise(600))]
    payloads[500]["seq"] = 3  # a counter reset
    assert escalations(run(payloads)) == []


# --- what it leaves alone ---------------------------------------------------------------------


def test_silent_on_long_stationary_noise() -> None:
    assert escalations(run(noise(100_000, seed=11))) == []


def test_heavy_tailed_noise_is_learnt() -> None:
    """1% of the readings 8 times as noisy: outliers that recur are routine, so only the more
    extreme of them escalate (a fixed 4-sd threshold would fire on about 120)."""
    rng = random.Random(12)
    vals = [10.0 + rng.gauss(0, 1) * (8.0 if rng.random() < 0.01 else 1.0) for _ in range(20_000)]
    assert len(escalations(run(vals))) <= 20


@pytest.mark.parametrize("period", [24, 100, 288, 500])
def test_silent_on_a_clean_square_wave(period: int) -> None:
    """Every 5 minutes; 500 does not divide a day, so the daily profile must not be trusted."""
    vals = [20.0 if (i // (period // 2)) % 2 == 0 else 80.0 for i in range(20 * period)]
    # the first rise is news (once warm); after both levels were seen a return is not
    first = period // 2
    assert escalations(run(vals, dt=300.0)) == ([(first, "spike")] if first >= 30 else [])


@pytest.mark.parametrize("period", [24, 100, 288])
def test_silent_on_a_sine(period: int) -> None:
    vals = [50.0 + 10.0 * math.sin(2 * math.pi * i / period) for i in range(40 * period)]
    # the first swing may look like a drift; after two periods it is known
    assert [e for e in escalations(run(vals, dt=300.0)) if e[0] >= 2 * period] == []


def test_daily_cycle_is_learnt_and_a_missing_peak_caught() -> None:
    """5-minute readings of a daily square wave with noise; day 10 has no peak."""
    rng = random.Random(13)
    day = 288
    vals = [(80.0 if 96 <= i % day < 216 else 20.0) + rng.gauss(0, 1.5) for i in range(14 * day)]
    for i in range(10 * day + 96, 10 * day + 216):
        vals[i] = 20.0 + rng.gauss(0, 1.5)
    esc = escalations(run(vals, dt=300.0))
    assert esc[0] == (96, "spike")  # the very first rise, before anything was learnt
    assert [e for e in esc[1:] if not 10 * day + 96 <= e[0] < 10 * day + 216] == []
    assert len(esc) >= 2  # and the missing peak


def test_spike_train_is_routine_but_a_burst_is_not() -> None:
    vals = [20.0 if i % 100 in (0, 6) else 0.0 for i in range(4000)]
    for i in (2005, 2010, 2015):
        vals[i] = 20.0
    esc = escalations(run(vals, dt=300.0))
    assert esc[0] == (100, "spike")  # the first of the train
    assert [e for e in esc[1:] if not 2000 <= e[0] <= 2016] == []
    assert any(k == "rate" for i, k in esc if 2000 <= i <= 2016)


# --- hysteresis and cool-down -----------------------------------------------------------------


def test_one_long_incident_escalates_a_few_times() -> None:
    g = GatePolicy()
    vals = noise(500) + [12.5] * 100_000
    esc = escalations(run(vals, g=g))
    first = 500 + g.stuck[0]
    # opened, then re-notified after cooldown, 2 * cooldown, 4 * cooldown, ... events
    expect = [first]
    gap = g.cooldown
    while expect[-1] + gap < len(vals):
        expect.append(expect[-1] + gap)
        gap *= 2
    assert [i for i, _ in esc] == expect
    assert len(esc) == 9 and {k for _, k in esc} == {"stuck"}


def test_cooldown_setting() -> None:
    g = GatePolicy(cooldown=50)
    vals = noise(300) + [12.5] * 400
    esc = [i for i, _ in escalations(run(vals, g=g))]
    first = 300 + g.stuck[0]
    assert esc == [first, first + 50, first + 150, first + 350]


def test_incident_closes_and_a_new_one_escalates() -> None:
    vals = noise(1000)
    vals[200] += 12.0
    vals[800] -= 12.0
    assert escalations(run(vals)) == [(200, "spike"), (800, "spike")]


def test_a_recurring_outlier_is_news_once() -> None:
    """Outliers as large as one seen a little earlier are routine for a while."""
    vals = noise(1000)
    for i in (200, 300, 400):
        vals[i] += 12.0
    assert escalations(run(vals)) == [(200, "spike")]


def test_a_new_field_in_an_open_incident_escalates() -> None:
    payloads = [{"a": x, "b": y} for x, y in zip(noise(400, seed=1), noise(400, seed=2))]
    payloads[300]["a"] += 12.0
    payloads[301]["b"] = None
    out = run(payloads)
    assert escalations(out) == [(300, "spike"), (301, "dropout")]
    assert out[301].reason.startswith("new finding")


# --- state ------------------------------------------------------------------------------------


def test_state_is_bounded() -> None:
    """100k events over a year at 5-minute intervals: the seasonal profiles fill, then stop."""
    g, st = GatePolicy(), new_state()
    enc = msgspec.msgpack.Encoder()
    rng = random.Random(21)
    sizes = {}
    for i in range(100_000):
        payload = {"v": 10.0 + math.sin(i / 40.0) + rng.gauss(0, 0.5), "status": "ok"}
        observe(g, st, Event("k", T0 + 300.0 * i, payload, SourcePos("t", 0, i)))
        if i + 1 in (50_000, 100_000):
            sizes[i + 1] = len(enc.encode(st))
    assert sizes[100_000] < 16_000
    assert sizes[100_000] - sizes[50_000] < 64  # only counters grow, by a digit at most


def test_many_fields_and_values_are_capped() -> None:
    g, st = GatePolicy(), new_state()
    for i in range(300):
        payload = {f"f{j}": float(i + j) for j in range(50)}
        payload.update({f"c{j}": f"value-{i}" for j in range(50)})
        observe(g, st, Event("k", T0 + i, payload, SourcePos("t", 0, i)))
    assert len(st.fields) == 32 and len(st.cats) == 32
    assert all(len(c.seen) <= 32 for c in st.cats.values())


def test_state_round_trips_through_msgpack() -> None:
    g = GatePolicy()
    vals = [10.0 + math.sin(i / 30.0) + 0.1 * (i % 7) for i in range(3000)]
    vals[2500] = 20.0
    st = new_state()
    run(vals[:2000], g=g, dt=300.0, st=st)
    st2 = msgspec.msgpack.decode(msgspec.msgpack.encode(st), type=GateState)
    assert st2 == st
    a = run(vals[2000:], g=g, dt=300.0, st=st, start=2000)
    b = run(vals[2000:], g=g, dt=300.0, st=st2, start=2000)
    assert [(v.score, v.escalate) for v in a] == [(v.score, v.escalate) for v in b]
    assert any(v.escalate for v in a)


def test_scores_are_in_range() -> None:
    rng = random.Random(31)
    vals: list[Any] = [rng.choice([rng.gauss(0, 1), rng.gauss(0, 100), None, 1e300, -1e300])
                       for _ in range(2000)]
    for v in run(vals):
        assert 0.0 <= v.score <= 1.0
        assert all(0.0 <= f.score <= 1.0 for f in v.findings)


# --- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"open": 0.2, "close": 0.5}, "close < open"),
    ({"open": 1.5}, "close < open"),
    ({"warmup": 0}, "warmup"),
    ({"cooldown": 0}, "cooldown"),
    ({"alpha_fast": 0.0}, "alpha_fast"),
    ({"decay": 1.0}, "decay"),
    ({"spike_z": -1.0}, "spike_z"),
    ({"spike_ratio": 0.5}, "spike_ratio"),
    ({"width": 0.0}, "width"),
    ({"seasons": ((0.0, 24),)}, "season"),
    ({"seasons": ((86400.0, 0),)}, "season"),
    ({"stuck": (10, 5)}, "stuck"),
    ({"gap": (0.5, 2.0)}, "gap"),
    ({"dropout": 2.0}, "dropout"),
])
def test_invalid_policy(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GatePolicy(**kwargs)


def test_no_seasons() -> None:
    vals = noise(3000)
    vals[2000] += 10.0
    assert escalations(run(vals, g=GatePolicy(seasons=()), dt=300.0)) == [(2000, "spike")]


def test_fields_filter() -> None:
    payloads = [{"a": x, "b": x} for x in noise(300)]
    payloads[200] = {"a": 10.0, "b": 99.0}
    assert escalations(run(payloads, g=GatePolicy(fields=("a",)))) == []
    assert escalations(run(payloads)) == [(200, "spike")]


def test_scores_past_the_bar_keep_ranking():
    """A statistic at u times its bar scores 0 up to 1 - width, 0.5 at the bar, and then keeps
    rising without reaching 1: one far past its bar outranks one just past it."""
    from ponder.operators.gate import _past

    w = 0.5
    assert [_past(u, w) for u in (0.0, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.25, 0.5]
    past = [_past(1.0 + k / 10, w) for k in range(1, 40)]
    assert all(0.5 < a < b < 1.0 for a, b in zip(past, past[1:]))
    assert _past(1.5, w) == pytest.approx(1.0 - 0.5 * math.exp(-1.0))


def test_an_incident_is_less_news_in_a_key_that_had_others_lately():
    """Surprise: an escalation's score, shrunk towards `open` by the key's recent incidents;
    under `open` for every other event; the score itself is unchanged."""
    g = GatePolicy(quiet=5, fields=(), rules=(Rule("hot", lambda e: e.payload["v"] > 30.0, score=0.8),))
    st = new_state()
    out = []
    for i in range(400):
        v = 10.0 + (40.0 if i in (200, 260, 320) else 0.0)
        out.append(observe(g, st, Event("k", float(i), {"v": v}, SourcePos("t", 0, i))))
    onsets = [(i, o) for i, o in enumerate(out) if o.reason == "incident opened"]
    assert [i for i, _ in onsets] == [200, 260, 320]
    first, second, third = (o for _, o in onsets)
    assert first.surprise == first.score
    recent = (1.0 - g.decay) ** 60  # the first onset, forgotten for 60 events
    assert second.surprise == pytest.approx(g.open + (second.score - g.open) / (1.0 + recent))
    assert g.open <= third.surprise < third.score
    assert all(o.surprise < g.open for o in out if not o.escalate)


def test_follow_ups_keep_the_share_their_incident_opened_with():
    g = GatePolicy(quiet=5, cooldown=1, fields=(), rules=(Rule("hot", lambda e: e.payload["v"] > 30.0, score=0.8),))
    st = new_state()
    hot = {100, 101, 200, 201}
    out = [observe(g, st, Event("k", float(i), {"v": 50.0 if i in hot else 10.0}, SourcePos("t", 0, i)))
           for i in range(300)]
    assert [(i, o.reason) for i, o in enumerate(out) if o.escalate] == [
        (100, "incident opened"), (101, "incident persists"), (200, "incident opened"), (201, "incident persists")]
    assert out[100].surprise == out[101].surprise == 0.8  # the key's first incident
    share = 1.0 / (1.0 + (1.0 - g.decay) ** 100)  # the first incident, 100 events ago
    assert out[200].surprise == out[201].surprise == pytest.approx(g.open + 0.3 * share)


def test_gaps_that_recur_raise_the_gap_bar():
    """A key that goes quiet for ~20 intervals now and then: the first such gap is news, the
    ones like it after are not, and a much longer one still is."""
    g = GatePolicy(fields=(), quiet=5)
    st = new_state()
    t, out = 0.0, {}
    for i in range(600):
        t += 20 * 60.0 if i in (100, 200, 300) else (200 * 60.0 if i == 400 else 60.0)
        out[i] = observe(g, st, Event("k", t, {}, SourcePos("t", 0, i)))
    gaps = {i: out[i].escalate for i in (100, 200, 300, 400)}
    assert gaps == {100: True, 200: False, 300: False, 400: True}
    assert out[400].findings[0].kind == "gap" and "12000s since previous event" in out[400].findings[0].detail

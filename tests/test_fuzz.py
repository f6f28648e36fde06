"""Poison records: generated streams of valid and broken records through a real Worker
(decode → observe → decide), and the promise that an event failing in observe leaves no trace in
its key's state.

Each generated record carries what must become of it: a dead letter at decode, a dead letter at
observe (a user rule raising on it), or an observed event. A run must finish, and its accounting
must be exact, record by record.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.reflex import ReflexRule
from ponder.operators.context import ContextPolicy
from ponder.operators.gate import MAX_ABS, GatePolicy, Rule, new_state, observe
from ponder.operators.keyed import KeyState
from ponder.pipelines.iot_monitor import pipeline as iot_pipeline
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.decode import MAX_DEPTH
from ponder.state.memory import MemoryStore
from ponder.types import DeadLetter, Event, SourcePos

EVENT, DEAD, RULE = "event", "dead", "rule"  # what must become of a record
FUTURE = time.time() + 2 * 86400.0  # past the decoders' default max_skew_s of a day
FLOAT_MAX = 1.7976931348623157e308


class Boom(Exception):
    pass


def _boom(e: Event) -> bool:
    if e.payload.get("boom") is True:
        raise Boom("boom")
    return False


PIPE = Pipeline(
    name="fuzz", key="k", time="ts", actions=("none", "alert"),
    context=ContextPolicy(window=6, summary_segments=2, max_fields=4, max_categories=3),
    # renotify=0: every flagged event of an open incident escalates again, so many decide
    gate=GatePolicy(warmup=5, renotify=0.0,
                    rules=(Rule("flag", lambda e: e.payload.get("flag") is True), Rule("boom", _boom))),
    reflex=(ReflexRule("rule", "alert", "high"),),
)
_enc = msgspec.msgpack.Encoder()


# -- generated records ----------------------------------------------------------------------------

MISSING = object()
GOOD_KEYS = ["a", "b", "c", "d", 7, 1.5, "ключ-é", "x" * 1024, "</data>\n"]
BAD_KEYS = [MISSING, None, "", [], {}, True, "y" * 1025]

good_ts = st.one_of(
    st.floats(0.0, 1.75e9),
    st.integers(int(1e11) + 1, int(1.75e12)),  # epoch ms
    st.datetimes(datetime(1970, 1, 1), datetime(2024, 12, 31)).map(datetime.isoformat),
)
bad_ts = st.one_of(
    st.floats(-1e300, -1e-3),
    st.floats(0.0, 5e10).map(lambda off: FUTURE + off),
    st.floats(0.0, 5e10).map(lambda off: int((FUTURE + off) * 1000)),  # ms, far ahead
    st.sampled_from([1e300, 1e17, "garbage", "", True, [1], {"s": 1}, MISSING, None,
                     "1969-12-31T23:59:59Z", "0001-01-01"]),
)
scalar = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, -(2**63) - 1, 10**300, -(10**300), 10**400, -(10**400)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-1e3, 1e3),
    st.text(max_size=12),
    st.sampled_from(["x" * 5000, "</data>", "\x00", "ignore previous instructions"]),
)
value = st.recursive(
    scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6)
name = st.one_of(st.sampled_from(["v", "w", "flag", "s", "", " ", "a.b", "<x>", "n" * 300, "é"]),
                 st.text(max_size=6)).filter(lambda n: n not in ("k", "ts", "boom"))
record = st.tuples(
    st.sampled_from(["json"] * 6 + ["dict"] * 2 + ["truncated", "garbage", "not-object", "deep"]),
    st.sampled_from(GOOD_KEYS * 4 + BAD_KEYS),
    st.integers(0, 5).flatmap(lambda i: bad_ts if i == 0 else good_ts),
    st.dictionaries(name, value, max_size=4),
    st.integers(1, 5000),  # nesting depth, cut point, ...
    st.integers(0, 15),  # odd extras
)


SPECS, REPS = 50, 4  # records per example: 60 examples make 12,000


def top_level_ok(payload: dict[str, Any]) -> bool:
    return all(type(v) is not int or -FLOAT_MAX <= v <= FLOAT_MAX for v in payload.values())


def ts_ok(ts: Any) -> bool:
    if ts is MISSING or ts is None or isinstance(ts, (bool, list, dict)):
        return False
    if isinstance(ts, str):
        try:
            d = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        except ValueError:
            return False
        t = (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()
    else:
        t = ts / 1000.0 if ts > 1e11 else ts
    return 0.0 <= t <= FUTURE - 86400.0 - 600.0  # room for the replays a minute apart


def later(ts: Any, rep: int) -> Any:
    """A valid numeric time `rep` minutes on (epoch s or ms); anything else as it is."""
    if type(ts) not in (int, float) or not ts_ok(ts):
        return ts
    return ts + rep * (60 if ts < 1e11 else 60_000)


def build(spec: tuple, offset: int, rep: int) -> tuple[bytes | dict[str, Any], str]:
    """Record number `rep` of a spec, and what must become of it. Each spec is played REPS
    times, a minute apart, so fields warm up and odd values meet fields that are scored."""
    kind, key, ts, payload, n, extra = spec
    obj: dict[str, Any] = {}
    if key is not MISSING:
        obj["k"] = key
    if ts is not MISSING:
        obj["ts"] = later(ts, rep)
    obj["v"] = 10.0 + offset % 7  # a plain numeric series, unless the payload has its own v
    obj.update(payload)
    obj["seq"] = offset
    if extra == 15:
        obj["boom"] = True
    elif extra >= 12:
        obj["flag"] = True
    key_ok = any(key is k for k in GOOD_KEYS)
    fate = EVENT if key_ok and ts_ok(obj.get("ts", MISSING)) and top_level_ok(obj) else DEAD
    if fate == EVENT and obj.get("boom") is True:
        fate = RULE
    if kind == "json":
        return msgspec.json.encode(obj), fate
    if kind == "dict":
        # what only parsed records carry: non-finite floats, tuples, int names, bad text, cycles
        if extra == 2:
            obj["nan"], obj["inf"] = math.nan, -math.inf
        elif extra == 3:
            obj["tuple"], obj[3] = (1, (2.5, "x")), "int name"
        elif extra == 4:
            obj["bad"] = "lone \ud800 surrogate"
            fate = DEAD
        elif extra == 5:
            loop: list[Any] = []
            loop.append(loop)
            obj["loop"] = loop
            fate = DEAD
        return obj, fate
    if kind == "truncated":
        raw = msgspec.json.encode(obj)
        return raw[: n % len(raw)], DEAD
    if kind == "garbage":
        return b"\xff" + msgspec.json.encode(obj)[: n % 50], DEAD
    if kind == "not-object":
        return msgspec.json.encode([obj] if extra % 2 else list(obj.values())), DEAD
    # deep: a field nested n levels, beside the record's own object
    depth = n % 40 + 1 if extra < 10 else n  # mostly around the limit, sometimes thousands
    opener, closer = ("[", "]") if extra % 2 else ('{"a":', "}")
    inner = opener * depth + ("" if opener == "[" else "1") + closer * depth
    raw = msgspec.json.encode(obj)[:-1] + b',"deep":' + inner.encode() + b"}"
    return raw, (fate if depth + 1 <= MAX_DEPTH else DEAD)


def run_stream(pipe: Pipeline, items: list[bytes | dict[str, Any]], store: MemoryStore | None = None):
    sink = MemorySink()
    worker = pipe.worker(MemorySource(items, batch=64), sink, store=store or MemoryStore())
    observed: list[int] = []
    inner = worker.logic.observe

    def recording(st: KeyState, ev: Event):
        verdict = inner(st, ev)
        observed.append(ev.source.offset)
        return verdict

    worker.logic.observe = recording  # type: ignore[method-assign]
    stats = asyncio.run(asyncio.wait_for(worker.run(), 60.0))
    return worker, sink, stats, observed


# Streams are reported as generated: shrinking a 50-spec stream takes Hypothesis minutes.
FUZZ = settings(derandomize=True, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@settings(FUZZ, max_examples=60)
@given(st.lists(record, min_size=SPECS, max_size=SPECS))
def test_poison_records_never_stop_the_run_and_every_record_is_accounted_for(specs):
    built = [build(s, rep * SPECS + i, rep) for rep in range(REPS) for i, s in enumerate(specs)]
    items = [b for b, _ in built]
    fates = [f for _, f in built]
    worker, sink, stats, observed = run_stream(PIPE, items)

    dead = {d.stage: [] for d in sink.dead_letters}
    for d in sink.dead_letters:
        dead[d.stage].append(d.source.offset)
        assert d.reason and len(d.reason) <= 500 and len(d.raw) <= 2000
    got = {o: DEAD for o in dead.get("decode", [])}
    got.update({o: RULE for o in dead.get("observe", [])})
    got.update({o: EVENT for o in observed})
    assert [got.get(i) for i in range(len(items))] == fates
    assert set(dead) <= {"decode", "observe"}
    assert all(d.reason == "Boom: boom" for d in sink.dead_letters if d.stage == "observe")
    # exact accounting: in = observed + dead, and the context counted each observed event once
    assert stats.events == len(items) == len(observed) + stats.dead_letters
    assert stats.dead_letters == len(sink.dead_letters) == fates.count(DEAD) + fates.count(RULE)
    assert stats.replayed == 0
    assert stats.decisions == stats.escalations == len(sink.decisions) <= fates.count(EVENT)
    assert {d.source.offset for d in sink.decisions} <= set(observed)
    # the final checkpoint stored every key's state, and it reads back as written
    store = worker.store
    keys = {str(items[o]["k"] if isinstance(items[o], dict) else msgspec.json.decode(items[o])["k"])
            for o in observed}
    counts = 0
    for k in keys:
        raw = store.get(k)
        assert raw is not None
        state = msgspec.msgpack.decode(raw, type=KeyState)
        assert _enc.encode(state) == raw
        counts += state.context.count
    assert counts == len(observed)


def telemetry(spec: tuple, offset: int) -> bytes:
    _, key, ts, payload, n, extra = spec
    obj = {"device_id": key, "ts": ts, "seq": offset,
           "temperature": payload.get("v", 20.0 + n % 7), "status": payload.get("s", "ok")}
    if extra % 3 == 0:
        obj["vibration"] = next(iter(payload.values()), None)
    return msgspec.json.encode({k: v for k, v in obj.items() if v is not MISSING})


@settings(FUZZ, max_examples=10)
@given(st.lists(record, min_size=SPECS, max_size=SPECS))
def test_poison_records_through_the_iot_pipeline(specs):
    """The built-in pipeline, whose schema types the fields: every record is a dead letter at
    decode exactly when the decoder says so on its own, and observed otherwise."""
    items = [telemetry(s, rep * SPECS + i) for rep in range(REPS) for i, s in enumerate(specs)]
    _, decoder, _ = iot_pipeline.build()
    fates = [DEAD if type(decoder(Record(b, SourcePos("memory", 0, i)))) is DeadLetter else EVENT
             for i, b in enumerate(items)]
    _, sink, stats, observed = run_stream(iot_pipeline, items)
    got = {d.source.offset: DEAD for d in sink.dead_letters if d.stage == "decode"}
    got.update({o: EVENT for o in observed})
    assert [got.get(i) for i in range(len(items))] == fates
    assert stats.events == len(items) == len(observed) + stats.dead_letters
    assert stats.decisions == stats.escalations == len(sink.decisions)


# -- an event failing in observe leaves no trace ---------------------------------------------------


def good(seq: int, **extra: Any) -> dict[str, Any]:
    return {"k": "a", "ts": 1_700_000_000 + 60 * seq, "v": 20.0 + (seq % 5) * 0.5, "s": "ok", **extra}


BAD = [
    {"k": "a", "ts": 1e300, "v": 1.0},  # used to fail in context after the gate counted it
    {"k": "a", "ts": -1e15, "v": 1.0},
    {"k": "a", "ts": 1e17, "v": 1.0},
    {"k": "a", "ts": 1_700_000_100, "v": 10**400},
    {"k": "a", "ts": 1_700_000_100, "v": msgspec.json.decode("[" * MAX_DEPTH + "]" * MAX_DEPTH)},
    {"k": "a", "ts": 1_700_000_100, "v": 1.0, "boom": True},  # a user rule raises
]


def key_state(store: MemoryStore) -> KeyState:
    raw = store.get("a")
    assert raw is not None
    return msgspec.msgpack.decode(raw, type=KeyState)


def gate_and_context(s: KeyState) -> bytes:
    return _enc.encode((s.gate, s.context))


@pytest.mark.parametrize("bad", BAD, ids=["ts-1e300", "ts-negative", "ts-1e17", "int-10e400", "deep",
                                          "raising-rule"])
def test_a_failing_event_leaves_no_trace_and_a_replay_counts_nothing_twice(bad):
    goods = [good(i) for i in range(40)]
    ref = MemoryStore()
    run_stream(PIPE, goods, ref)
    store = MemoryStore()
    items = goods[:20] + [bad] + goods[20:]
    _, sink, stats, observed = run_stream(PIPE, items, store)
    assert [d.source.offset for d in sink.dead_letters] == [20]
    assert len(observed) == 40 and stats.dead_letters == 1
    assert gate_and_context(key_state(store)) == gate_and_context(key_state(ref))
    assert key_state(store).context.count == 40
    # the whole stream again over the same store: every record is a replay or a dead letter
    _, _, stats2, observed2 = run_stream(PIPE, items, store)
    assert observed2 == [] and stats2.replayed + stats2.dead_letters == len(items)
    assert gate_and_context(key_state(store)) == gate_and_context(key_state(ref))


def warm_state() -> tuple[KeyState, Any]:
    logic, decoder, _ = PIPE.build()
    state = logic.new_state("a")
    for i in range(60):
        ev = decoder(Record(msgspec.json.encode(good(i, flag=i == 50)), SourcePos("t", 0, i)))
        logic.observe(state, ev)
    return state, logic


@pytest.mark.parametrize(
    ("payload", "ts", "error"),
    [
        ({"v": 1.0, "boom": True}, 1_700_010_000.0, "boom"),  # the rule raises
        ({"v": 1.0}, math.nan, "event time nan of key 'a' is not a finite number"),
        ({"v": 1.0}, math.inf, "event time inf of key 'a' is not a finite number"),
    ],
)
def test_observe_that_raises_leaves_the_state_bit_identical(payload, ts, error):
    state, logic = warm_state()
    before = _enc.encode(state)
    with pytest.raises((Boom, ValueError)) as e:
        logic.observe(state, Event("a", ts, payload, SourcePos("t", 0, 99)))
    assert str(e.value) == error
    assert _enc.encode(state) == before


@pytest.mark.parametrize(
    ("returns", "error"),
    [(math.nan, "rule 'odd' returned NaN"), ("yes", "could not convert string to float: 'yes'")],
)
def test_a_rule_returning_nonsense_raises_before_any_state_changes(returns, error):
    g = GatePolicy(rules=(Rule("odd", lambda e: returns if e.ts == 2.0 else False),))
    st_ = new_state()
    observe(g, st_, Event("a", 1.0, {"v": 1.0}, SourcePos("t", 0, 0)))
    before = _enc.encode(st_)
    with pytest.raises(ValueError) as e:
        observe(g, st_, Event("a", 2.0, {"v": 2.0}, SourcePos("t", 0, 1)))
    assert str(e.value) == error
    assert _enc.encode(st_) == before


# -- the gate on values its statistics cannot hold ---------------------------------------------------


@pytest.mark.parametrize("odd", [math.nan, math.inf, -math.inf, 1.5 * MAX_ABS, -1e300, 10**400, -(10**101)])
def test_gate_takes_unusable_numbers_as_missing(odd):
    """Folding 1e300 into EWMAs overflows them to inf and NaN (and a NaN scale later divides by
    zero): such a value is a missing one, exactly like null."""
    g = GatePolicy(warmup=5)
    states = [new_state(), new_state()]
    verdicts = []
    for st_, last in zip(states, [None, odd]):
        for i in range(40):
            observe(g, st_, Event("a", float(i), {"v": 10.0 + i % 3, "w": 1.0 + i % 2}, SourcePos("t", 0, i)))
        verdicts.append(observe(g, st_, Event("a", 40.0, {"v": last, "w": 1.0}, SourcePos("t", 0, 40))))
    assert verdicts[0] == verdicts[1]
    assert [f.kind for f in verdicts[1].findings] == ["dropout"]
    assert _enc.encode(states[0]) == _enc.encode(states[1])


def test_gate_scores_numbers_up_to_max_abs():
    g = GatePolicy(warmup=5)
    st_ = new_state()
    for i in range(40):
        v = MAX_ABS * (0.5 + 0.1 * (i % 3))
        observe(g, st_, Event("a", float(i), {"v": v}, SourcePos("t", 0, i)))
    fg = st_.fields["v"]
    assert fg.n == 40
    assert all(math.isfinite(x) for x in (fg.fast, fg.slow, fg.fdev, fg.sdev, fg.big))


def test_gate_does_not_keep_overlong_field_names():
    g = GatePolicy()
    st_ = new_state()
    observe(g, st_, Event("a", 1.0, {"n" * 128: 1.0, "m" * 129: 1.0, "s" * 128: "x", "t" * 129: "x"},
                          SourcePos("t", 0, 0)))
    assert list(st_.fields) == ["n" * 128]
    assert list(st_.cats) == ["s" * 128]

"""Per-key logic that the peers of `throughput.py` run, so every processor does the same work.

Imported inside the peers' own virtualenvs (faust, Quix Streams, Bytewax) with `/work/main` and
this folder on PYTHONPATH; it needs only msgspec and ponder's pure operators (no runtime, no
Kafka client).

* `PonderLogic` ("ponder"): ponder's `iot_monitor` per-key logic, unchanged: decode and validate
  the JSON with the pipeline's Decoder, skip a replayed event, `KeyLogic.observe` (gate scoring
  + context update), and for an escalated event `KeyLogic.decide` against the reflex engine,
  which yields the same Decision (JSON) that ponder's worker writes to its decisions topic. The
  state is ponder's `KeyState`; `step` takes and returns it msgpack-encoded (what a RocksDB
  table stores), `step_obj` takes and returns the object (for in-memory state, Bytewax).
* `CounterLogic` ("counter"): decode the JSON, per key count + running mean of temperature,
  emit one small JSON record per event. The workload of KAFKA_TESTING's peer numbers.

Both return `(new_state, output or None)`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

__all__ = ["PonderLogic", "CounterLogic", "make_logic", "first_event_marker"]

_printed = False


def first_event_marker() -> None:
    """Print the wall-clock time of the first processed event once (the harness reads it)."""
    global _printed
    if not _printed:
        _printed = True
        print(f"BENCH first-event {time.time():.6f}", flush=True)


def _run_sync(coro: Any) -> Any:
    """Drive a coroutine that never really suspends (the reflex engine) without a loop."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    msg = "the reflex tier suspended; it is expected to answer synchronously"
    raise RuntimeError(msg)


class PonderLogic:
    name = "ponder"

    def __init__(self) -> None:
        from ponder.connectors.base import Record
        from ponder.operators.keyed import KeyState
        from ponder.pipelines.iot_monitor import pipeline
        from ponder.types import DeadLetter, SourcePos

        self._Record, self._SourcePos, self._DeadLetter = Record, SourcePos, DeadLetter
        self.logic, self.decoder, engines = pipeline.build()
        reflex = engines["reflex"]

        async def call(tier: str, request: Any) -> Any:
            return (await reflex.generate([request]))[0]

        self._call = call
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(KeyState)
        self._json = msgspec.json.Encoder()
        self.dead_letters = 0
        self.decisions = 0

    def step_obj(self, st: Any, value: bytes, topic: str, partition: int, offset: int
                 ) -> tuple[Any, bytes | None]:
        ev = self.decoder(self._Record(value, self._SourcePos(topic, partition, offset)))
        if type(ev) is self._DeadLetter:
            self.dead_letters += 1
            return st, None
        logic = self.logic
        if st is None:
            st = logic.new_state(ev.key)
        if logic.seen(st, ev):
            return st, None
        verdict = logic.observe(st, ev)
        if not verdict.escalate:
            return st, None
        d = _run_sync(logic.decide(st, ev, verdict, self._call))
        self.decisions += 1
        return st, self._json.encode(d)

    def step(self, state: bytes | None, value: bytes, topic: str, partition: int, offset: int
             ) -> tuple[bytes | None, bytes | None]:
        st = self._dec.decode(state) if state is not None else None
        st, out = self.step_obj(st, value, topic, partition, offset)
        return (self._enc.encode(st) if st is not None else state), out


class _Count(msgspec.Struct, array_like=True):
    n: int = 0
    temp_sum: float = 0.0
    temp_n: int = 0
    last_ts: float = 0.0


class _Reading(msgspec.Struct):
    device_id: str
    ts: float
    temperature: float | None = None


class _Out(msgspec.Struct):
    key: str
    n: int
    mean_temperature: float | None
    ts: float


class CounterLogic:
    name = "counter"

    def __init__(self) -> None:
        self._read = msgspec.json.Decoder(_Reading)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(_Count)
        self._json = msgspec.json.Encoder()
        self.dead_letters = 0
        self.decisions = 0

    def step_obj(self, st: _Count | None, value: bytes, topic: str, partition: int, offset: int
                 ) -> tuple[_Count | None, bytes | None]:
        try:
            r = self._read.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.dead_letters += 1
            return st, None
        if st is None:
            st = _Count()
        st.n += 1
        if r.temperature is not None:
            st.temp_sum += r.temperature
            st.temp_n += 1
        st.last_ts = r.ts
        self.decisions += 1
        mean = st.temp_sum / st.temp_n if st.temp_n else None
        return st, self._json.encode(_Out(r.device_id, st.n, mean, r.ts))

    def step(self, state: bytes | None, value: bytes, topic: str, partition: int, offset: int
             ) -> tuple[bytes | None, bytes | None]:
        st = self._dec.decode(state) if state is not None else None
        st, out = self.step_obj(st, value, topic, partition, offset)
        return (self._enc.encode(st) if st is not None else state), out


def make_logic(name: str) -> PonderLogic | CounterLogic:
    if name == "ponder":
        return PonderLogic()
    if name == "counter":
        return CounterLogic()
    msg = f"unknown peer logic {name!r}: expected 'ponder' or 'counter'"
    raise ValueError(msg)

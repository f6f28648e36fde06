"""Run a ponder Pipeline inside a faust-streaming app (`pip install 'ponder[faust]'`).

For a faust user, ponder is one agent in the app they already run:

    import faust
    from ponder.runtime.faust import attach
    from mypipelines import pumps          # a ponder Pipeline

    app = faust.App("pumps", broker="kafka://localhost:9092", store="rocksdb://")
    agent = attach(app, pumps, partitions=16)  # reads pumps.events (16 partitions), writes
                                               # pumps.decisions and pumps.dead-letters

    if __name__ == "__main__":
        app.main()                         # python app.py worker --without-web

`partitions` must be the input topic's partition count (faust co-partitions the state table
with it), and the decisions and dead-letter topics need at least as many: the outputs of input
partition p go to partition p. `ponder worker PIPELINE --runtime faust` builds such an app
itself, creating the topics (`run_worker`).

What runs where. The agent reads the input topic with manual acks. Each record is decoded by
the pipeline's Decoder (a bad one becomes a dead letter, with its reason and position, and the
stream moves on); its key's `KeyState` lives in a faust Table (RocksDB through rocksdict,
backed by the table's changelog topic), msgpack-encoded, under `partition|key`, so a key's
state is per input partition as in the native worker. `KeyLogic.observe` runs inline; an
escalated event opens a lane for its key, a task that awaits `KeyLogic.decide` and then works
through the events of that key that arrived meanwhile, so one key's events stay in order while
other keys go on. Model tiers are called through the same `Batcher` the native worker uses, so
the calls of different keys share batches. Decisions and dead letters are written by ponder's
`KafkaSink` (the native record formats: decision JSON keyed by the stream key on the output
partition numbered like the input partition, `decision_id` / `dead_letter_id` headers).

Guarantees: at-least-once, per input record.
* A record is acked to faust (so its offset may be committed) only once it is finished: its
  decision or dead letter acknowledged by the broker and its key's state written to the table.
  Acks go to faust in offset order per partition, so a commit never skips unfinished work.
* A key's state is written to the table only after the decision it led to is acknowledged, so
  a crash can never leave a state that says "seen" for an event whose decision was lost.
* Duplicates appear when a worker dies (SIGKILL, lost membership) after a decision or dead
  letter was acknowledged but before its record's offset was committed and its key's state
  was written: the record is replayed and decided again. On SIGTERM faust waits for unacked
  records (`stream_wait_empty`) unless it cancels the agent first; a lane cancelled after its
  decision was written replays into a duplicate too. `run_worker` bounds that wait: a worker
  that has not stopped 20 s after the signal exits anyway, which is no worse than a SIGKILL. A copy carries the same `decision_id`
  (a hash of key and source position) or `dead_letter_id` (the position), so a consumer
  drops it by id. Unlike the native worker, which suppresses such copies by reading its
  outputs back on recovery, this runtime does not.
* An event whose key's state already covers it (replayed after the state was written but
  before the offset was committed) is skipped, as in the native worker.
* A key's state reaches the changelog through faust's producer, which faust flushes before
  it commits input offsets (faust 0.15), so a committed record's state survives a move of
  its partition to another worker.
* Not exactly-once: faust's transactions need producer ids, which aiokafka does not get
  from every broker (Tansu), and ponder's outputs go through their own producer.

Not covered (yet): budgets are kept per worker process, not per partition; tracing, metrics
and the trace store are off; the native worker's bound on hot keys does not apply (faust's
table caches what it caches); a partition revoked while its lanes run is drained by faust
before the rebalance (`stream_wait_empty`), or replayed by its next owner if it is not.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faust  # ponder[faust]; imported here so a missing extra fails at import, with its name
import msgspec
from faust.streams import _current_event
from faust.worker import Worker as FaustWorker

from ponder.connectors.base import Record
from ponder.connectors.kafka.sink import KafkaSink
from ponder.inference.engine import Completion, Engine, Request
from ponder.operators.gate import Verdict
from ponder.operators.keyed import KeyState
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.batcher import TierCalls
from ponder.types import DeadLetter, Event, SourcePos

__all__ = ["PonderAgent", "attach", "build_app", "run_worker"]

logger = logging.getLogger(__name__)

_state_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder(KeyState)
_EVERYTHING = 1 << 62  # an offset past any input
_DEAD = object()  # an event that became a dead letter in observe


class PonderAgent:
    """The per-key machinery behind the faust agent; `attach` creates and wires it."""

    def __init__(self, pipe: Pipeline, table: Any, sink: KafkaSink, *,
                 engines: Mapping[str, Engine] | None = None, max_inflight: int | None = None) -> None:
        self.pipe = pipe
        self.logic, self.decoder, self.engines = pipe.build(engines=dict(engines or {}))
        self.table = table
        self.sink = sink
        self.max_inflight = max_inflight or pipe.max_inflight
        self._tiers = TierCalls(pipe.tiers, self.engines, pipe.tenant_weights)  # as the native worker
        self._batchers = self._tiers.batchers
        self._lanes: dict[bytes, tuple[KeyState, deque]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # per input partition: faust events in the order read, and the ids of those finished,
        # by event identity, not offset: faust can deliver one offset twice in one generation
        # (a seek after table recovery, a rejoin), and two finished copies of one offset must
        # not collapse into one entry, or the second copy is never acked and faust's shutdown
        # (`stream_wait_empty`) waits on it forever
        self._pending: dict[int, deque] = {}
        self._finished: dict[int, set[int]] = {}
        self._gen: dict[int, int] = {}  # the consumer generation of each partition's pending records
        self._inflight = 0
        self._capacity = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._failure: BaseException | None = None
        self._stream: Any = None
        self._started = False
        self.app: Any = None  # the faust app (attach sets it): is it stopping, or restarting us?
        # called once when the agent fails (run_worker: stop the whole worker, then raise)
        self.on_failure: Any = None
        self.events = self.decisions = self.dead_letters = self.replayed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._started:
            for e in self.engines.values():
                await e.start()
            self._started = True
        await self.sink.start()

    async def stop(self, *, final: bool = True) -> None:
        """Cancel unfinished lanes (their records were never acked: they are replayed) and
        flush what was written; `final`: close the batchers and engines too (not when faust
        only restarts the agent around a rebalance)."""
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # nothing unacked will be acked now: it is read again from the committed offsets
        for pending in self._pending.values():
            self._abandon(pending)
        self._lanes.clear()
        self._pending.clear()
        self._finished.clear()
        self._gen.clear()
        self._inflight = 0
        closers = [self.sink.stop]
        if final and self._started:
            self._started = False
            await self._tiers.close()
            closers.extend(e.stop for e in self.engines.values())
        for close in closers:
            try:
                await asyncio.wait_for(close(), 15.0)
            except Exception as e:  # noqa: BLE001 - one failing close must not keep the rest open
                logger.warning("closing %s failed: %s: %s", close, type(e).__name__, e)

    async def run(self, stream: Any) -> None:
        """The agent body: every record of `stream` (faust Stream of raw bytes) in turn."""
        self._stream = stream.noack()
        await self.start()
        logger.info("worker for pipeline %r started (faust)", self.pipe.name)
        try:
            async for event in self._stream.events():
                self._check()
                self._admit(event)
                while self._inflight >= self.max_inflight:  # backpressure: faust stops reading
                    self._capacity.clear()
                    await self._capacity.wait()
                    self._check()
        except Exception as e:
            self._fail(e)
            raise
        finally:
            await self.stop(final=self.app is None or self.app.should_stop or self._failure is not None)

    def _check(self) -> None:
        if self._failure is not None:
            msg = f"ponder agent for {self.pipe.name!r} failed: {type(self._failure).__name__}: {self._failure}"
            raise RuntimeError(msg) from self._failure

    # -- one record --------------------------------------------------------------------------

    def _admit(self, event: Any) -> None:
        m = event.message
        p = m.partition
        if self._gen.get(p) != m.generation_id:
            # a rebalance came between (faust drains unacked records before one, so normally
            # nothing is left): what is still pending of the old generation is never acked
            # now, it is read again from the committed offset
            stale = self._pending.get(p, ())
            self._inflight -= len(stale)
            self._abandon(stale)
            self._pending[p], self._finished[p], self._gen[p] = deque(), set(), m.generation_id
        self._pending[p].append(event)
        self._inflight += 1
        self.events += 1
        headers = {k: v.decode("utf-8", "replace") for k, v in m.headers} if m.headers else {}
        value = m.value if m.value is not None else b""
        rec = Record(value, SourcePos(m.topic, p, m.offset),
                     m.key.decode("utf-8", "replace") if m.key else None, None, headers)
        ev = self.decoder(rec)  # never raises: a bad record is its own dead letter
        if type(ev) is DeadLetter:
            self._dead(ev)
            self._spawn(self._finish_when_durable(event))
            return
        tkey = f"{p}|{ev.key}".encode()
        lane = self._lanes.get(tkey)
        if lane is not None:
            lane[1].append((ev, event))
            return
        raw = self.table.get(tkey)
        st = _state_dec.decode(raw) if raw is not None else self.logic.new_state(ev.key)
        verdict = self._observe(st, ev)
        if verdict is _DEAD:
            self._spawn(self._finish_when_durable(event))
            return
        if verdict is None:
            self._done(event)
            return
        if not verdict.escalate:
            self.table[tkey] = _state_enc.encode(st)
            self._done(event)
            return
        self._lanes[tkey] = (st, deque())
        self._spawn(self._lane(tkey, ev, event, verdict))

    def _observe(self, st: KeyState, ev: Event) -> Verdict | None | object:
        """The gate's verdict; None for a replayed event, `_DEAD` for one that became a dead
        letter (not yet acknowledged)."""
        if self.logic.seen(st, ev):
            self.replayed += 1
            return None
        try:
            return self.logic.observe(st, ev)
        except Exception as e:  # noqa: BLE001 - a bad event or a buggy user rule must not stop the stream
            # observe validates before it changes state, so the key's state is as it was
            logger.warning("observe failed for key %r at %s: %s: %s", ev.key, ev.source, type(e).__name__, e)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source, _payload(ev), stage="observe"))
            return _DEAD

    async def _lane(self, tkey: bytes, ev: Event, event: Any, verdict: Any) -> None:
        """One key's events in order, from an escalated one until none is left. The state is
        written (and the records acked) only once its outputs are acknowledged."""
        st, lane = self._lanes[tkey]
        try:
            finished = []
            while True:
                if isinstance(verdict, Verdict) and verdict.escalate:
                    await self._decide(st, ev, verdict)
                finished.append(event)
                if not lane:
                    await self._durable()  # decisions and dead letters of this lane, at least
                    if not lane:
                        break
                ev, event = lane.popleft()
                verdict = self._observe(st, ev)
            _in_event(event, self.table.__setitem__, tkey, _state_enc.encode(st))
            del self._lanes[tkey]
            for e in finished:
                self._done(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the agent loop, never lost in a task
            self._fail(e)

    async def _decide(self, st: KeyState, ev: Event, verdict: Verdict) -> None:
        try:
            d = await self.logic.decide(st, ev, verdict, self._call)
        except Exception as e:  # noqa: BLE001 - one event's fault: its dead letter, the key goes on
            logger.warning("decide failed for key %r at %s: %s: %s", ev.key, ev.source, type(e).__name__, e)
            self._dead(DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source, _payload(ev), stage="decide"))
            return
        self.sink.write(d)
        self.decisions += 1

    def _dead(self, letter: DeadLetter) -> None:
        self.sink.dead(letter)
        self.dead_letters += 1

    async def _finish_when_durable(self, event: Any) -> None:
        try:
            await self._durable()
        except Exception as e:  # noqa: BLE001 - see _lane
            self._fail(e)
            return
        self._done(event)

    async def _durable(self) -> None:
        """Wait until everything written so far is acknowledged by the broker. Serialized: a
        flush hands its in-flight records to whoever started it, so a concurrent one could
        return before ours have landed."""
        async with self._flush_lock:
            await self.sink.flush()
            # the sink remembers where outputs landed for the native worker's recovery, which
            # this runtime does not do: forget them, or they pile up
            for p in list(self._pending):
                self.sink.prune(p, _EVERYTHING)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, e: BaseException) -> None:
        if self._failure is None:
            self._failure = e
            logger.error("stopping: %s: %s", type(e).__name__, e)
            if self.on_failure is not None:
                self.on_failure(e)
        self._capacity.set()

    def _done(self, event: Any) -> None:
        """Mark a record finished and ack, in offset order, every record of its partition
        that is finished with all before it."""
        p = event.message.partition
        if self._gen.get(p) != event.message.generation_id:
            return  # of a generation before a rebalance: acking it could commit past unread work
        pending, finished = self._pending[p], self._finished[p]
        finished.add(id(event))  # the events stay in `pending` until acked, so ids are unique
        while pending and id(pending[0]) in finished:
            e = pending.popleft()
            finished.discard(id(e))
            self._ack(e)
            self._inflight -= 1
        if self._inflight < self.max_inflight:
            self._capacity.set()

    def _abandon(self, events: Any) -> None:
        """Tell faust that `events` will never be acked (they are read again from the committed
        offset), so its `wait_empty` before a rebalance or at shutdown does not wait on them."""
        unacked = getattr(getattr(self.app, "consumer", None), "_unacked_messages", None)
        if unacked is not None:
            for e in events:
                unacked.discard(e.message)

    @staticmethod
    def _ack(event: Any) -> None:
        # what `Stream.ack` does, less its monitoring sensors; synchronous, so acks stay in order
        event.ack()

    async def _call(self, tier: str, request: Request) -> Completion:
        return await self._tiers.call(tier, request)


def _in_event(event: Any, fn: Any, *args: Any) -> Any:
    """Call `fn` as if inside the agent's iteration over `event`: faust tables send a changed
    key to the changelog partition of the *current* event, which a lane task (running after
    the agent moved on) must name itself."""
    ctx = contextvars.copy_context()
    return ctx.run(lambda: (_current_event.set(weakref.ref(event)), fn(*args))[1])


def _payload(ev: Event) -> str:
    try:
        return msgspec.json.encode(ev.payload).decode()[:2000]
    except Exception:  # noqa: BLE001 - a payload msgspec cannot encode is still shown
        return repr(ev.payload)[:2000]


# -- wiring into a faust app --------------------------------------------------------------------


def attach(app: Any, pipe: Pipeline, *, input_topic: str | None = None, output_topic: str | None = None,
           dead_letter_topic: str | None = None, partitions: int | None = None,
           engines: Mapping[str, Engine] | None = None, brokers: str | None = None) -> Any:
    """Add an agent running `pipe` to the faust `app` and return it (`agent.ponder` is its
    PonderAgent, with counters). Topics default to `pipe.topics`; the state table is named
    `ponder-<pipeline>` (changelog `<app id>-ponder-<pipeline>-changelog`); `brokers` defaults
    to the app's broker. The app must have a persistent store (`store="rocksdb://"`) for state
    to survive restarts without replaying the whole changelog."""
    t_in, t_out, t_dead = pipe.topics
    t_in, t_out, t_dead = input_topic or t_in, output_topic or t_out, dead_letter_topic or t_dead
    n = partitions or app.conf.topic_partitions
    brokers = brokers or ",".join(f"{u.host}:{u.port or 9092}" for u in app.conf.broker)
    source = app.topic(t_in, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                       partitions=n)
    # the key's state, msgpack bytes under `partition|key` (the raw codec)
    table = app.Table(f"ponder-{pipe.name}", default=None, partitions=n, key_type=bytes, value_type=bytes)
    runner = PonderAgent(pipe, table, KafkaSink(brokers, t_out, t_dead), engines=engines)

    async def ponder_agent(stream: Any) -> None:
        await runner.run(stream)

    agent = app.agent(source, name=f"ponder-{pipe.name}")(ponder_agent)
    agent.ponder = runner
    runner.app = app
    return agent


def build_app(pipe: Pipeline, brokers: str, *, group: str, state_dir: Path, partitions: int,
              session_timeout_ms: int = 10_000, commit_interval_s: float = 1.0) -> Any:
    """A faust App set up for ponder: RocksDB tables under `state_dir/group`, no web server,
    and the settings a Kafka-protocol broker such as Tansu needs (see the module docstring)."""
    session_s = session_timeout_ms / 1000.0
    datadir = Path(state_dir) / group
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return faust.App(
        group,  # the app id is the consumer group
        broker=",".join(f"kafka://{b}" for b in brokers.split(",")),
        store="rocksdb://",  # rocksdict when python-rocksdb is absent
        datadir=str(datadir),
        topic_partitions=partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_s,
        broker_rebalance_timeout=session_s,
        broker_heartbeat_interval=max(0.2, min(1.0, session_s / 6)),
        broker_commit_interval=commit_interval_s,
        table_standby_replicas=0,
        web_enabled=False,  # workers on one host would fight over port 6066
        # one record per changelog batch: brokers whose ListOffsets reports the first offset of
        # the last batch (Tansu) would otherwise end a restore early, and faust then refuses to
        # start ("persisted offset higher than highwater")
        producer_max_batch_size=1,
    )


class _Worker(FaustWorker):
    """faust's Worker with a bound on shutdown. faust's graceful stop can wait without end
    (`stream_wait_empty` on a record nobody will ack, a consumer that cannot leave its group,
    a service that does not stop); after `grace_s` from the first SIGTERM/SIGINT the process
    exits anyway. That is safe under at-least-once: an input offset is committed only for
    records acked by the agent, and a record is acked only after its decision or dead letter
    was acknowledged by the broker and its key's state written (faust flushes the changelog
    before it commits), so an exit at any moment is no worse than a SIGKILL: whatever was not
    committed is read again, and its outputs are written again with the same ids."""

    grace_s = 20.0
    failed: Any = None  # -> the agent's failure, if any: the exit status of a forced exit

    def _schedule_shutdown(self, signal: Any) -> None:
        if not self._signal_stop_time:
            timer = threading.Timer(self.grace_s, self._force_exit)
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signal)

    def _force_exit(self) -> None:
        failed = self.failed() if self.failed is not None else None
        logger.warning("faust did not stop within %.0fs of the signal: exiting without it (at-least-once: "
                       "what was not committed is read again)", self.grace_s)
        logging.shutdown()
        os._exit(1 if failed is not None else 0)


def run_worker(pipe: Pipeline, brokers: str, *, group: str | None = None, state_dir: Path = Path("state"),
               input_topic: str | None = None, output_topic: str | None = None,
               dead_letter_topic: str | None = None, partitions: int = 16,
               session_timeout_ms: int = 10_000) -> None:
    """Run `pipe` as a faust worker until SIGTERM/SIGINT (then return); raise if it fails."""
    from ponder.connectors.kafka import ensure_keyed_topics

    t_in, t_out, t_dead = pipe.topics
    t_in, t_out, t_dead = input_topic or t_in, output_topic or t_out, dead_letter_topic or t_dead
    group = group or f"ponder-{pipe.name}"
    n = asyncio.run(ensure_keyed_topics(brokers, t_in, (t_out, t_dead), partitions))
    asyncio.set_event_loop(asyncio.new_event_loop())  # faust takes the current loop; asyncio.run closed its own
    app = build_app(pipe, brokers, group=group, state_dir=state_dir, partitions=n,
                    session_timeout_ms=session_timeout_ms)
    agent = attach(app, pipe, input_topic=t_in, output_topic=t_out, dead_letter_topic=t_dead, partitions=n,
                   brokers=brokers)
    # a failed agent stops the worker the way a signal does; run_worker then raises
    agent.ponder.on_failure = lambda e: os.kill(os.getpid(), signal.SIGTERM)
    worker = _Worker(app, loglevel=logging.getLevelName(logging.getLogger().level or logging.INFO),
                     redirect_stdouts=False)
    worker.failed = lambda: agent.ponder._failure
    try:
        worker.execute_from_commandline()
    except SystemExit as e:
        if e.code not in (0, None):
            failure = agent.ponder._failure
            msg = f"faust worker for {pipe.name!r} exited with {e.code}"
            raise RuntimeError(msg) from failure
    if agent.ponder._failure is not None:
        msg = f"faust worker for {pipe.name!r} failed: {agent.ponder._failure}"
        raise RuntimeError(msg) from agent.ponder._failure
    logger.info("faust worker for %r stopped: events=%d decisions=%d dead_letters=%d replayed=%d", pipe.name,
                agent.ponder.events, agent.ponder.decisions, agent.ponder.dead_letters, agent.ponder.replayed)

"""ponder's per-key logic as a Bytewax dataflow (Bytewax 0.21, Python <= 3.12).

The same `Pipeline` that `ponder worker` runs, as steps of a Bytewax flow. A Bytewax user adds
it to an existing flow in a few lines:

    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from ponder.runtime.bytewax import KafkaOutputs, Ponder, reason
    from pumps import pipeline  # a ponder Pipeline

    flow = Dataflow("pumps")
    records = op.input("in", flow, KafkaSource(["localhost:9092"], ["pumps.events"]))
    outputs = reason("ponder", records, Ponder(pipeline))  # Decisions and DeadLetters
    op.output("out", outputs, KafkaOutputs("localhost:9092", "pumps.decisions", "pumps.dead-letters"))

Run it with recovery (`python -m bytewax.recovery DIR 1` once, then `python -m bytewax.run
flow -r DIR -s 1 -b 0`), one worker per process (`-w 1`; scale out with processes, `-i/-a`):
a process's engines serve one event loop.
`ponder worker PIPELINE --runtime bytewax` (`run_worker` below) builds this flow itself.

The steps: records -> decode (a bad record becomes a dead letter: reason and position) -> key
on the event's key -> `observe` as a Bytewax `stateful` step, the key's KeyState its state ->
escalations -> `decide`, a `flat_map_batch` step that runs every escalation of the batch at
once on the process's event loop, so model calls of different keys share engine batches (the
native worker's Batcher) -> decisions and dead letters.

Where decide runs. `KeyLogic.decide` never changes a key's state: it reads the context as the
escalated event left it. So the stateful step observes every event in order and hands each
escalation on with a copy of the key's context taken right after that event; the state Bytewax
snapshots is always complete (nothing of a key waits outside it), later events of the key are
observed at once, and the decision is made on exactly the context the native worker's lane
would show it. `decide` keeps the order of its batch, so a key's decisions leave in the order
of its events. Not carried over from the native worker: budgets' per-partition bookkeeping
(budgets work, but their spend restarts with the process), a bound on hot keys (every key's
state stays in memory), log-restart epochs, traces, metrics and the spend ledger.

Guarantees: at-least-once. Bytewax snapshots each key's state and each input partition's
offset at every epoch (`snapshot_every_s`); after a crash (or a stop: Bytewax 0.21 cannot stop
at an epoch boundary) the flow resumes from the last epoch whose snapshots were all written:
the input read after it is read again, and what it caused is emitted again. Those are the only
duplicates: decisions and dead letters of the input of the epochs after the last complete
snapshot (in practice the last snapshot interval or two). They carry the same ids as the first
copies (decision ids derive from key and input position; dead letters from the position and
stage), and land in the same output partition (that of their input), so a consumer drops them
by id. A resumed key's state is that of the snapshot, so the repeated decisions are the same.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Union

import bytewax.operators as op
import msgspec
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.operators import StatefulLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from ponder.connectors.base import Record
from ponder.connectors.kafka.sink import dead_letter_record, decision_record
from ponder.inference.engine import Completion, Request
from ponder.operators.context import ContextState
from ponder.operators.gate import Verdict
from ponder.operators.keyed import KeyState
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.batcher import Batcher, TierCalls
from ponder.types import DeadLetter, Decision, Event, SourcePos

__all__ = ["Ponder", "KafkaOutputs", "reason", "dataflow", "run_worker"]

logger = logging.getLogger(__name__)

Output = Union[Decision, DeadLetter]
_state_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder(KeyState)
_ctx_dec = msgspec.msgpack.Decoder(ContextState)


class Escalation(msgspec.Struct, frozen=True):
    """An escalated event on its way to `decide`, with the key's context as it left it."""

    event: Event
    verdict: Verdict
    context: ContextState
    local: bool


class _KeyStep(StatefulLogic):
    """One key's KeyState as a Bytewax stateful step: observe every event in order."""

    def __init__(self, ponder: Ponder, resume: bytes | None) -> None:
        self.ponder = ponder
        self.state: KeyState | None = None if resume is None else _state_dec.decode(resume)

    def on_item(self, ev: Event):
        logic = self.ponder.logic
        st = self.state if self.state is not None else logic.new_state(ev.key)
        if logic.seen(st, ev):  # the state already holds it (input read again past a snapshot)
            return (), StatefulLogic.RETAIN
        try:
            verdict = logic.observe(st, ev)
        except Exception as e:  # noqa: BLE001 - a bad event or a buggy user rule must not stop the flow
            # observe validates before it changes state, so the key's state is as it was
            logger.warning("observe failed for key %r at %s: %s: %s", ev.key, ev.source, type(e).__name__, e)
            return [DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source, _payload(ev), stage="observe")], \
                StatefulLogic.RETAIN
        self.state = st
        if not verdict.escalate:
            return (), StatefulLogic.RETAIN
        # a copy: later events of the key change the context before the decision is made
        context = _ctx_dec.decode(_state_enc.encode(st.context))
        return [Escalation(ev, verdict, context, st.local)], StatefulLogic.RETAIN

    def snapshot(self) -> bytes | None:
        return None if self.state is None else _state_enc.encode(self.state)


class Ponder:
    """A pipeline's runnable parts for a Bytewax flow: decoder, per-key logic, and the engines,
    batchers and event loop its model calls run on (created on first use, in the worker's
    thread). `close()` stops the engines."""

    def __init__(self, pipe: Pipeline, *, engines=None) -> None:
        self.pipe = pipe
        self.logic, self.decoder, self.engines = pipe.build(engines=engines)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._tiers: TierCalls | None = None  # made on the process's event loop, at the first batch
        self.batchers: dict[str, Batcher] = {}  # tier -> its batcher (tiers with max_batch > 1)

    # -- the steps --------------------------------------------------------------------------

    def decode(self, msg: KafkaSourceMessage | Record) -> Event | DeadLetter:
        """A Kafka message (or a ponder Record) as an Event, or the dead letter saying why not."""
        return self.decoder(msg if isinstance(msg, Record) else record(msg))

    def key_step(self, resume: bytes | None) -> _KeyStep:
        return _KeyStep(self, resume)

    def decide(self, items: list) -> list[Output]:
        """Decide every escalation of a batch at once; anything else passes through. Blocks
        until all are decided, so the epoch holding them closes only after their decisions."""
        escalations = [x for x in items if isinstance(x, Escalation)]
        if not escalations:
            return items
        decided = iter(self._run(self._decide_all(escalations)))
        return [next(decided) if isinstance(x, Escalation) else x for x in items]

    async def _decide_all(self, escalations: list[Escalation]) -> list[Output]:
        # concurrently: the tiers' batchers put calls of different keys in one engine batch
        return await asyncio.gather(*(self._decide(x) for x in escalations))

    async def _decide(self, x: Escalation) -> Output:
        ev = x.event
        st = KeyState(x.context, None, local=x.local)  # decide reads only the context and `local`
        try:
            return await self.logic.decide(st, ev, x.verdict, self._call)
        except Exception as e:  # noqa: BLE001 - one event's fault: its dead letter, as the native worker does
            logger.warning("decide failed for key %r at %s: %s: %s", ev.key, ev.source, type(e).__name__, e)
            return DeadLetter(f"{type(e).__name__}: {e}"[:500], ev.source, _payload(ev), stage="decide")

    # -- model calls: the native worker's dispatch, on this process's loop --------------------

    def _run(self, coro):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.get_ident()
            self._loop.run_until_complete(self._start())
        elif self._thread != threading.get_ident():
            coro.close()
            msg = ("ponder's Bytewax steps run one worker per process (-w 1): a second worker "
                   "thread cannot share this process's engines; scale out with processes (-i/-a)")
            raise RuntimeError(msg)
        return self._loop.run_until_complete(coro)

    async def _start(self) -> None:
        for e in self.engines.values():
            await e.start()
        self._tiers = TierCalls(self.pipe.tiers, self.engines, self.pipe.tenant_weights)
        self.batchers = self._tiers.batchers

    async def _call(self, tier: str, request: Request) -> Completion:
        return await self._tiers.call(tier, request)

    def close(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def stop() -> None:
            if self._tiers is not None:
                await self._tiers.close()
            for e in self.engines.values():
                try:
                    await asyncio.wait_for(e.stop(), 15.0)
                except Exception as ex:  # noqa: BLE001 - one failing engine must not keep the rest running
                    logger.warning("stopping engine %r failed: %s: %s", e.name, type(ex).__name__, ex)

        try:
            loop.run_until_complete(stop())
        finally:
            loop.close()


@operator
def reason(step_id: str, up: Stream[KafkaSourceMessage], ponder: Ponder) -> Stream[Output]:
    """Run a pipeline's per-key logic on a stream of Kafka messages (or ponder Records).

    :arg step_id: Unique ID.
    :arg up: Kafka messages, each one event of the pipeline's input.
    :arg ponder: The pipeline's parts (`Ponder(pipeline)`).
    :returns: Decisions and DeadLetters, a key's decisions in the order of its events.
    """
    decoded = op.map("decode", up, ponder.decode)
    valid = op.branch("valid", decoded, lambda x: isinstance(x, Event))
    keyed = op.key_on("key", valid.trues, lambda ev: ev.key)
    observed = op.stateful("observe", keyed, ponder.key_step)
    items = op.map("unkey", observed, lambda kv: kv[1])
    decided = op.flat_map_batch("decide", items, ponder.decide)
    return op.merge("outputs", decided, valid.falses)


def record(msg: KafkaSourceMessage) -> Record:
    """A Bytewax Kafka message as the record ponder's decoder reads (as the native source makes it)."""
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in msg.headers} if msg.headers else {}
    key = msg.key.decode("utf-8", "replace") if msg.key else None
    return Record(msg.value if msg.value is not None else b"", SourcePos(msg.topic, msg.partition, msg.offset),
                  key, None, headers)


# -- output ------------------------------------------------------------------------------------


class _OutputPartition(StatelessSinkPartition):
    def __init__(self, producer: Producer, outputs: KafkaOutputs) -> None:
        self.producer = producer
        self.outputs = outputs

    def write_batch(self, items: list[Output]) -> None:
        for item in items:
            for topic, part, key, value, headers in self.outputs.records(item):
                self.producer.produce(topic, value=value, key=key, partition=part, headers=headers)
                self.producer.poll(0)
        # before the epoch can close: what it caused is in the broker, or the flow fails
        left = self.producer.flush(30.0)
        if left:
            msg = f"{left} outputs not acknowledged by the broker within 30s"
            raise RuntimeError(msg)

    def close(self) -> None:
        self.producer.flush(30.0)


class KafkaOutputs(DynamicSink):
    """Decisions and dead letters to their topics in the native worker's formats (see
    connectors/kafka/sink.py): a decision keyed by its stream key with `decision_id` (and
    `tenant`) headers, a dead letter unkeyed with `dead_letter_id` and `reason`; each in the
    output partition with the number of its input partition, so the duplicates of one input
    partition are found in one output partition. (Bytewax's own KafkaSink cannot pick a
    partition.)"""

    def __init__(self, brokers: str, decisions_topic: str, dead_topic: str, *,
                 max_message_bytes: int = 1_000_000, config: dict | None = None) -> None:
        self.brokers = brokers
        self.decisions_topic, self.dead_topic = decisions_topic, dead_topic
        self.max_message_bytes = max_message_bytes
        self.config = {"bootstrap.servers": brokers, "acks": "all", "linger.ms": 5, **(config or {})}

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OutputPartition:
        return _OutputPartition(Producer(self.config), self)

    def records(self, item: Output) -> list[tuple[str, int, bytes | None, bytes, list]]:
        if isinstance(item, DeadLetter):
            value, headers = dead_letter_record(item)
            return [(self.dead_topic, item.source.partition, None, value, headers)]
        d = item
        src = d.source
        key, value, headers, size = decision_record(d, self.max_message_bytes)
        if size > self.max_message_bytes:
            reason = (f"decision {d.decision_id} of {size} bytes exceeds the maximum "
                      f"message size ({self.max_message_bytes} bytes) even with long fields cut")
            return self.records(DeadLetter(reason, src, value[:2000].decode("utf-8", "replace"), stage="sink"))
        return [(self.decisions_topic, src.partition if src is not None else 0, key, value, headers)]


def _payload(ev: Event) -> str:
    try:
        return msgspec.json.encode(ev.payload).decode()[:2000]
    except Exception:  # noqa: BLE001 - a payload msgspec cannot encode is still shown
        return repr(ev.payload)[:2000]


# -- the whole flow, and the worker the CLI runs ----------------------------------------------


def dataflow(pipe: Pipeline | Ponder, brokers: str, *, input_topic: str | None = None,
             output_topic: str | None = None, dead_letter_topic: str | None = None,
             batch_size: int = 1000) -> Dataflow:
    """Kafka input -> `reason` -> decisions and dead letters to Kafka. Topics default to the
    pipeline's (`pipe.topics`). Bytewax's Kafka source joins no consumer group: it reads every
    partition of the input (split among workers) and keeps its offsets in the recovery store."""
    ponder = pipe if isinstance(pipe, Ponder) else Ponder(pipe)
    t_in, t_out, t_dead = ponder.pipe.topics
    flow = Dataflow(f"ponder-{ponder.pipe.name}")
    records = op.input("in", flow, KafkaSource([brokers], [input_topic or t_in], tail=True,
                                               batch_size=batch_size))
    outputs = reason("ponder", records, ponder)
    op.output("out", outputs, KafkaOutputs(brokers, output_topic or t_out, dead_letter_topic or t_dead))
    return flow


class _Stop(KeyboardInterrupt):
    """SIGTERM, raised where Bytewax checks for signals (as it does SIGINT's KeyboardInterrupt)."""


def run_worker(pipe: Pipeline, brokers: str, *, group: str | None = None, state_dir: Path = Path("state"),
               input_topic: str | None = None, output_topic: str | None = None,
               dead_letter_topic: str | None = None, partitions: int = 16,
               session_timeout_ms: int = 10_000, snapshot_every_s: float = 1.0, batch_size: int = 1000,
               engines=None) -> None:
    """Run the pipeline as a Bytewax dataflow with recovery under `state_dir/GROUP/bytewax`
    until SIGTERM or SIGINT; return then (exit 0). Raises on an error the flow cannot handle.

    `group` only names the state directory (Bytewax joins no consumer group), and
    `session_timeout_ms` is accepted for the CLI's sake and unused. Topics are created as the
    native worker creates them: outputs with at least the input's partitions. `batch_size`:
    records read from a partition at a time; the escalations of one read are decided together,
    so it bounds both the model batches across keys and how long a decision waits."""
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.run import cli_main

    from ponder.connectors.kafka import ensure_keyed_topics

    del session_timeout_ms
    t_in, t_out, t_dead = pipe.topics
    t_in, t_out, t_dead = input_topic or t_in, output_topic or t_out, dead_letter_topic or t_dead
    group = group or f"ponder-{pipe.name}"

    async def topics() -> None:
        await ensure_keyed_topics(brokers, t_in, (t_out, t_dead), partitions)

    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        stopping.set()
        raise _Stop

    # handlers first: a signal while topics are created must still end the run cleanly
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ponder = None
    try:
        asyncio.run(topics())
        recovery = Path(state_dir) / group / "bytewax"
        if not recovery.exists():
            recovery.mkdir(parents=True)
            init_db_dir(recovery, 1)
        ponder = Ponder(pipe, engines=engines)
        flow = dataflow(ponder, brokers, input_topic=t_in, output_topic=t_out, dead_letter_topic=t_dead,
                        batch_size=batch_size)
        logger.info("bytewax worker for pipeline %r started: %s -> %s, %s (recovery in %s)",
                    pipe.name, t_in, t_out, t_dead, recovery)
        cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=snapshot_every_s),
                 recovery_config=RecoveryConfig(str(recovery)))
    except BaseException:
        if not stopping.is_set():
            raise
        # Bytewax hands a signal raised inside a step back as its own error: a stop all the same
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ponder is not None:
            ponder.close()
    logger.info("bytewax worker for pipeline %r stopped", pipe.name)


def _main() -> None:
    import argparse

    from ponder.pipelines.pipeline import load_pipeline

    p = argparse.ArgumentParser(prog="python -m ponder.runtime.bytewax",
                                description="Run a ponder pipeline as a Bytewax dataflow (see the module docstring).")
    p.add_argument("pipeline", help="module:attr of the Pipeline")
    p.add_argument("--brokers", required=True)
    p.add_argument("--group")
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--input-topic")
    p.add_argument("--output-topic")
    p.add_argument("--dead-letter-topic")
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--snapshot-every-s", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1000)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(load_pipeline(a.pipeline), a.brokers, group=a.group, state_dir=a.state_dir,
               input_topic=a.input_topic, output_topic=a.output_topic, dead_letter_topic=a.dead_letter_topic,
               partitions=a.partitions, snapshot_every_s=a.snapshot_every_s, batch_size=a.batch_size)


if __name__ == "__main__":
    _main()

"""Decisions and dead letters to Kafka, without duplicates across crashes.

Record key = event key; headers carry `decision_id` and `tenant`. A decision goes to the output
partition with the number of its input partition, so everything that input partition p caused
lives in output partition p. That makes duplicates findable: at each checkpoint the sink
reports, per input partition, the output offset where the outputs of not-yet-committed input
begin; after a crash the worker replays that input, and the sink first reads output partition p
from that offset and suppresses every id it finds there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, Mapping

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from ponder.connectors.base import MembershipUnsure, SinkError
from ponder.connectors.kafka.fence import reset_connections, watch_lease
from ponder.connectors.kafka.reader import read_to_end
from ponder.types import DEFAULT_TENANT, DeadLetter, Decision, SourcePos

__all__ = ["KafkaSink"]

logger = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()


class _Source(msgspec.Struct):
    """The one field recovery reads of a decision or dead letter: the input it came from."""

    source: SourcePos | None = None


_source_of = msgspec.json.Decoder(_Source)
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_CUT = 256  # longest string kept whole when a decision must shrink


def dead_letter_id(letter: DeadLetter) -> str:
    s = letter.source
    epoch = f"#{s.epoch}" if s.epoch else ""
    return f"{s.topic}:{s.partition}:{s.offset}{epoch}:{letter.stage}"


def decision_record(d: Decision, max_message_bytes: int) -> tuple[bytes, bytes, list, int]:
    """A decision as its Kafka record: (key, value, headers, size). The value is the decision's
    JSON, shrunk (long fields cut) when key and value pass `max_message_bytes`; `size` over the
    bound says it does not fit even so."""
    headers = [("decision_id", d.decision_id.encode())]
    # the decision's tenant when the pipeline has tenants; else whatever the input said
    tenant = d.tenant if d.tenant != DEFAULT_TENANT else d.headers.get("tenant")
    if tenant:
        headers.append(("tenant", tenant.encode()[:256]))
    key = d.key.encode()
    value = _enc.encode(d)
    if len(key) + len(value) > max_message_bytes:
        full = len(value)
        value = _enc.encode(shrink(d))
        if len(key) + len(value) <= max_message_bytes:
            logger.warning("decision %s was %d bytes: long fields cut to fit %d", d.decision_id,
                           len(key) + full, max_message_bytes)
    return key, value, headers, len(key) + len(value)


def dead_letter_record(letter: DeadLetter) -> tuple[bytes, list]:
    """A dead letter as its Kafka record (unkeyed): (value, headers)."""
    return _enc.encode(letter), [("dead_letter_id", dead_letter_id(letter).encode()),
                                 ("reason", letter.reason[:200].encode())]


def _cut(v, limit: int = _CUT):
    """Cut every long string inside `v` to `limit` chars plus a marker saying how much went."""
    if isinstance(v, str):
        return v if len(v) <= limit else f"{v[:limit]}…[cut {len(v) - limit} chars]"
    if isinstance(v, dict):
        return {_cut(k, 64): _cut(x, limit) for k, x in list(v.items())[:64]}
    if isinstance(v, (list, tuple)):
        return [_cut(x, limit) for x in v[:64]]
    return v


def shrink(d: Decision) -> Decision:
    """The same decision with long fields cut and the trace thinned, marked in its evidence."""
    t = d.trace
    # thinned: findings, errors and skips cut, the per-stage timings dropped (their sum is in
    # the spans); the forecast, the vote and the privacy note are small and stay
    trace = None if t is None else msgspec.structs.replace(
        t, findings=msgspec.convert(_cut(msgspec.to_builtins(t.findings[:8])), type(t.findings)),
        errors=[_cut(e) for e in t.errors[:8]], skipped=[_cut(x) for x in t.skipped[:8]], stages=[])
    return msgspec.structs.replace(
        d, reason=_cut(d.reason, 400), evidence={**_cut(d.evidence), "shrunk": True}, trace=trace,
        headers=_cut(d.headers))


class KafkaSink:
    def __init__(self, brokers: str, decisions_topic: str, dead_topic: str, *, linger_ms: int = 5,
                 max_message_bytes: int = 1_000_000, may_send: Callable[[], bool] | None = None,
                 request_timeout_ms: int = 40_000, max_hold_s: float = 60.0) -> None:
        """:param may_send: whether records may be handed to the broker now (the consumer's
            membership lease); while it says no, they wait in this sink's queue, where
            `abandon` can still drop them.
        :param request_timeout_ms: how long the producer tries to deliver one record before
            failing it (set it within the lease, so no record outlives our membership).
        :param max_hold_s: how long flush waits for `may_send` before it gives up (a lost
            membership normally ends sooner: the partitions are revoked and abandoned)."""
        self.brokers = brokers
        self.topics = {"decisions": decisions_topic, "dead": dead_topic}
        self._linger_ms = linger_ms
        self.max_message_bytes = max_message_bytes
        self._may_send = may_send
        self._request_timeout_ms = request_timeout_ms
        self._max_hold_s = max_hold_s
        self._held_since: float | None = None
        self._watch: asyncio.Task[None] | None = None
        self.fenced = False
        self._error: BaseException | None = None
        self._producer: AIOKafkaProducer | None = None
        self._queue: deque[tuple[str, int, int, str, bytes, bytes, list]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._inflight: list[tuple[str, int, int, asyncio.Future]] = []
        # (kind, input partition) -> deque of (input offset, output offset), oldest first
        self._outputs: dict[tuple[str, int], deque[tuple[int, int]]] = {}
        self._end: dict[tuple[str, int], int] = {}  # next output offset known per partition
        self._suppress: dict[tuple[str, int], set[str]] = {}
        self.written = 0
        self.dead_letters = 0
        self.suppressed = 0

    async def start(self) -> None:
        if self._producer is None:
            # the client-side limit sits above ours, so what we let through is judged by the broker
            self._producer = AIOKafkaProducer(bootstrap_servers=self.brokers, acks="all",
                                              linger_ms=self._linger_ms, max_batch_size=1 << 20,
                                              max_request_size=self.max_message_bytes + (64 << 10),
                                              request_timeout_ms=self._request_timeout_ms)
            await self._producer.start()
            if self._may_send is not None:
                self._watch = asyncio.get_running_loop().create_task(
                    watch_lease(self._may_send, self._unacknowledged, self._fence))

    def _unacknowledged(self) -> bool:
        return any(not fut.done() for *_, fut in self._inflight)

    def _fence(self) -> None:
        """The lease lapsed with outputs unacknowledged: they must never land (fence.py)."""
        n = reset_connections(self._producer)
        self.fenced = True
        msg = (f"group membership lapsed with {sum(not f.done() for *_, f in self._inflight)} outputs "
               f"unacknowledged: {n} broker connections reset so none can land late")
        self._error = self._error or SinkError(msg)
        logger.error("%s", msg)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._producer is not None:
            producer, self._producer = self._producer, None
            if self.fenced:  # never again: stopping would send what it still holds
                reset_connections(producer)
                return
            try:
                self._producer = producer
                await self.flush()
            finally:
                self._producer = None
                await producer.stop()

    # -- writing ------------------------------------------------------------------------------

    def write(self, decision: Decision) -> None:
        src = decision.source
        part = src.partition if src is not None else 0
        if self._suppressed("decisions", part, decision.decision_id):
            return
        key, value, headers, size = decision_record(decision, self.max_message_bytes)
        if size > self.max_message_bytes:
            self._too_large(decision.decision_id, decision.source, part, size, value)
            return
        self._enqueue("decisions", part, src.offset if src else -1, key, value, headers)
        self.written += 1

    def _too_large(self, ident: str, source, part: int, size: int, value: bytes) -> None:
        """A decision no broker will take goes to the dead letters, saying so."""
        if source is None:
            msg = f"decision {ident} of {size} bytes exceeds the maximum message size and has no source position"
            raise SinkError(msg)
        self.dead(DeadLetter(f"decision {ident} of {size} bytes exceeds the maximum message size "
                             f"({self.max_message_bytes} bytes) even with long fields cut",
                             source, value[:2000].decode("utf-8", "replace"), stage="sink"))

    def dead(self, letter: DeadLetter) -> None:
        lid = dead_letter_id(letter)
        if self._suppressed("dead", letter.source.partition, lid):
            return
        value, headers = dead_letter_record(letter)
        self._enqueue("dead", letter.source.partition, letter.source.offset, None, value, headers)
        self.dead_letters += 1

    def _suppressed(self, kind: str, part: int, ident: str) -> bool:
        ids = self._suppress.get((kind, part))
        if ids and ident in ids:
            ids.discard(ident)
            self.suppressed += 1
            return True
        return False

    def _enqueue(self, kind: str, part: int, offset: int, key: bytes | None, value: bytes, headers: list) -> None:
        if self._error is not None:
            raise self._failed()
        self._queue.append((kind, part, offset, key, value, headers))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """One sender task keeps each partition's records in the order they were written. A
        record leaves the queue only once the producer has taken it; an error stops the sender
        and is raised by the next flush, never lost with the task."""
        assert self._producer is not None, "KafkaSink.start() was not called"
        q = self._queue
        try:
            while q and self._error is None:
                if self._may_send is not None and not self._may_send():
                    return  # held here, where `abandon` can still drop them; flush says why
                # taken off first: `abandon` may run while the producer is awaited
                rec = kind, part, offset, key, value, headers = q.popleft()
                try:
                    fut = await self._producer.send(self.topics[kind], value=value, key=key, partition=part,
                                                    headers=headers)
                except _TOO_LARGE as e:
                    self._refused(kind, part, offset, value, e)
                    continue
                except BaseException:
                    q.appendleft(rec)  # not taken: kept for the error's report and a retry
                    raise
                self._inflight.append((kind, part, offset, value, fut))
        except Exception as e:  # noqa: BLE001 - kept for flush, which stops the worker
            self._error = e

    def _refused(self, kind: str, part: int, offset: int, value: bytes, e: BaseException) -> None:
        if kind == "dead":  # a dead letter is small by construction; one refused cannot be kept
            self._error = e
            return
        d = msgspec.json.decode(value, type=Decision)
        self._too_large(d.decision_id, d.source, part, len(value), value)
        self.written -= 1

    def _failed(self) -> SinkError:
        e = self._error
        if isinstance(e, SinkError):
            return e
        msg = f"producing to {sorted(self.topics.values())} failed: {type(e).__name__}: {e}"
        return SinkError(msg)

    async def flush(self) -> None:
        """Wait until every written record is acknowledged; remember where each landed.
        Raises SinkError if any record could not be produced."""
        if self._producer is None:
            return
        while (self._sender is not None and not self._sender.done() or self._queue) and self._error is None:
            if self._sender is None or self._sender.done():
                if self._queue and self._may_send is not None and not self._may_send():
                    self._held_since = self._held_since or time.monotonic()
                    if time.monotonic() - self._held_since > self._max_hold_s:
                        msg = f"no group membership for {self._max_hold_s:.0f}s: outputs cannot be written"
                        raise SinkError(msg)
                    msg = "not sure of the group membership: outputs held back"
                    raise MembershipUnsure(msg)
                self._sender = asyncio.get_running_loop().create_task(self._send())
            await self._sender
        self._held_since = None
        if self._error is None:
            await self._producer.flush()
        inflight, self._inflight = self._inflight, []
        for kind, part, offset, value, fut in inflight:
            try:
                md = await fut
            except _TOO_LARGE as e:  # the broker's limit is below ours
                self._refused(kind, part, offset, value, e)
                continue
            except Exception as e:  # noqa: BLE001 - see _send
                self._error = self._error or e
                continue
            self._outputs.setdefault((kind, part), deque()).append((offset, md.offset))
            self._end[(kind, part)] = md.offset + 1
        if self._error is not None:
            raise self._failed()
        if self._queue:  # dead letters of refused decisions
            await self.flush()

    # -- crash safety -------------------------------------------------------------------------

    def checkpoint_meta(self, partition: int, committed: int) -> dict[str, int]:
        """Per output kind, the offset from which the outputs of input at or past `committed`
        begin. Call after flush(), with the offset about to be committed. Forgets nothing: the
        commit may still be refused (`prune` once it is accepted)."""
        meta = {}
        for kind in self.topics:
            outs = self._outputs.get((kind, partition)) or ()
            first = next((out for inp, out in outs if inp >= committed), None)
            if first is not None:
                meta[f"{kind}_from"] = first
            elif (kind, partition) in self._end:
                meta[f"{kind}_from"] = self._end[(kind, partition)]
        return meta

    def prune(self, partition: int, committed: int) -> None:
        """Input below `committed` is committed: where its outputs lie no longer matters."""
        for kind in self.topics:
            outs = self._outputs.get((kind, partition))
            while outs and outs[0][0] < committed:
                outs.popleft()

    async def recover(self, metas: Mapping[int, Mapping[str, int]]) -> int:
        """Before replaying input partitions, learn which of their outputs already exist: their
        ids are suppressed, and where they lie is remembered like the outputs this sink writes,
        so the next checkpoint still points before them until their input is committed. Outputs
        of another epoch of the input are left alone (their ids differ)."""
        found = 0
        for kind, topic in self.topics.items():
            header = "decision_id" if kind == "decisions" else "dead_letter_id"
            # no checkpoint has recorded where to look yet: everything may be a duplicate
            starts = {p: meta.get(f"{kind}_from", 0) for p, meta in metas.items()}
            epochs = {p: meta.get("epoch", 0) for p, meta in metas.items()}
            ids: dict[int, set[str]] = {p: set() for p in starts}
            async for p, batch in read_to_end(self.brokers, topic, starts):
                outs = self._outputs.setdefault((kind, p), deque())
                for rec in batch:
                    try:
                        src = _source_of.decode(rec.value).source
                    except (msgspec.DecodeError, TypeError):  # not ours: nothing to suppress
                        continue
                    if src is None or src.epoch != epochs[p]:
                        continue
                    for k, v in rec.headers or ():
                        if k == header:
                            ids[p].add(v.decode())
                    outs.append((src.offset, rec.offset))
                end = batch[-1].offset + 1
                self._end[(kind, p)] = max(end, self._end.get((kind, p), 0))
            for p, found_ids in ids.items():
                self._suppress[(kind, p)] = found_ids
                found += len(found_ids)
        if found:
            logger.info("partitions %s: %d outputs already emitted will not be sent again", sorted(metas), found)
        return found

    def abandon(self, partition: int) -> int:
        """Drop the outputs of an input partition that are not yet handed to the broker: the
        partition was lost, and its new owner produces them again. Returns how many."""
        kept = [r for r in self._queue if r[1] != partition]
        dropped = len(self._queue) - len(kept)
        self._queue.clear()  # in place: the sender holds this deque
        self._queue.extend(kept)
        if dropped:
            logger.warning("partition %d lost: %d unsent outputs dropped; its new owner emits them",
                           partition, dropped)
        return dropped

    def forget(self, partition: int) -> None:
        for kind in self.topics:
            self._outputs.pop((kind, partition), None)
            self._suppress.pop((kind, partition), None)

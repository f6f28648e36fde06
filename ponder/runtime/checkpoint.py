"""Partition ownership and the checkpoint protocol: which key states live where, and when
progress becomes durable.

`Partitions` owns, for the partitions a worker holds:
- the hot key states (a bounded LRU: a clean key leaves memory, its state being in its
  partition's store, and is read back on its next event; past the bound the worker checkpoints
  so that every idle key is clean), the partition of each hot key, and the dirty set (key ->
  offset of its oldest event not yet in a store);
- one store per partition (Kafka workers) or one shared store (local runs; it moves to a
  temporary RocksDB the first time the LRU has to spill);
- each partition's epoch and anchor (the last record a checkpoint saw), so a log that started
  again is a new epoch and its offsets are never taken for replays;
- assign, revoke and checkpoint, serialised by one lock: a checkpoint never interleaves with a
  rebalance, so a committed offset never moves backwards and a revoked partition's store is
  never reopened.

The checkpoint is handed its participants explicitly (tracker, sink, source, changelog, and the
keys with work in flight); nothing is found by `getattr`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import msgspec

from ponder.connectors.base import (BEFORE_START, BEYOND_END, CommittingSource, MembershipUnsure, Record,
                                    ReplayableSink, Sink, Source, record_fingerprint)
from ponder.operators.keyed import KeyState
from ponder.runtime.tracker import CompletionTracker
from ponder.state.base import Changelog, Store
from ponder.state.memory import MemoryStore

__all__ = ["Partitions", "RevokedPartition"]

logger = logging.getLogger(__name__)

TP = tuple[str, int]

_state_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder(KeyState)


class RevokedPartition(RuntimeError):
    """Something asked for the store of a partition this worker no longer owns."""


class Partitions:
    """Key states, stores, epochs and the checkpoint protocol of one worker.

    :param new_state: a fresh state for a key never seen.
    :param store: the store of local runs (None: an in-memory one that becomes a temporary
        RocksDB once the hot-key bound is passed).
    :param open_store: one store per assigned partition (Kafka workers).
    :param max_hot_keys: key states kept in memory; colder ones live in the store.
    """

    def __init__(self, new_state: Callable[[str], KeyState], *, store: Store | None = None,
                 open_store: Callable[[TP], Store] | None = None, changelog: Changelog | None = None,
                 max_hot_keys: int = 100_000) -> None:
        if max_hot_keys < 1:
            msg = f"max_hot_keys must be at least 1, got {max_hot_keys}"
            raise ValueError(msg)
        self._new_state = new_state
        self._owned_store = store is None  # ours to replace by a temporary RocksDB
        self.store: Store = store if store is not None else MemoryStore()
        self._open_store = open_store
        self.changelog = changelog
        self.max_hot_keys = max_hot_keys
        # what else a partition's checkpoint carries and its next owner takes over (the budget
        # accounts: operators/budget.py), as integer bookkeeping; and who forgets it when it goes
        self.bookkeeping: Callable[[int], dict[str, int]] | None = None
        self.restored: Callable[[int, dict[str, int]], None] | None = None
        self.released: Callable[[int], None] | None = None
        self._stores: dict[TP, Store] = {}
        self._hot: OrderedDict[str, KeyState] = OrderedDict()
        self._tp: dict[str, TP] = {}  # partition of every hot key (dirty keys are always hot)
        self._dirty: dict[str, int] = {}
        # key with work in flight -> (its state after its last finished event, the next offset)
        self._snap: dict[str, tuple[bytes, int]] = {}
        self.assigned: set[TP] | None = None  # None: a source without assignment
        self.leaving: set[TP] = set()  # being revoked or lost: no new records are admitted
        self.epochs: dict[TP, int] = {}
        self._last: dict[TP, Record] = {}  # last record admitted per partition (its anchor)
        self._lock = asyncio.Lock()
        self._tmpdir: str | None = None
        self.new_keys = 0
        self.evicted = 0
        self.loaded = 0

    # -- key states ---------------------------------------------------------------------------

    def _store(self, tp: TP) -> Store:
        store = self._stores.get(tp)
        if store is None:
            if self.assigned is not None and tp not in self.assigned:
                msg = f"partition {tp[0]}[{tp[1]}] is not assigned to this worker: its store stays closed"
                raise RevokedPartition(msg)
            store = self._stores[tp] = self._open_store(tp) if self._open_store else self.store
        return store

    def state(self, key: str, tp: TP) -> KeyState:
        """The key's state: hot, else read from its partition's store, else new."""
        st = self._hot.get(key)
        if st is not None:
            self._hot.move_to_end(key)
            return st
        raw = self._store(tp).get(key)
        if raw is None:
            st = self._new_state(key)
            self.new_keys += 1
        else:
            st = _state_dec.decode(raw)
            self.loaded += 1
        self._hot[key] = st
        self._tp[key] = tp
        return st

    def owns(self, tp: TP) -> bool:
        """Whether records of `tp` may be admitted: assigned, and not being handed back."""
        return self.assigned is None or (tp in self.assigned and tp not in self.leaving)

    def hot(self, key: str) -> KeyState:
        return self._hot[key]

    def touched(self, key: str, offset: int) -> None:
        """The key's state now reflects the event at `offset` and is not yet stored."""
        if key not in self._dirty:
            self._dirty[key] = offset

    def saw(self, rec: Record) -> bool:
        """Note a record about to be admitted; False when its partition went backwards (the log
        started again under a running worker) and the caller must `new_epoch` first."""
        tp = (rec.source.topic, rec.source.partition)
        last = self._last.get(tp)
        if last is not None and rec.source.offset <= last.source.offset:
            return False
        self._last[tp] = rec
        return True

    def settled(self, key: str, next_offset: int) -> None:
        """The key's lane has finished every event before `next_offset` and goes on: keep a
        copy of the state as it is now, which a checkpoint may store while the lane runs."""
        self._snap[key] = (_state_enc.encode(self._hot[key]), next_offset)

    def unsettled(self, key: str) -> None:
        self._snap.pop(key, None)

    def evict(self, busy: Iterable[str] | dict) -> bool:
        """Bring the hot keys down to the bound, least recently used first, dropping only clean
        idle keys: their state is in the store already. A dirty key is not written out here,
        since its state may reflect an event whose output is not yet durable; the caller
        checkpoints (which cleans every idle key) when this returns True: still over the bound."""
        over = len(self._hot) - self.max_hot_keys
        if over <= 0 or self._lock.locked():  # a checkpoint in flight still needs its keys
            return False
        if self._owned_store and isinstance(self.store, MemoryStore):
            self._spill_to_disk()
        kept = []
        hot, dirty, tps = self._hot, self._dirty, self._tp
        while over > 0 and hot:
            key, st = hot.popitem(last=False)
            if key in dirty:
                # the rest are younger, and dirty too since the last checkpoint cleaned all
                # idle keys: stop here rather than scan them
                hot[key] = st
                hot.move_to_end(key, last=False)
                break
            if key in busy:
                kept.append((key, st))
                continue
            del tps[key]
            over -= 1
            self.evicted += 1
        for key, st in kept:  # they go back young: after their lane they may go
            hot[key] = st
        return over > 0

    def _spill_to_disk(self) -> None:
        from ponder.state.rocks import RocksStore  # only runs past the bound need RocksDB

        self._tmpdir = tempfile.mkdtemp(prefix="ponder-state-")
        disk = RocksStore(Path(self._tmpdir) / "state", durable=False)
        old = self.store
        disk.write(dict(old.items()), old.positions(), old.meta())
        self.store = disk
        self._stores = {tp: disk if s is old else s for tp, s in self._stores.items()}
        logger.info("more than %d hot keys: colder key states go to %s", self.max_hot_keys, self._tmpdir)

    # -- checkpoint ---------------------------------------------------------------------------

    async def checkpoint(self, tracker: CompletionTracker, sink: Sink, source: Source,
                         busy: dict | set) -> dict[TP, int]:
        """Make progress durable. Serialised with assign and revoke. Skipped (returns {}) while
        the consumer group may have moved our partitions on."""
        async with self._lock:
            dirty = dict(self._dirty)
            try:
                return await self._checkpoint(tracker, sink, source, busy)
            except MembershipUnsure as e:
                # nothing was published or committed: the keys are as dirty as before
                for k, first in dirty.items():
                    if k in self._hot:
                        self._dirty[k] = min(first, self._dirty.get(k, first))
                logger.warning("checkpoint skipped: %s", e)
                return {}

    async def _checkpoint(self, tracker: CompletionTracker, sink: Sink, source: Source,
                          busy: dict | set) -> dict[TP, int]:
        """In this order:

        1. take the positions below which every event is done, and the states to store, with
           no await in between: the idle dirty keys' states, and for a key with work in flight
           the copy its lane took after its last finished event (`settled`). Such a key stays
           dirty and holds its partition's position below its first unfinished event, so a
           crash replays it. Everything taken reflects only events whose outputs were written
           before step 2 began;
        2. flush the sink, so every one of those outputs is acknowledged;
        3. publish the states and the bookkeeping (positions, where the outputs of uncommitted
           input begin, epoch, anchor) to the changelog and wait for the broker;
        4. write the same to each partition's store in one batch;
        5. commit the positions at the source, if it takes commits.

        Returns the positions made durable.
        """
        # Step 1.
        positions = tracker.committable()
        if self.assigned is not None:
            positions = {tp: o for tp, o in positions.items() if tp in self.assigned}
        by_tp: dict[TP, dict[str, bytes | None]] = {tp: {} for tp in positions}
        settled = {}
        for k in list(self._dirty):
            tp = self._tp[k]
            if k in busy:
                snap = self._snap.get(k)
                if snap is not None:
                    by_tp.setdefault(tp, {})[k], self._dirty[k] = snap
                    settled[k] = snap
                first = self._dirty[k]
                if tp in positions and first < positions[tp]:
                    positions[tp] = first
                continue
            del self._dirty[k]
            by_tp.setdefault(tp, {})[k] = _state_enc.encode(self._hot[k])
        anchors = {tp: (last.source.offset, record_fingerprint(last)) for tp in positions
                   if (last := self._last.get(tp)) is not None}
        # Step 2.
        await sink.flush()
        metas: dict[TP, dict[str, int]] = {}
        for tp in by_tp:
            meta = {"epoch": self.epochs.get(tp, 0)}
            if self.bookkeeping is not None:
                meta.update(self.bookkeeping(tp[1]))
            if tp in positions:
                if isinstance(sink, ReplayableSink):
                    meta.update(sink.checkpoint_meta(tp[1], positions[tp]))
                if tp in anchors:
                    meta["anchor_offset"], meta["anchor"] = anchors[tp]
            metas[tp] = meta
        # Step 3.
        if isinstance(source, CommittingSource) and not source.member():
            # a group that may have handed our partitions on must not see our states
            msg = "not sure of the group membership: states held back"
            raise MembershipUnsure(msg)
        if self.changelog is not None and by_tp:
            reached = await self.changelog.publish({tp[1]: (by_tp[tp], metas[tp]) for tp in by_tp})
            for tp in by_tp:
                metas[tp]["changelog"] = reached[tp[1]]
        # Step 4.
        for tp, states in by_tp.items():
            self._store(tp).write(states, {tp: positions[tp]} if tp in positions else {}, metas[tp])
        # Step 5.
        accepted = True
        if isinstance(source, CommittingSource) and positions:
            accepted = await source.commit(positions)
            if not accepted:
                logger.warning("commit of %s refused (a rebalance is under way); the next owner "
                               "replays from the last commit and drops what it already has", positions)
        if accepted and isinstance(sink, ReplayableSink):
            for tp, offset in positions.items():
                sink.prune(tp[1], offset)
        for k, snap in settled.items():  # stored; a newer one its lane took meanwhile stays
            if self._snap.get(k) is snap:
                del self._snap[k]
        return positions

    # -- rebalances ---------------------------------------------------------------------------

    async def assign(self, tps: list[TP], sink: Sink, source: Source) -> None:
        """Take partitions over:

        1. open their stores and bring them up to the changelog;
        2. check each partition's anchor against the log: a log that no longer holds the
           record the last checkpoint saw started again, so the partition begins a new epoch
           and is read from its start;
        3. let the sink learn which outputs of uncommitted input already exist.
        """
        async with self._lock:
            self.assigned = (self.assigned or set()) | set(tps)
            for tp in tps:  # reading starts afresh: from the last commit, or the log's start
                self._last.pop(tp, None)
            # Step 1.
            stores = {tp[1]: self._store(tp) for tp in tps}
            if self.changelog is not None:
                metas = await self.changelog.restore(stores)
            else:
                metas = {p: s.meta() for p, s in stores.items()}
            # Step 2.
            anchored = {tp: metas[tp[1]]["anchor_offset"] for tp in tps if "anchor_offset" in metas[tp[1]]}
            found = await source.anchors(anchored) if anchored and isinstance(source, CommittingSource) else {}
            restart = []
            for tp in tps:
                meta = metas[tp[1]]
                if self.restored is not None:
                    self.restored(tp[1], meta)
                self.epochs[tp] = meta.get("epoch", 0)
                fp = found.get(tp)
                if fp is None or fp == BEFORE_START or fp == meta.get("anchor"):
                    continue
                why = "ends before" if fp == BEYOND_END else "holds another record at"
                self.epochs[tp] += 1
                logger.warning("%s[%d]: the log %s offset %d that the last checkpoint saw: it started "
                               "again; reading it from its start as epoch %d", tp[0], tp[1], why,
                               anchored[tp], self.epochs[tp])
                restart.append(tp)
                # outputs of the new epoch start wherever the output topic now ends
                meta.pop("decisions_from", None)
                meta.pop("dead_from", None)
                meta["epoch"] = self.epochs[tp]
            if restart and isinstance(source, CommittingSource):
                source.rewind(restart)
            # Step 3.
            if isinstance(sink, ReplayableSink):
                await sink.recover(metas)
            logger.info("assigned %s", tps)

    async def revoke(self, tps: list[TP], drain: Callable[[], object], tracker: CompletionTracker,
                     sink: Sink, source: Source, busy: dict | set) -> None:
        """Hand partitions back: finish in-flight work, checkpoint while they are still ours,
        then forget their keys and close their stores."""
        gone = set(tps)
        self.leaving |= gone  # before any await: the run loop admits nothing more of them
        async with self._lock:
            await drain()
            try:
                await self._checkpoint(tracker, sink, source, busy)
            except MembershipUnsure as e:
                # handed back without a word from the group for too long: treat them as lost
                logger.warning("revoking %s without a checkpoint: %s", tps, e)
                if isinstance(sink, ReplayableSink):
                    for tp in gone:
                        sink.abandon(tp[1])
            if self.assigned is not None:
                self.assigned -= gone
            self._forget(gone, tracker, sink)
            logger.info("revoked %s", tps)

    async def lose(self, tps: list[TP], drain: Callable[[], object], tracker: CompletionTracker,
                   sink: Sink) -> None:
        """The group gave these partitions to another member before we could hand them back
        (our session expired): finish in-flight work, but drop what it and anything earlier
        still wants to write, commit nothing, and forget them. The new owner replays from the
        last commit and reproduces exactly what is dropped here."""
        gone = set(tps)
        self.leaving |= gone
        async with self._lock:
            await drain()
            if self.assigned is not None:
                self.assigned -= gone
            if isinstance(sink, ReplayableSink):
                for tp in gone:
                    sink.abandon(tp[1])
            self._forget(gone, tracker, sink)
            logger.warning("lost %s to another member: nothing more is written for them", tps)

    async def new_epoch(self, tp: TP, drain: Callable[[], object], tracker: CompletionTracker,
                        sink: Sink, source: Source, busy: dict | set) -> None:
        """A partition's offsets went backwards under a running worker: finish and checkpoint
        what was read of the old log, then count the partition's offsets from a new epoch."""
        async with self._lock:
            await drain()
            await self._checkpoint(tracker, sink, source, busy)
            tracker.forget(*tp)
            self._last.pop(tp, None)
            self.epochs[tp] = self.epochs.get(tp, 0) + 1
            logger.warning("%s[%d]: offsets went backwards: the log started again; epoch %d",
                           tp[0], tp[1], self.epochs[tp])

    def _forget(self, gone: set[TP], tracker: CompletionTracker, sink: Sink) -> None:
        self.leaving -= gone
        if self.released is not None:
            for tp in gone:
                self.released(tp[1])
        for key in [k for k, tp in self._tp.items() if tp in gone]:
            del self._tp[key]
            self._hot.pop(key, None)
            self._dirty.pop(key, None)
            self._snap.pop(key, None)
        for tp in gone:
            tracker.forget(*tp)
            self._last.pop(tp, None)
            store = self._stores.pop(tp, None)
            if store is not None and store is not self.store:
                store.close()
            if isinstance(sink, ReplayableSink):
                sink.forget(tp[1])

    def close(self) -> None:
        for store in {id(s): s for s in self._stores.values()}.values():
            if store is not self.store:
                store.close()
        self._stores.clear()
        if self._tmpdir is not None:
            self.store.close()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

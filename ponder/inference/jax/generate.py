"""Continuously batched generation over KV sessions: the engine's scheduler.

`Generator.serve` keeps one batch decoding and lets requests join it between steps (at most
`max_batch` rows, one row per session key at a time); `generate` serves a fixed list. Each turn
of the loop schedules (retire finished rows, admit waiting ones, lay the batch out again when
it no longer fits), advances the joining rows' prefill by a chunk (`join`), and runs one decode
step (`step`). The pieces:

* `rows`: requests, results, and the row each request occupies;
* `batch`: slot bookkeeping and the shape buckets;
* `kvcache`: the K/V layouts and every move between pool pages and batch caches;
* `sessions`: the paged pool of per-key sessions, spilled to host and dropped by LRU;
* `join`: prefill of joining rows, forks for n > 1 samples, insertion into free slots;
* `step`: the jitted model calls, the decode step and accepting tokens on the host;
* `vision` / `frames` (the engine's): image features, cached per key, that ride on requests as
  `rows.Embeds`;
* `speculate`: draft tokens (prompt lookup, grammar fast-forward) that a decode step verifies
  several at a time, for greedy rows (`speculate=Speculation()`).

The batch's lifecycle:

* Decode: every slot's sampled token is fed back and the next sampled. A row that stops is
  answered at once; before the next step its cache row is written back to its session's
  pages, the session records its tokens and is unpinned, and the slot is free.
* Join: the pool matches each joining prompt against its session's cached tokens and pins its
  pages; the joining rows are gathered into a batch of their own, their uncached suffixes go
  through the prefill T tokens at a time, one chunk per decode step of the running rows (one
  group joins at a time), then they are inserted into free slots. Prefill thus costs only the
  joining rows, not the whole batch.
* Samples: a request with `n` > 1 joins as one row, so its prompt is prefilled once; before it
  is inserted its row's K/V and last logits are copied into n rows, each decoding on its own
  (seed + i, its own constraint state). Sample 0 holds the request's session; the others hold
  anonymous sessions of their own, dropped when they finish.
* Lay out again: when joining rows need more slots than are free or a longer cache, or when the
  live rows fit a batch bucket half the size, the whole batch is scattered back to the pool
  and gathered again at the new (B, S).

B, T and S are rounded up to buckets (padding rows read and write the pool's scratch page), so
a warmed-up generator never traces again: `compiles` counts traces (all generators of the
process share the jitted functions and their caches).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import join as joining
from . import step
from .batch import Batch, Join, bucket, held, length_buckets
from .compiles import TRACES
from .config import ModelConfig
from .kvcache import fork_rows, insert_rows
from .rows import SEED_MASK, GenRequest, GenResult, Row, request_result
from .sessions import PoolFull, SessionPool
from .speculate import SpecStats, Speculation

log = logging.getLogger(__name__)

__all__ = ["GenRequest", "GenResult", "Generator", "Speculation", "bucket", "length_buckets"]

SHRINK_AFTER = 4  # steps a batch stays oversized before it is laid out smaller


class Generator:
    """Bucketed, batched generation for one model. Not thread-safe: call from one thread.

    `device_bytes` caps the session pool (allocated up front), `host_bytes` the sessions spilled
    to host memory, stored as `host_kv` says ("int8", "int4" or "none": see sessions).
    `prefill_tokens` caps B*T of one prefill chunk (the attention scores of a
    chunk are B*Hq*T*S floats). `eos_ids` stop a row unless its constraint says otherwise.
    """

    def __init__(self, cfg: ModelConfig, params, *, n_vocab: int | None = None,
                 eos_ids: Sequence[int] = (), max_batch: int = 32, max_seq_len: int | None = None,
                 device_bytes: int = 256 << 20, host_bytes: int = 1 << 30, page_size: int = 64,
                 host_kv: str = "int8",
                 batch_buckets: Sequence[int] | None = None,
                 chunk_buckets: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024),
                 seq_buckets: Sequence[int] | None = None, prefill_tokens: int = 2048,
                 speculate: Speculation | None = None) -> None:
        self.cfg, self.params = cfg, params
        self.dtype = params["embed"].dtype
        self.n_vocab = min(n_vocab or cfg.vocab_size, cfg.vocab_size)
        self.eos_ids = frozenset(eos_ids or cfg.eos_token_id)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.pool = SessionPool(cfg, self.dtype, device_bytes=device_bytes, host_bytes=host_bytes,
                                host_kv=host_kv, page_size=page_size)
        P = page_size
        self.batch_buckets = tuple(sorted(set(batch_buckets or [b for b in (1, 2, 4, 8, 16, 32, 64, 128)
                                                                if b < max_batch] + [max_batch])))
        self.chunk_buckets = tuple(sorted(chunk_buckets))
        self.seq_buckets = tuple(sorted(seq_buckets or length_buckets(self.max_seq_len, P)))
        if any(s % P for s in self.seq_buckets) or self.batch_buckets[-1] < max_batch:
            msg = (f"Generator: seq_buckets must be multiples of page_size={P} and batch_buckets "
                   f"must reach max_batch={max_batch}")
            raise ValueError(msg)
        if self.chunk_buckets[0] > self.seq_buckets[0]:  # a short cache would find no chunk to prefill with
            msg = (f"Generator: the smallest chunk bucket {self.chunk_buckets[0]} is longer than the "
                   f"smallest seq bucket {self.seq_buckets[0]}")
            raise ValueError(msg)
        self.max_seq_len = min(self.max_seq_len, self.seq_buckets[-1])
        self.prefill_tokens = prefill_tokens
        if speculate is not None and not isinstance(speculate, Speculation):
            msg = f"Generator: speculate must be a Speculation or None, got {type(speculate).__name__}"
            raise TypeError(msg)
        self.speculate, self.spec_stats = speculate, SpecStats()
        self._anon = itertools.count()

    @property
    def compiles(self) -> int:
        """Traces so far of the jitted prefill, decode, sampling and page functions (process-wide)."""
        return sum(TRACES.values())

    # -- public ---------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Continue every prompt; one GenResult per request, in order."""
        results: list[GenResult | None] = [None] * len(requests)
        todo = [list(enumerate(requests))]

        def done(i: int, res: GenResult) -> None:
            results[i] = res

        self.serve(lambda: todo.pop() if todo else [], done)
        return results  # type: ignore[return-value]

    def serve(self, fetch: Callable[[], Sequence[tuple[Any, GenRequest]]],
              done: Callable[[Any, GenResult], None],
              on_admit: Callable[[int], None] | None = None) -> None:
        """Continuous batching, until nothing is left to run.

        `fetch()` returns the (tag, request) pairs that arrived since its last call, without
        blocking; it is called before every decode step, and new rows join the running batch
        (one row per session at a time, at most `max_batch`). `done(tag, result)` is called as
        each request finishes, from this thread. `on_admit(n)` hears how many rows joined
        together. Returns once every request fetched has been answered.
        """
        waiting: deque[Row] = deque()
        batch: Batch | None = None
        join: Join | None = None

        def answer(row: Row) -> None:
            if row.group is not None and any(r.finish is None for r in row.group):
                return  # the request's other samples decode on; the last one to finish answers
            try:
                done(row.tag, row.result() if row.group is None else request_result(row.group))
            except Exception:  # a caller's callback must not take the other rows down
                log.exception("generator: the done callback failed for request %r", row.tag)

        try:
            while True:
                for tag, req in fetch():
                    row = self._row(tag, req)
                    if row.finish:
                        answer(row)
                    else:
                        waiting.append(row)
                for row in [r for r in waiting if r.cancelled]:
                    waiting.remove(row)
                    row.finish, row.error = "error", "cancelled"
                    answer(row)
                admit: list[Row] = []
                running = held(batch, join)
                try:
                    if batch is not None:
                        self._retire(batch)
                        if not batch.live:
                            batch = None
                    live = batch.live if batch else []
                    if join is None:  # one group joins at a time
                        admit = self._pick(waiting, live)
                        if admit:
                            batch, join = self._admit(batch, admit, waiting, answer, on_admit)
                        elif batch is not None:
                            batch = self._shrink(batch)
                    if join is not None:
                        batch, join = joining.advance(self, batch, join)
                    if batch is None:
                        if waiting or join:
                            continue
                        return
                    running = held(batch, join)
                    step.decode(self, batch, answer)
                except Exception as e:  # noqa: BLE001 - the batch fails, its sessions are forgotten
                    log.exception("generator: a batch of %d rows failed", len(running))
                    self._fail(running + [r for r in admit if r not in waiting], e, answer)
                    batch = join = None
        finally:  # leaving by an exception (a fetch that raised): unpin what was running
            for row in held(batch, join):
                if row.finish is None:
                    self._drop(row)

    def warmup(self, batch_sizes: Sequence[int] | None = None, seq_lens: Sequence[int] | None = None,
               chunk_lens: Sequence[int] | None = None, sampling: Sequence[bool] = (False,),
               masked: Sequence[bool] = (False,), page_moves: bool = True, forks: bool = False) -> int:
        """Trace the shapes these sizes round up to (default: every batch bucket, the length
        buckets up to 1024, every chunk bucket that fits) using only the scratch page.
        `sampling` / `masked` pick the decode variants (True: top-p / a constraint mask), and
        with `speculate` those of the verify step at every T each batch bucket allows;
        `page_moves` the spill and restore copies; `forks` the copies that give the samples
        of a request with n > 1 their rows. Returns the number of new traces."""
        before = self.compiles
        Bs = {bucket(b, self.batch_buckets) for b in (batch_sizes or self.batch_buckets)}
        Ss = {bucket(s, self.seq_buckets) for s in (seq_lens or [s for s in self.seq_buckets if s <= 1024])}
        V, pool = self.cfg.vocab_size, self.pool
        # rows join a batch of B in a batch of their own, of any bucket up to B
        Bs = {b for b in self.batch_buckets if b <= max(Bs)}
        for B, S in itertools.product(sorted(Bs), sorted(Ss)):
            table = np.zeros((B, S // pool.page_size), np.int32)
            k, v = pool.gather(table)
            logits = jnp.zeros((B, V), jnp.float32)
            zeros = np.zeros(B, np.int32)
            for T in self.chunks(B, S, chunk_lens):
                tokens = np.zeros((B, T), np.int32)
                logits, k, v = step.prefill_chunk(self.params, self.cfg, tokens, zeros, zeros, logits, k, v)
            seeds, temps, top_ps = np.zeros(B, np.uint32), np.zeros(B, np.float32), np.ones(B, np.float32)
            for top_p, m in itertools.product(sampling, masked):
                kw = {"n_vocab": self.n_vocab, "greedy_only": not top_p}
                mask = np.ones((B, V), bool) if m else None
                tok, _ = step.first_token(logits, seeds, zeros, temps, top_ps, mask, **kw)
                tok, _, _, k, v = step.decode_step(self.params, self.cfg, tok, zeros, k, v, seeds, temps,
                                              top_ps, mask, **kw)
                for T in self.verify_lens(B):  # speculation's verify steps
                    tokens = np.zeros((B, T), np.int32)
                    vmask = None if mask is None else np.ones((B, T, V), bool)
                    _, _, k, v = step.verify(self.params, self.cfg, tokens, zeros, k, v, seeds, temps,
                                             top_ps, vmask, **kw)
            for Bn in (b for b in Bs if b <= B):
                k_new, v_new = pool.gather(np.zeros((Bn, S // pool.page_size), np.int32))
                k, v = insert_rows(k, v, k_new, v_new, np.full(Bn, B, np.int32))
                if forks:  # Bn prompts forked into B rows
                    fork_rows(k_new, v_new, logits[:Bn], np.zeros(B, np.int32))
            pool.scatter_row(table[0], k, v, 0)
            pool.scatter(table, k, v)
        if page_moves:  # spill and restore, in host_kv's form
            pool.warm_moves()
        if self.cfg.vision is not None:  # prefill chunks that carry image embeddings
            joining.warmup_embeds(self, batch_sizes, seq_lens, chunk_lens)
        jax.block_until_ready(pool.k)
        return self.compiles - before

    # -- admission ------------------------------------------------------------------------------

    def _row(self, tag: Any, r: GenRequest) -> Row:
        """A row for a request; one that cannot run comes back finished, with its error."""
        key = r.session if r.session is not None else f"\0anon-{next(self._anon)}"
        n = len(r.prompt)
        if n == 0 or n >= self.max_seq_len or r.max_tokens < 1:
            msg = (f"request {tag} (session {r.session!r}): a prompt of {n} tokens with max_tokens "
                   f"{r.max_tokens} does not fit: need 1 <= prompt < {self.max_seq_len} tokens "
                   f"and max_tokens >= 1")
            return Row(tag, key, r, finish="error", error=msg)
        if not (isinstance(r.n, int) and 1 <= r.n <= self.max_batch):  # its samples decode together
            msg = (f"request {tag} (session {r.session!r}) asks for n={r.n!r} samples; a request may "
                   f"ask for 1 to {self.max_batch} (the most rows decoded together)")
            return Row(tag, key, r, finish="error", error=msg)
        if isinstance(r.on_token, (list, tuple)) and len(r.on_token) != r.n:
            msg = (f"request {tag} (session {r.session!r}): {len(r.on_token)} on_token callbacks "
                   f"for n={r.n} samples")
            return Row(tag, key, r, finish="error", error=msg)
        vocab = self.cfg.vocab_size
        bad = next((t for t in r.prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:  # one bad id must not fail the other rows of its batch
            msg = f"request {tag} (session {r.session!r}): token id {bad!r} is not in 0..{vocab - 1}"
            return Row(tag, key, r, finish="error", error=msg)
        if (why := self._bad_embeds(r)) is not None:
            return Row(tag, key, r, finish="error", error=f"request {tag} (session {r.session!r}): {why}")
        if r.max_tokens > self.max_seq_len - n:
            r = replace(r, max_tokens=self.max_seq_len - n)
        need = -(-(n + r.max_tokens) // self.pool.page_size) * r.n  # every sample holds its own pages
        if need > self.pool.num_pages:  # never fits: say so now, not after everything else ran
            samples = f" for each of {r.n} samples" if r.n > 1 else ""
            msg = (f"request {tag} (session {r.session!r}) needs {need} pages of {self.pool.page_size} "
                   f"tokens for {n + r.max_tokens} tokens{samples}, but the pool has {self.pool.num_pages} "
                   f"(raise the session cap)")
            return Row(tag, key, r, finish="error", error=msg)
        seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little")
        return Row(tag, key, r, seed=seed & SEED_MASK)

    def _bad_embeds(self, r: GenRequest) -> str | None:
        """Why the request's embeddings cannot run (None: they can): each must cover prompt
        positions of its own, with [n, hidden_size] features."""
        taken = np.zeros(len(r.prompt), bool)
        for e in r.embeds:
            shape = np.shape(e.features)
            if len(shape) != 2 or shape[1] != self.cfg.hidden_size or shape[0] < 1:
                return f"embeddings at {e.start} have shape {shape}, not [n, {self.cfg.hidden_size}]"
            if not (0 <= e.start and e.start + shape[0] <= len(r.prompt)):
                return (f"embeddings at {e.start}..{e.start + shape[0] - 1} fall outside the prompt of "
                        f"{len(r.prompt)} tokens")
            if taken[e.start : e.start + shape[0]].any():
                return f"embeddings at {e.start} overlap another's positions"
            taken[e.start : e.start + shape[0]] = True
        return None

    def _pick(self, waiting: deque[Row], live: list[Row]) -> list[Row]:
        """Take the waiting rows that can join now, first come first served: free slots (a
        request takes one per sample), no session twice (a later request of a running session
        waits for it), and nobody behind a request that is waiting for slots or pages."""
        room = self.max_batch - len(live)
        busy = {r.key for r in live}
        picked, kept, used = [], deque(), 0
        while waiting:
            row = waiting.popleft()
            if row.key in busy:
                kept.append(row)
            elif used + row.req.n <= room:
                picked.append(row)
                busy.add(row.key)
                used += row.req.n
                if row.deferred:  # it waits for pages: nobody behind it takes them first
                    room = used
            else:  # it waits for slots: nobody behind it takes them first
                kept.append(row)
                room = used
        waiting.extend(kept)
        return picked

    def _acquire(self, rows: list[Row], alone: bool) -> tuple[list[Row], list[Row]]:
        """Pin the rows' sessions -> (rows to run, rows deferred). A row that finds no room even
        alone (`alone`: no other row is running) comes back finished, with its error."""
        ok, deferred = [], []
        for row in rows:
            if deferred:  # first come, first served: nobody passes a row waiting for pages
                deferred.append(row)
                continue
            cap = row.cap
            try:
                row.cached = self.pool.acquire(row.key, row.keyed, cap)
                self._pin_forks(row)
            except PoolFull as e:
                if ok or deferred or not alone:
                    row.deferred = True
                    deferred.append(row)
                    continue
                row.finish, row.error = "error", str(e)
                ok.append(row)
                continue
            row.deferred = False
            ok.append(row)
        return ok, deferred

    def _pin_forks(self, row: Row) -> None:
        """Pin a session of its own for each further sample of the row's request (filled from
        the prompt's K/V once that is prefilled), all or none: on PoolFull the row's own
        session is unpinned too, keeping what it holds."""
        keys = [f"\0anon-{next(self._anon)}" for _ in range(row.req.n - 1)]
        try:
            for key in keys:
                self.pool.acquire(key, [], row.cap)
        except PoolFull:
            for key in keys:
                self.pool.drop(key)
            self.pool.release(row.key, row.keyed[: row.cached])
            raise
        row.forks = keys

    def _retire(self, batch: Batch) -> None:
        """Write finished rows back to their sessions and free their slots."""
        done = [b for b, r in enumerate(batch.rows) if r is not None and r.finish is not None]
        if not done:
            return
        # the arrays handed to jitted calls are never edited afterwards: on CPU such a call may
        # read a numpy argument in place when it runs, after the host has moved on
        batch.table, batch.temps = batch.table.copy(), batch.temps.copy()
        for b in done:
            row = batch.rows[b]
            if row.keeps:
                self.pool.scatter_row(batch.table[b].copy(), batch.k, batch.v, b)
            self._release(row)
            batch.rows[b] = None
            batch.table[b] = 0
            batch.temps[b] = 0.0
        batch.sync()

    def _admit(self, batch: Batch | None, admit: list[Row], waiting: deque[Row],
               answer: Callable[[Row], None],
               on_admit: Callable[[int], None] | None) -> tuple[Batch | None, Join | None]:
        """Pin the admitted rows' sessions and gather them for their own prefill, laying the
        running batch out again first if they will not fit it (more rows than free slots, or a
        longer cache) -> (batch, the join)."""
        kept = batch.live if batch else []
        new, deferred = self._acquire(admit, alone=not kept)
        waiting.extendleft(reversed(deferred))
        for row in [r for r in new if r.finish]:
            self._drop(row)
            answer(row)
        new = [r for r in new if not r.finish]
        if not new:
            return batch, None
        now = time.perf_counter()
        for r in new:
            r.admitted = now
        if on_admit:
            on_admit(len(new))
        S = bucket(max(r.cap for r in kept + new), self.seq_buckets)
        slots = sum(r.req.n for r in new)  # each sample of a request gets a row once prefilled
        if batch is not None and (S > batch.S or len(batch.free) < slots):
            batch = self._relayout(batch, len(kept) + slots, S)
        S = batch.S if batch is not None else S

        Bn = bucket(len(new), self.batch_buckets)
        table = self.pool.table([r.key for r in new], Bn, S)
        k, v = self.pool.gather(table)
        pos = np.zeros(Bn, np.int32)
        pos[: len(new)] = [r.cached for r in new]
        todo = [r.keyed[r.cached :] for r in new] + [[]] * (Bn - len(new))
        logits = jnp.zeros((Bn, self.cfg.vocab_size), jnp.float32)
        return batch, Join(new, S, table, k, v, pos, todo, logits)

    def _shrink(self, batch: Batch) -> Batch:
        """Lay the batch out smaller once its live rows have fit a smaller batch bucket or a
        shorter cache for SHRINK_AFTER steps running (a layout costs two copies of the caches,
        so a batch whose size hovers at a bucket edge is not relaid out at every arrival and
        departure)."""
        live = batch.live
        S = bucket(max(r.cap for r in live), self.seq_buckets)
        smaller = bucket(len(live), self.batch_buckets) < len(batch.rows) or S < batch.S
        batch.slack = batch.slack + 1 if smaller else 0
        return self._relayout(batch, len(live), S) if batch.slack >= SHRINK_AFTER else batch

    def _relayout(self, batch: Batch | None, n: int, S: int) -> Batch:
        """A batch of bucket(n) slots and cache length S whose first slots hold the live rows of
        `batch` (written back to the pool and gathered again); the rest are free."""
        fresh = Batch.empty(bucket(n, self.batch_buckets), S, self.pool.page_size)
        kept = []
        if batch is not None:
            self.pool.scatter(batch.table, batch.k, batch.v)  # free slots point at the scratch page
            tok, lp, pos = batch.host()
            for b, row in enumerate(batch.rows):
                if row is None or row.finish is not None:
                    continue
                j = len(kept)
                kept.append(row)
                fresh.rows[j] = row
                fresh.tok[j], fresh.logprob[j], fresh.pos[j] = tok[b], lp[b], pos[b]
                fresh.seeds[j], fresh.temps[j], fresh.top_ps[j] = batch.seeds[b], batch.temps[b], batch.top_ps[b]
        fresh.table = self.pool.table([r.key for r in kept], len(fresh.rows), S)
        fresh.k, fresh.v = self.pool.gather(fresh.table)
        fresh.sync()
        return fresh

    # -- decoding -------------------------------------------------------------------------------

    def _release(self, row: Row) -> None:
        if not row.keeps:
            self.pool.drop(row.key)
        else:  # every sampled token but the last has been fed back through the model
            self.pool.release(row.key, row.keyed + row.out[: max(row.sampled - 1, 0)])

    def _drop(self, row: Row) -> None:
        """Forget the row's session and those pinned for its request's other samples."""
        for key in [row.key, *row.forks]:
            self.pool.drop(key)

    def _fail(self, rows: list[Row], e: Exception, answer: Callable[[Row], None]) -> None:
        for row in rows:
            self._drop(row)
            if row.finish is None:
                row.finish, row.error = "error", f"{type(e).__name__}: {e}"
                answer(row)

    def verify_lens(self, B: int) -> list[int]:
        """The verify step's T's at batch B (none when speculation is off)."""
        spec = self.speculate
        return [] if spec is None else [T for T in spec.buckets if T <= spec.max_len(B)]

    def chunks(self, B: int, S: int, chunk_lens: Sequence[int] | None = None) -> list[int]:
        """Chunk lengths usable at batch B and cache length S (B*T <= prefill_tokens, T <= S)."""
        ok = [T for T in self.chunk_buckets
              if T <= S and (B * T <= self.prefill_tokens or T == self.chunk_buckets[0])]
        if chunk_lens is not None:
            ok = [T for T in ok if T in {bucket(c, self.chunk_buckets) for c in chunk_lens}]
        return ok


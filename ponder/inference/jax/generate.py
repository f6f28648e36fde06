"""Continuously batched generation over KV sessions with bucketed shapes: one jitted prefill
chunk, one jitted decode step, and a count of every trace.

`Generator.serve` keeps one batch decoding and lets requests join it between steps (at most
`max_batch` rows, one row per session key at a time); `generate` serves a fixed list. The batch
holds contiguous caches (K [L, B, Hkv, D, S], V [L, B, Hkv, S, D]), one slot per row.

* Decode: `decode_step` feeds every slot's sampled token back and samples the next. A row that
  stops is answered at once; before the next step its cache row is written back to its
  session's pages (`scatter_row`), the session records its tokens and is unpinned, and the
  slot is free.
* Join: the pool matches each joining prompt against its session's cached tokens and pins its
  pages; the joining rows are gathered into a batch of their own, their uncached suffixes go
  through `prefill_chunk` T tokens at a time, one chunk per decode step of the running rows (a
  long prompt does not stall them; one group joins at a time), and `insert_rows` copies them
  into free slots. Prefill thus costs only the joining rows, not the whole batch.
* Samples: a request with `n` > 1 joins as one row, so its prompt is prefilled once; before
  it is inserted, `fork_rows` copies that row's K/V and last logits into n rows, and each
  decodes on its own (its own seed, seed + i, and its own constraint state). Sample 0 holds the
  request's session and writes back to it like any row; the others hold anonymous sessions of
  their own (pages for a lay-out-again round trip), dropped when they finish. The request is
  answered once its last sample finishes.
* Lay out again: when joining rows need more slots than are free or a longer cache, or when the
  live rows fit a batch bucket half the size, the whole batch is scattered back to the pool
  and gathered again at the new (B, S).

B, T and S are rounded up to buckets (padding rows read and write the pool's scratch page), so
a warmed-up generator never traces again: `compiles` counts traces (all generators of the
process share the jitted functions and their caches).
"""

from __future__ import annotations

import itertools
import math
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .model import decoder, lm_logits
from .sampling import sample
from .sessions import (
    TRACES,
    PoolFull,
    SessionPool,
    counted_jit,
    read_pages,
    write_pages,
)

log = logging.getLogger(__name__)

__all__ = ["GenRequest", "GenResult", "Generator", "bucket", "length_buckets"]

SEED_MASK = 0xFFFFFFFF  # seeds are uint32 on the device: sample i draws with (seed + i) mod 2**32
SHRINK_AFTER = 4  # steps a batch stays oversized before it is laid out smaller
CLOSE_RESERVE = 16  # constrained rows try to close their JSON once this few tokens are left


@dataclass
class GenRequest:
    """One prompt to continue. `session` None: no session (nothing kept afterwards).
    temperature 0 is greedy; `seed` None draws one. `constraint` is a constrain.Constraint.
    `n` > 1 draws n samples of the prompt, prefilled once: sample i is seeded `seed + i`, so
    it draws what a request of its own with that seed would. `on_token(id)` is called (from
    the generating thread) for each token as it is chosen (`on_token[i](id)` for sample i when
    it is a sequence of n callables); a truthy return ends the row there (finish_reason
    "stop"), e.g. on a stop string; an exception it raises ends only this row, with an error.
    Setting `cancelled` (the caller gave up) drops the request if it is still waiting and ends
    its rows at the next step if not."""

    session: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    constraint: Any = None
    on_token: Callable[[int], Any] | Sequence[Callable[[int], Any]] | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    cancelled: threading.Event | None = None
    n: int = 1


@dataclass
class GenResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token; closers get 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = None
    # n > 1: every sample's own result, in order; the fields above are then sample 0's, with
    # the prompt's counts (once), and an error of any sample
    samples: list[GenResult] = field(default_factory=list)
    # seconds in each phase: waiting for a slot (queue), prefill to the first token, decode
    phases: dict[str, float] | None = None


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    msg = f"{n} is larger than the largest bucket {buckets[-1]}"
    raise ValueError(msg)


def length_buckets(max_len: int, page_size: int = 64) -> tuple[int, ...]:
    """Cache lengths: page_size times 1, 1.5, 2, 3, 4, 6, 8, ... (padding waste under 50%),
    capped by and including max_len rounded down to a page."""
    top = max_len // page_size * page_size
    out = {top}
    for k in itertools.count():
        for f in (2, 3):
            n = page_size * f * 2**k // 2
            if n >= page_size and n % page_size == 0 and n < top:
                out.add(n)
        if page_size * 2**k >= top:
            break
    return tuple(sorted(out))


# --- the jitted functions (cfg static; caches donated) --------------------------------------


def _prefill_chunk(params, cfg: ModelConfig, tokens, start, n_new, logits, k, v):
    # tokens: [B, T]; start, n_new: [B] (row b's chunk sits at start[b], n_new[b] tokens valid)
    # logits: [B, V] carried over: rows with n_new > 0 take the logits of their last new token
    x, k, v = decoder(params, cfg, tokens, start, k, v)  # x: [B, T, E]
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, E]
    logits = jnp.where((n_new > 0)[:, None], lm_logits(params, cfg, last), logits)
    return logits, k, v


def _decode_step(params, cfg: ModelConfig, tok, pos, k, v, seeds, temperature, top_p, mask,
                 *, n_vocab: int, greedy_only: bool):
    # tok, pos: [B] (each row's last token and its position) -> the next token, its logprob, pos+1
    x, k, v = decoder(params, cfg, tok[:, None], pos, k, v)  # x: [B, 1, E]
    logits = lm_logits(params, cfg, x[:, 0])  # [B, V]
    nxt, logprob = sample(logits, seeds, pos + 1, temperature, top_p, mask,
                          n_vocab=n_vocab, greedy_only=greedy_only)
    return nxt, logprob, pos + 1, k, v


def _fork(k, v, logits, src):
    # src: int32 [Bm], the joining row each new row copies -> K/V [L, Bm, ...], logits [Bm, V]
    return k[:, src], v[:, src], logits[src]


def _insert(k, v, k_new, v_new, slots):
    # slots: int32 [Bn], the batch slot of each new row; padding rows name slot B and are dropped
    return k.at[:, slots].set(k_new, mode="drop"), v.at[:, slots].set(v_new, mode="drop")


prefill_chunk = counted_jit(_prefill_chunk, "prefill", static_argnums=1, donate_argnums=(5, 6, 7))
decode_step = counted_jit(_decode_step, "decode", static_argnums=1, donate_argnums=(4, 5),
                          static_argnames=("n_vocab", "greedy_only"))
first_token = counted_jit(sample, "sample", static_argnames=("n_vocab", "greedy_only"))
insert_rows = counted_jit(_insert, "insert", donate_argnums=(0, 1))
fork_rows = counted_jit(_fork, "fork")


@dataclass(eq=False)
class _Row:
    tag: Any  # the caller's handle for this request
    key: str
    req: GenRequest
    cached: int = 0
    seed: int = 0
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: int = 0  # tokens of `out` the model chose (the rest closed a constrained answer)
    state: Any = None  # constraint state
    finish: str | None = None
    error: str | None = None
    deferred: bool = False  # found no pages last time: rows behind it wait
    index: int = 0  # which sample of its request this row draws
    forks: list[str] = field(default_factory=list)  # n > 1, until forked: the other samples' sessions
    group: list[_Row] | None = None  # n > 1, once forked: every sample's row, in order (shared)
    born: float = field(default_factory=time.perf_counter)  # phases (perf_counter s): arrived,
    admitted: float = 0.0  # its prefill began,
    first: float = 0.0  # its first token was chosen

    @property
    def cap(self) -> int:
        """Tokens the row may hold: its prompt and every token it may generate."""
        return len(self.req.prompt) + self.req.max_tokens

    @property
    def cancelled(self) -> bool:
        return self.req.cancelled is not None and self.req.cancelled.is_set()

    @property
    def keeps(self) -> bool:
        """Its K/V go back to the request's session (a further sample's never do)."""
        return self.req.session is not None and self.index == 0

    @property
    def on_token(self) -> Callable[[int], Any] | None:
        f = self.req.on_token
        return f[self.index] if isinstance(f, (list, tuple)) else f

    def result(self) -> GenResult:
        phases = None
        if self.admitted:
            first, done = self.first or time.perf_counter(), time.perf_counter()
            phases = {"queue": self.admitted - self.born, "prefill": first - self.admitted, "decode": done - first}
        return GenResult(self.out, self.logprobs, len(self.req.prompt), self.cached,
                         self.finish or "stop", self.error, phases=phases)


def _request_result(rows: list[_Row]) -> GenResult:
    """The answer to a request with n > 1 from its samples' rows: sample 0's tokens, the
    prompt counted once, every sample in `samples`, and the first sample's error if any."""
    res = rows[0].result()
    res.samples = [r.result() for r in rows]
    if res.phases:  # the request decodes until its last sample is done
        res.phases["decode"] = max(s.phases["decode"] for s in res.samples if s.phases)
    bad = next((r for r in rows if r.error), None)
    if bad is not None:
        res.finish_reason, res.error = "error", f"sample {bad.index}: {bad.error}"
    return res


@dataclass(eq=False)
class _Batch:
    """The rows decoding together. Slot b of the caches holds rows[b]; None is a free slot
    (its cache row is junk, its table row the scratch page). Per-slot sampling settings live
    on the host (numpy) with device copies in `dev`."""

    rows: list[_Row | None]
    S: int
    table: np.ndarray  # [B, S/P] the pages of each slot's session
    k: Any = None
    v: Any = None
    tok: Any = None  # [B] each slot's latest sampled token, not yet taken by its row
    logprob: Any = None  # [B] its log-probability
    pos: Any = None  # [B] its position (where its K/V go when it is fed back)
    seeds: np.ndarray = None  # type: ignore[assignment]
    temps: np.ndarray = None  # type: ignore[assignment]
    top_ps: np.ndarray = None  # type: ignore[assignment]
    dev: tuple = ()
    greedy_only: bool = True
    slack: int = 0  # consecutive steps the live rows would have fit a smaller layout

    @classmethod
    def empty(cls, B: int, S: int, page_size: int) -> _Batch:
        return cls([None] * B, S, np.zeros((B, S // page_size), np.int32), tok=np.zeros(B, np.int32),
                   logprob=np.zeros(B, np.float32), pos=np.zeros(B, np.int32), seeds=np.zeros(B, np.uint32),
                   temps=np.zeros(B, np.float32), top_ps=np.ones(B, np.float32))

    @property
    def live(self) -> list[_Row]:
        return [r for r in self.rows if r is not None and r.finish is None]

    @property
    def free(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is None]

    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Writable host copies of tok, logprob, pos."""
        return tuple(np.array(a) for a in (self.tok, self.logprob, self.pos))  # type: ignore[return-value]

    def sync(self) -> None:
        """After the host-side settings changed: device copies and the greedy-only flag.
        Copies, because on CPU a jitted call may read a numpy argument in place, later."""
        self.dev = tuple(jnp.asarray(a.copy()) for a in (self.seeds, self.temps, self.top_ps))
        self.greedy_only = not any(r is not None and r.finish is None and r.req.temperature > 0
                                   for r in self.rows)


@dataclass(eq=False)
class _Join:
    """Rows joining the batch: prefilled in a batch of their own, a chunk per decode step of
    the running rows (so a long prompt does not stall them), then inserted into free slots."""

    rows: list[_Row]
    S: int
    table: np.ndarray  # [Bn, S/P]
    k: Any
    v: Any
    pos: np.ndarray  # [Bn] where each row's next prompt token goes
    todo: list[list[int]]  # each row's prompt tokens not yet prefilled
    logits: Any = None


def _held(batch: _Batch | None, join: _Join | None) -> list[_Row]:
    """Every row with pinned pages: in the batch's slots or joining it."""
    return ([r for r in batch.rows if r is not None] if batch else []) + (join.rows if join else [])


class Generator:
    """Bucketed, batched generation for one model. Not thread-safe: call from one thread.

    `device_bytes` caps the session pool (allocated up front), `host_bytes` the sessions spilled
    to host memory. `prefill_tokens` caps B*T of one prefill chunk (the attention scores of a
    chunk are B*Hq*T*S floats). `eos_ids` stop a row unless its constraint says otherwise.
    """

    def __init__(self, cfg: ModelConfig, params, *, n_vocab: int | None = None,
                 eos_ids: Sequence[int] = (), max_batch: int = 32, max_seq_len: int | None = None,
                 device_bytes: int = 256 << 20, host_bytes: int = 1 << 30, page_size: int = 64,
                 batch_buckets: Sequence[int] | None = None,
                 chunk_buckets: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024),
                 seq_buckets: Sequence[int] | None = None, prefill_tokens: int = 2048) -> None:
        self.cfg, self.params = cfg, params
        self.dtype = params["embed"].dtype
        self.n_vocab = min(n_vocab or cfg.vocab_size, cfg.vocab_size)
        self.eos_ids = frozenset(eos_ids or cfg.eos_token_id)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.pool = SessionPool(cfg, self.dtype, device_bytes=device_bytes, host_bytes=host_bytes,
                                page_size=page_size)
        P = page_size
        self.batch_buckets = tuple(sorted(set(batch_buckets or [b for b in (1, 2, 4, 8, 16, 32, 64, 128)
                                                                if b < max_batch] + [max_batch])))
        self.chunk_buckets = tuple(sorted(chunk_buckets))
        self.seq_buckets = tuple(sorted(seq_buckets or length_buckets(self.max_seq_len, P)))
        if any(s % P for s in self.seq_buckets) or self.batch_buckets[-1] < max_batch:
            msg = (f"Generator: seq_buckets must be multiples of page_size={P} and batch_buckets "
                   f"must reach max_batch={max_batch}")
            raise ValueError(msg)
        self.max_seq_len = min(self.max_seq_len, self.seq_buckets[-1])
        self.prefill_tokens = prefill_tokens
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
        waiting: deque[_Row] = deque()
        batch: _Batch | None = None
        join: _Join | None = None

        def answer(row: _Row) -> None:
            if row.group is not None and any(r.finish is None for r in row.group):
                return  # the request's other samples decode on; the last one to finish answers
            try:
                done(row.tag, row.result() if row.group is None else _request_result(row.group))
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
                admit: list[_Row] = []
                running = _held(batch, join)
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
                        batch, join = self._join_step(batch, join)
                    if batch is None:
                        if waiting or join:
                            continue
                        return
                    running = _held(batch, join)
                    self._step(batch, answer)
                except Exception as e:  # noqa: BLE001 - the batch fails, its sessions are forgotten
                    log.exception("generator: a batch of %d rows failed", len(running))
                    self._fail(running + [r for r in admit if r not in waiting], e, answer)
                    batch = join = None
        finally:  # leaving by an exception (a fetch that raised): unpin what was running
            for row in _held(batch, join):
                if row.finish is None:
                    self._drop(row)

    def warmup(self, batch_sizes: Sequence[int] | None = None, seq_lens: Sequence[int] | None = None,
               chunk_lens: Sequence[int] | None = None, sampling: Sequence[bool] = (False,),
               masked: Sequence[bool] = (False,), page_moves: bool = True, forks: bool = False) -> int:
        """Trace the shapes these sizes round up to (default: every batch bucket, the length
        buckets up to 1024, every chunk bucket that fits) using only the scratch page.
        `sampling` / `masked` pick the decode variants (True: top-p / a constraint mask);
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
            for T in self._chunks(B, S, chunk_lens):
                tokens = np.zeros((B, T), np.int32)
                logits, k, v = prefill_chunk(self.params, self.cfg, tokens, zeros, zeros, logits, k, v)
            seeds, temps, top_ps = np.zeros(B, np.uint32), np.zeros(B, np.float32), np.ones(B, np.float32)
            for top_p, m in itertools.product(sampling, masked):
                kw = {"n_vocab": self.n_vocab, "greedy_only": not top_p}
                mask = np.ones((B, V), bool) if m else None
                tok, _ = first_token(logits, seeds, zeros, temps, top_ps, mask, **kw)
                tok, _, _, k, v = decode_step(self.params, self.cfg, tok, zeros, k, v, seeds, temps,
                                              top_ps, mask, **kw)
            for Bn in (b for b in Bs if b <= B):
                k_new, v_new = pool.gather(np.zeros((Bn, S // pool.page_size), np.int32))
                k, v = insert_rows(k, v, k_new, v_new, np.full(Bn, B, np.int32))
                if forks:  # Bn prompts forked into B rows
                    fork_rows(k_new, v_new, logits[:Bn], np.zeros(B, np.int32))
            pool.scatter_row(table[0], k, v, 0)
            pool.scatter(table, k, v)
        if page_moves:  # spill and restore: page counts are rounded up to powers of two
            for e in range(math.ceil(math.log2(pool.num_pages)) + 1):
                idx = np.zeros(2**e, np.int32)
                for name in ("k", "v"):  # their page shapes differ
                    arr = getattr(pool, name)
                    read_pages(arr, idx)
                    page = (arr.shape[0], 2**e, *arr.shape[2:])
                    setattr(pool, name, write_pages(arr, idx, np.zeros(page, pool.dtype)))
        jax.block_until_ready(pool.k)
        return self.compiles - before

    # -- admission ------------------------------------------------------------------------------

    def _row(self, tag: Any, r: GenRequest) -> _Row:
        """A row for a request; one that cannot run comes back finished, with its error."""
        key = r.session if r.session is not None else f"\0anon-{next(self._anon)}"
        n = len(r.prompt)
        if n == 0 or n >= self.max_seq_len or r.max_tokens < 1:
            msg = (f"request {tag} (session {r.session!r}): a prompt of {n} tokens with max_tokens "
                   f"{r.max_tokens} does not fit: need 1 <= prompt < {self.max_seq_len} tokens "
                   f"and max_tokens >= 1")
            return _Row(tag, key, r, finish="error", error=msg)
        if not (isinstance(r.n, int) and 1 <= r.n <= self.max_batch):  # its samples decode together
            msg = (f"request {tag} (session {r.session!r}) asks for n={r.n!r} samples; a request may "
                   f"ask for 1 to {self.max_batch} (the most rows decoded together)")
            return _Row(tag, key, r, finish="error", error=msg)
        if isinstance(r.on_token, (list, tuple)) and len(r.on_token) != r.n:
            msg = (f"request {tag} (session {r.session!r}): {len(r.on_token)} on_token callbacks "
                   f"for n={r.n} samples")
            return _Row(tag, key, r, finish="error", error=msg)
        vocab = self.cfg.vocab_size
        bad = next((t for t in r.prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:  # one bad id must not fail the other rows of its batch
            msg = f"request {tag} (session {r.session!r}): token id {bad!r} is not in 0..{vocab - 1}"
            return _Row(tag, key, r, finish="error", error=msg)
        if r.max_tokens > self.max_seq_len - n:
            r = replace(r, max_tokens=self.max_seq_len - n)
        need = -(-(n + r.max_tokens) // self.pool.page_size) * r.n  # every sample holds its own pages
        if need > self.pool.num_pages:  # never fits: say so now, not after everything else ran
            samples = f" for each of {r.n} samples" if r.n > 1 else ""
            msg = (f"request {tag} (session {r.session!r}) needs {need} pages of {self.pool.page_size} "
                   f"tokens for {n + r.max_tokens} tokens{samples}, but the pool has {self.pool.num_pages} "
                   f"(raise the session cap)")
            return _Row(tag, key, r, finish="error", error=msg)
        seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little")
        return _Row(tag, key, r, seed=seed & SEED_MASK)

    def _pick(self, waiting: deque[_Row], live: list[_Row]) -> list[_Row]:
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

    def _acquire(self, rows: list[_Row], alone: bool) -> tuple[list[_Row], list[_Row]]:
        """Pin the rows' sessions -> (rows to run, rows deferred). A row that finds no room even
        alone (`alone`: no other row is running) comes back finished, with its error."""
        ok, deferred = [], []
        for row in rows:
            if deferred:  # first come, first served: nobody passes a row waiting for pages
                deferred.append(row)
                continue
            cap = row.cap
            try:
                row.cached = self.pool.acquire(row.key, row.req.prompt, cap)
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

    def _pin_forks(self, row: _Row) -> None:
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
            self.pool.release(row.key, row.req.prompt[: row.cached])
            raise
        row.forks = keys

    def _fork(self, join: _Join) -> _Join:
        """Give each further sample of the joined requests (n > 1) a row of its own, with a copy
        of its prompt's K/V and last logits: the prompt was prefilled once for all of them."""
        if not any(r.forks for r in join.rows):
            return join
        rows, src = [], []
        for j, r in enumerate(join.rows):
            rows.append(r)
            src.append(j)
            if r.forks:
                r.group = [r]
                for i, key in enumerate(r.forks, 1):
                    r.group.append(_Row(r.tag, key, r.req, cached=r.cached, seed=(r.seed + i) & SEED_MASK,
                                        index=i, group=r.group, born=r.born, admitted=r.admitted))
                    src.append(j)
                rows += r.group[1:]
                r.forks = []
        B = bucket(len(rows), self.batch_buckets)
        idx = np.zeros(B, np.int32)  # padding rows copy row 0: they are never inserted or read
        idx[: len(src)] = src
        k, v, logits = fork_rows(join.k, join.v, join.logits, idx)
        table = self.pool.table([r.key for r in rows], B, join.S)
        return _Join(rows, join.S, table, k, v, join.pos[idx], [[]] * B, logits)

    def _retire(self, batch: _Batch) -> None:
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

    def _admit(self, batch: _Batch | None, admit: list[_Row], waiting: deque[_Row],
               answer: Callable[[_Row], None],
               on_admit: Callable[[int], None] | None) -> tuple[_Batch | None, _Join | None]:
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
        todo = [r.req.prompt[r.cached :] for r in new] + [[]] * (Bn - len(new))
        logits = jnp.zeros((Bn, self.cfg.vocab_size), jnp.float32)
        return batch, _Join(new, S, table, k, v, pos, todo, logits)

    def _join_step(self, batch: _Batch | None, join: _Join) -> tuple[_Batch | None, _Join | None]:
        """Prefill one chunk of the joining rows, or all of them when nothing else decodes;
        once they are prefilled, insert them -> (batch, the join if it goes on)."""
        alone = batch is None or not batch.live
        while True:
            B = len(join.pos)
            chunks = self._chunks(B, join.S)
            T = bucket(min(max(map(len, join.todo)), chunks[-1]), chunks)
            tokens, n_new = np.zeros((B, T), np.int32), np.zeros(B, np.int32)
            for b, t in enumerate(join.todo):
                n_new[b] = len(t[:T])
                tokens[b, : n_new[b]] = t[:T]
                join.todo[b] = t[T:]
            join.logits, join.k, join.v = prefill_chunk(self.params, self.cfg, tokens, join.pos, n_new,
                                                        join.logits, join.k, join.v)
            join.pos = join.pos + n_new  # not +=: on CPU the running step may still read the old array
            if not any(join.todo):
                return self._insert(batch, self._fork(join)), None
            if not alone:
                return batch, join

    def _insert(self, batch: _Batch | None, join: _Join) -> _Batch:
        """Sample the joined rows' first tokens and put them into free slots (or make them the
        batch when nothing runs)."""
        new, S, table, k, v, pos = join.rows, join.S, join.table, join.k, join.v, join.pos
        n, Bn = len(new), len(pos)
        seeds, temps, top_ps = np.zeros(Bn, np.uint32), np.zeros(Bn, np.float32), np.ones(Bn, np.float32)
        for j, r in enumerate(new):
            seeds[j], temps[j], top_ps[j] = r.seed, r.req.temperature, r.req.top_p
            if r.req.constraint is not None:
                r.state = r.req.constraint.start()
        first, first_lp = first_token(join.logits, seeds, pos, temps, top_ps, self._mask(new, Bn),
                                      n_vocab=self.n_vocab, greedy_only=not (temps > 0).any())
        if batch is None:  # nothing running: the new rows' batch is the batch
            batch = _Batch.empty(Bn, S, self.pool.page_size)
            batch.k, batch.v, slots = k, v, list(range(n))
        else:
            slots = batch.free[:n]
            into = np.full(Bn, len(batch.rows), np.int32)  # padding rows go past the end: dropped
            into[:n] = slots
            batch.k, batch.v = insert_rows(batch.k, batch.v, k, v, into)
        tok, lp, bpos = batch.host()
        batch.table, batch.seeds = batch.table.copy(), batch.seeds.copy()
        batch.temps, batch.top_ps = batch.temps.copy(), batch.top_ps.copy()
        first, first_lp = np.asarray(first), np.asarray(first_lp)
        for j, (b, r) in enumerate(zip(slots, new)):
            batch.rows[b], batch.table[b] = r, table[j]
            tok[b], lp[b], bpos[b] = first[j], first_lp[j], pos[j]
            batch.seeds[b], batch.temps[b], batch.top_ps[b] = seeds[j], temps[j], top_ps[j]
        batch.tok, batch.logprob, batch.pos = jnp.asarray(tok), jnp.asarray(lp), jnp.asarray(bpos)
        batch.sync()
        batch.slack = 0
        return batch

    def _shrink(self, batch: _Batch) -> _Batch:
        """Lay the batch out smaller once its live rows have fit a smaller batch bucket or a
        shorter cache for SHRINK_AFTER steps running (a layout costs two copies of the caches,
        so a batch whose size hovers at a bucket edge is not relaid out at every arrival and
        departure)."""
        live = batch.live
        S = bucket(max(r.cap for r in live), self.seq_buckets)
        smaller = bucket(len(live), self.batch_buckets) < len(batch.rows) or S < batch.S
        batch.slack = batch.slack + 1 if smaller else 0
        return self._relayout(batch, len(live), S) if batch.slack >= SHRINK_AFTER else batch

    def _relayout(self, batch: _Batch | None, n: int, S: int) -> _Batch:
        """A batch of bucket(n) slots and cache length S whose first slots hold the live rows of
        `batch` (written back to the pool and gathered again); the rest are free."""
        fresh = _Batch.empty(bucket(n, self.batch_buckets), S, self.pool.page_size)
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

    def _step(self, batch: _Batch, answer: Callable[[_Row], None]) -> None:
        """Give every live row its pending token and sample the next one."""
        kw = {"n_vocab": self.n_vocab, "greedy_only": batch.greedy_only}
        args = batch.dev
        for row in batch.live:
            if row.cancelled:  # the caller gave up: free the slot
                row.finish, row.error = "error", "cancelled"
                answer(row)
        live = batch.live
        if not live:
            return
        ahead = None
        if all(r.state is None for r in live) and any(len(r.out) + 1 < r.req.max_tokens for r in live):
            # no constraint waits on this token and some row goes on: queue the next step before
            # reading this one, so the device never idles on the host
            ahead = decode_step(self.params, self.cfg, batch.tok, batch.pos, batch.k, batch.v,
                                *args, None, **kw)
        toks, lps = np.asarray(batch.tok).tolist(), np.asarray(batch.logprob).tolist()
        for row, t, lp in zip(batch.rows, toks, lps):
            if row is not None and row.finish is None:
                self._accept(row, t, lp)
                if row.finish:
                    answer(row)
        if ahead is None and batch.live:
            mask = self._mask(batch.rows, len(batch.rows))
            ahead = decode_step(self.params, self.cfg, batch.tok, batch.pos, batch.k, batch.v,
                                *args, mask, **kw)
        if ahead is not None:  # batch.k, batch.v were donated to the step
            batch.tok, batch.logprob, batch.pos, batch.k, batch.v = ahead

    def _release(self, row: _Row) -> None:
        if not row.keeps:
            self.pool.drop(row.key)
        else:  # every sampled token but the last has been fed back through the model
            self.pool.release(row.key, row.req.prompt + row.out[: max(row.sampled - 1, 0)])

    def _drop(self, row: _Row) -> None:
        """Forget the row's session and those pinned for its request's other samples."""
        for key in [row.key, *row.forks]:
            self.pool.drop(key)

    def _fail(self, rows: list[_Row], e: Exception, answer: Callable[[_Row], None]) -> None:
        for row in rows:
            self._drop(row)
            if row.finish is None:
                row.finish, row.error = "error", f"{type(e).__name__}: {e}"
                answer(row)

    def _chunks(self, B: int, S: int, chunk_lens: Sequence[int] | None = None) -> list[int]:
        """Chunk lengths usable at batch B and cache length S (B*T <= prefill_tokens, T <= S)."""
        ok = [T for T in self.chunk_buckets
              if T <= S and (B * T <= self.prefill_tokens or T == self.chunk_buckets[0])]
        if chunk_lens is not None:
            ok = [T for T in ok if T in {bucket(c, self.chunk_buckets) for c in chunk_lens}]
        return ok

    def _accept(self, row: _Row, t: int, logprob: float) -> None:
        """Take token t for a row; set row.finish when the row stops."""
        req, c = row.req, row.req.constraint
        if not row.first:
            row.first = time.perf_counter()
        if t in self.eos_ids and not req.ignore_eos and (c is None or c.is_complete(row.state)):
            row.finish = "stop"
            return
        row.out.append(t)
        row.logprobs.append(logprob)
        row.sampled += 1
        try:
            stop = bool(row.on_token(t)) if row.on_token else False  # the caller saw a stop string
        except Exception as e:  # noqa: BLE001 - one caller's callback ends only its own row
            row.finish, row.error = "error", f"on_token: {type(e).__name__}: {e}"
            return
        left = req.max_tokens - len(row.out)
        if c is not None and not stop:
            c.advance(row.state, t)
            stop = c.is_done(row.state)
            if not stop and 0 < left <= CLOSE_RESERVE and (close := c.close(row.state, left)) is not None:
                for t2 in close:  # finish the JSON without the model, within the budget
                    c.advance(row.state, t2)
                    row.out.append(t2)
                    row.logprobs.append(0.0)
                    if row.on_token:
                        row.on_token(t2)
                stop = True
        if stop:
            row.finish = "stop"
        elif left <= 0:
            row.finish = "length"

    def _mask(self, rows: Sequence[_Row | None], B: int) -> np.ndarray | None:
        """bool [B, V] of the active constrained rows' allowed tokens; None if there are none."""
        live = [(b, r) for b, r in enumerate(rows) if r is not None and r.state is not None
                and r.finish is None]
        if not live:
            return None
        mask = np.ones((B, self.cfg.vocab_size), bool)
        for b, r in live:
            mask[b] = r.req.constraint.mask(r.state)
        return mask

"""Batched generation over KV sessions with bucketed shapes: one jitted prefill chunk, one jitted
decode step, and a count of every trace.

`Generator.generate` runs its requests in rounds of at most `max_batch` rows, one row per
session key:

1. The pool matches each prompt against its session's cached tokens and pins its pages.
2. The rows' pages are gathered into contiguous caches (K [L, B, Hkv, D, S], V [L, B, Hkv, S, D]).
3. Prefill: the uncached suffixes go through `prefill_chunk` T tokens at a time.
4. Decode: `decode_step` feeds each sampled token back until every row has stopped.
5. The cache is scattered back into the pool, and each session records its tokens.

B, T and S are rounded up to buckets (padding rows read and write the pool's scratch page), so
a warmed-up generator never traces again: `compiles` counts traces (all generators of the
process share the jitted functions and their caches).
"""

from __future__ import annotations

import itertools
import math
import os
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

__all__ = ["GenRequest", "GenResult", "Generator", "bucket", "length_buckets"]

CLOSE_RESERVE = 16  # constrained rows try to close their JSON once this few tokens are left


@dataclass
class GenRequest:
    """One prompt to continue. `session` None: no session (nothing kept afterwards).
    temperature 0 is greedy; `seed` None draws one. `constraint` is a constrain.Constraint.
    `on_token(id)` is called (from the generating thread) for each token as it is chosen; a
    truthy return ends the row there (finish_reason "stop"), e.g. on a stop string."""

    session: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    constraint: Any = None
    on_token: Callable[[int], Any] | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks)


@dataclass
class GenResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token; closers get 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = None


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


prefill_chunk = counted_jit(_prefill_chunk, "prefill", static_argnums=1, donate_argnums=(5, 6, 7))
decode_step = counted_jit(_decode_step, "decode", static_argnums=1, donate_argnums=(4, 5),
                          static_argnames=("n_vocab", "greedy_only"))
first_token = counted_jit(sample, "sample", static_argnames=("n_vocab", "greedy_only"))


@dataclass
class _Row:
    i: int  # index into the caller's requests
    key: str
    req: GenRequest
    cached: int = 0
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: int = 0  # tokens of `out` the model chose (the rest closed a constrained answer)
    state: Any = None  # constraint state
    finish: str | None = None
    error: str | None = None


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
        pending: list[_Row] = []
        for i, r in enumerate(requests):
            n = len(r.prompt)
            if n == 0 or n >= self.max_seq_len or r.max_tokens < 1:
                msg = (f"request {i} (session {r.session!r}): a prompt of {n} tokens with max_tokens "
                       f"{r.max_tokens} does not fit: need 1 <= prompt < {self.max_seq_len} tokens "
                       f"and max_tokens >= 1")
                results[i] = GenResult(prompt_tokens=n, finish_reason="error", error=msg)
                continue
            if r.max_tokens > self.max_seq_len - n:
                r = replace(r, max_tokens=self.max_seq_len - n)
            key = r.session if r.session is not None else f"\0anon-{next(self._anon)}"
            pending.append(_Row(i, key, r))

        while pending:
            rows, seen, later = [], set(), []
            for row in pending:  # a round has one row per session, at most max_batch rows
                if row.key in seen or len(rows) == self.max_batch:
                    later.append(row)
                else:
                    rows.append(row)
                    seen.add(row.key)
            rows, deferred = self._acquire(rows)
            if rows and rows[0].finish is None:
                self._round(rows)
            for row in rows:
                results[row.i] = GenResult(row.out, row.logprobs, len(row.req.prompt), row.cached,
                                           row.finish or "stop", row.error)
            pending = deferred + later
        return results  # type: ignore[return-value]

    def warmup(self, batch_sizes: Sequence[int] | None = None, seq_lens: Sequence[int] | None = None,
               chunk_lens: Sequence[int] | None = None, sampling: Sequence[bool] = (False,),
               masked: Sequence[bool] = (False,), page_moves: bool = True) -> int:
        """Trace the shapes these sizes round up to (default: every batch bucket, the length
        buckets up to 1024, every chunk bucket that fits) using only the scratch page.
        `sampling` / `masked` pick the decode variants (True: top-p / a constraint mask);
        `page_moves` the spill and restore copies. Returns the number of new traces."""
        before = self.compiles
        Bs = {bucket(b, self.batch_buckets) for b in (batch_sizes or self.batch_buckets)}
        Ss = {bucket(s, self.seq_buckets) for s in (seq_lens or [s for s in self.seq_buckets if s <= 1024])}
        V, pool = self.cfg.vocab_size, self.pool
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

    # -- a round ----------------------------------------------------------------------------------

    def _acquire(self, rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
        """Pin the rows' sessions -> (rows to run, rows deferred to a later round). A row that
        finds no room even alone is returned as the round's only row, with its error set."""
        ok, deferred = [], []
        for row in rows:
            cap = len(row.req.prompt) + row.req.max_tokens
            try:
                row.cached = self.pool.acquire(row.key, row.req.prompt, cap)
            except PoolFull as e:
                if ok or deferred:
                    deferred.append(row)
                    continue
                row.finish, row.error = "error", str(e)
                return [row], [r for r in rows if r is not row]
            ok.append(row)
        return ok, deferred

    def _chunks(self, B: int, S: int, chunk_lens: Sequence[int] | None = None) -> list[int]:
        """Chunk lengths usable at batch B and cache length S (B*T <= prefill_tokens, T <= S)."""
        ok = [T for T in self.chunk_buckets
              if T <= S and (B * T <= self.prefill_tokens or T == self.chunk_buckets[0])]
        if chunk_lens is not None:
            ok = [T for T in ok if T in {bucket(c, self.chunk_buckets) for c in chunk_lens}]
        return ok

    def _round(self, rows: list[_Row]) -> None:
        try:
            self._run(rows)
        except Exception as e:  # noqa: BLE001 - the batch fails, its sessions are forgotten
            for row in rows:
                self.pool.drop(row.key)
                row.finish, row.error = "error", f"{type(e).__name__}: {e}"
            return
        for row in rows:
            if row.req.session is None:
                self.pool.drop(row.key)
            else:  # every sampled token but the last has been fed back through the model
                self.pool.release(row.key, row.req.prompt + row.out[: max(row.sampled - 1, 0)])

    def _run(self, rows: list[_Row]) -> None:
        n = len(rows)
        B = bucket(n, self.batch_buckets)
        S = bucket(max(len(r.req.prompt) + r.req.max_tokens for r in rows), self.seq_buckets)
        table = self.pool.table([r.key for r in rows], B, S)
        k, v = self.pool.gather(table)  # Step 2

        # Step 3: prefill the uncached suffixes, chunk by chunk.
        pos = np.zeros(B, np.int32)
        pos[:n] = [r.cached for r in rows]
        todo = [r.req.prompt[r.cached :] for r in rows] + [[]] * (B - n)
        chunks = self._chunks(B, S)
        logits = jnp.zeros((B, self.cfg.vocab_size), jnp.float32)
        while any(todo):
            T = bucket(min(max(map(len, todo)), chunks[-1]), chunks)
            tokens, n_new = np.zeros((B, T), np.int32), np.zeros(B, np.int32)
            for b, t in enumerate(todo):
                n_new[b] = len(t[:T])
                tokens[b, : n_new[b]] = t[:T]
                todo[b] = t[T:]
            logits, k, v = prefill_chunk(self.params, self.cfg, tokens, pos, n_new, logits, k, v)
            pos = pos + n_new  # not +=: on CPU the running step may still read the old array

        # Step 4: sample, feed the token back, repeat.
        seeds = np.zeros(B, np.uint32)
        temps, top_ps = np.zeros(B, np.float32), np.ones(B, np.float32)
        for b, r in enumerate(rows):
            seed = r.req.seed if r.req.seed is not None else int.from_bytes(os.urandom(4), "little")
            seeds[b], temps[b], top_ps[b] = seed & 0xFFFFFFFF, r.req.temperature, r.req.top_p
            if r.req.constraint is not None:
                r.state = r.req.constraint.start()
        kw = {"n_vocab": self.n_vocab, "greedy_only": not (temps > 0).any()}
        seeds, temps, top_ps = jnp.asarray(seeds), jnp.asarray(temps), jnp.asarray(top_ps)  # once
        step = (self.params, self.cfg)
        tok, logprob = first_token(logits, seeds, pos, temps, top_ps, self._mask(rows, B), **kw)
        pos = jnp.asarray(pos)  # tok's positions; decode_step returns them + 1
        while True:
            ahead, live = None, [r for r in rows if r.finish is None]
            if all(r.state is None for r in live) and any(len(r.out) + 1 < r.req.max_tokens for r in live):
                # no constraint waits on this token and some row goes on: queue the next step
                # before reading this one, so the device never idles on the host
                ahead = decode_step(*step, tok, pos, k, v, seeds, temps, top_ps, None, **kw)
            for row, t, lp in zip(rows, np.asarray(tok).tolist(), np.asarray(logprob).tolist()):
                if row.finish is None:
                    self._accept(row, t, lp)
            if ahead is None and not all(r.finish for r in rows):
                mask = self._mask(rows, B)
                ahead = decode_step(*step, tok, pos, k, v, seeds, temps, top_ps, mask, **kw)
            if ahead is not None:
                tok, logprob, pos, k, v = ahead  # k, v were donated to the step
            if all(r.finish for r in rows):
                break

        self.pool.scatter(table, k, v)  # Step 5

    def _accept(self, row: _Row, t: int, logprob: float) -> None:
        """Take token t for a row; set row.finish when the row stops."""
        req, c = row.req, row.req.constraint
        if t in self.eos_ids and not req.ignore_eos and (c is None or c.is_complete(row.state)):
            row.finish = "stop"
            return
        row.out.append(t)
        row.logprobs.append(logprob)
        row.sampled += 1
        stop = bool(req.on_token(t)) if req.on_token else False  # the caller saw a stop string
        left = req.max_tokens - len(row.out)
        if c is not None and not stop:
            c.advance(row.state, t)
            stop = c.is_done(row.state)
            if not stop and 0 < left <= CLOSE_RESERVE and (close := c.close(row.state, left)) is not None:
                for t2 in close:  # finish the JSON without the model, within the budget
                    c.advance(row.state, t2)
                    row.out.append(t2)
                    row.logprobs.append(0.0)
                    if req.on_token:
                        req.on_token(t2)
                stop = True
        if stop:
            row.finish = "stop"
        elif left <= 0:
            row.finish = "length"

    def _mask(self, rows: list[_Row], B: int) -> np.ndarray | None:
        """bool [B, V] of the active constrained rows' allowed tokens; None if there are none."""
        live = [(b, r) for b, r in enumerate(rows) if r.state is not None and r.finish is None]
        if not live:
            return None
        mask = np.ones((B, self.cfg.vocab_size), bool)
        for b, r in live:
            mask[b] = r.req.constraint.mask(r.state)
        return mask

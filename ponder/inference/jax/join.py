"""Rows joining a running batch: prefilled in a batch of their own, a chunk per decode step of
the running rows (a long prompt does not stall them), forked into one row per sample when a
request asks for n > 1, then given their first token and inserted into free slots.

Positions that take embeddings (an image's features, `GenRequest.embeds`) reach the prefill
as negative stand-in ids (`Row.keyed`); a chunk holding any goes through
`prefill_chunk_embeds`, a chunk of plain tokens through step.prefill_chunk, as text alone does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from . import step
from .batch import Batch, Join, bucket
from .compiles import counted_jit
from .config import ModelConfig
from .kvcache import fork_rows, insert_rows
from .model import decoder, lm_logits
from .rows import SEED_MASK, Row

if TYPE_CHECKING:
    from .generate import Generator

__all__ = ["advance", "chunk_embeds", "fork", "insert", "prefill_chunk_embeds", "warmup_embeds"]


def advance(gen: Generator, batch: Batch | None, join: Join) -> tuple[Batch | None, Join | None]:
    """Prefill one chunk of the joining rows, or all of them when nothing else decodes;
    once they are prefilled, insert them -> (batch, the join if it goes on)."""
    alone = batch is None or not batch.live
    while True:
        B = len(join.pos)
        chunks = gen.chunks(B, join.S)
        T = bucket(min(max(map(len, join.todo)), chunks[-1]), chunks)
        tokens, n_new = np.zeros((B, T), np.int32), np.zeros(B, np.int32)
        embedded = False
        for b, t in enumerate(join.todo):
            chunk = t[:T]
            n_new[b] = len(chunk)
            if min(chunk, default=0) < 0:  # Row.keyed's stand-in ids (int64) of embedded positions
                embedded = True
                chunk = [max(i, 0) for i in chunk]
            tokens[b, : n_new[b]] = chunk
            join.todo[b] = t[T:]
        if not embedded:  # text only: the one prefill every request shares
            join.logits, join.k, join.v = step.prefill_chunk(gen.params, gen.cfg, tokens, join.pos, n_new,
                                                        join.logits, join.k, join.v)
        else:
            embeds, mask = chunk_embeds(gen, join, T, n_new)
            join.logits, join.k, join.v = prefill_chunk_embeds(gen.params, gen.cfg, tokens, join.pos, n_new,
                                                               join.logits, join.k, join.v, embeds, mask)
        join.pos = join.pos + n_new  # not +=: on CPU the running step may still read the old array
        if not any(join.todo):
            return insert(gen, batch, fork(gen, join)), None
        if not alone:
            return batch, join


def chunk_embeds(gen: Generator, join: Join, T: int, n_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embeds [B, T, E] float32, mask bool [B, T]) of a chunk of T in which row b prefills
    positions pos[b] .. pos[b] + n_new[b] - 1: the rows' request embeddings that fall there."""
    B = len(join.pos)
    embeds = np.zeros((B, T, gen.cfg.hidden_size), np.float32)
    mask = np.zeros((B, T), bool)
    for b, row in enumerate(join.rows):
        lo, hi = int(join.pos[b]), int(join.pos[b] + n_new[b])
        for e in row.req.embeds:
            n = int(np.shape(e.features)[0])
            a, z = max(lo, e.start), min(hi, e.start + n)
            if a < z:
                embeds[b, a - lo : z - lo] = np.asarray(e.features[a - e.start : z - e.start], np.float32)
                mask[b, a - lo : z - lo] = True
    return embeds, mask


def _prefill_chunk_embeds(params, cfg: ModelConfig, tokens, start, n_new, logits, k, v, embeds, mask):
    # step.prefill_chunk with embeds [B, T, E] replacing the token embeddings where mask [B, T]
    x, k, v = decoder(params, cfg, tokens, start, k, v, embeds, mask)  # x: [B, T, E]
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, E]
    logits = jnp.where((n_new > 0)[:, None], lm_logits(params, cfg, last), logits)
    return logits, k, v


prefill_chunk_embeds = counted_jit(_prefill_chunk_embeds, "prefill_embeds", static_argnums=1,
                                   donate_argnums=(5, 6, 7))


def warmup_embeds(gen: Generator, batch_sizes: Sequence[int] | None = None,
                  seq_lens: Sequence[int] | None = None, chunk_lens: Sequence[int] | None = None) -> None:
    """Trace prefill_chunk_embeds at the shapes Generator.warmup traces the plain prefill at
    (same defaults), using only the pool's scratch page."""
    Bs = {bucket(b, gen.batch_buckets) for b in (batch_sizes or gen.batch_buckets)}
    Ss = {bucket(s, gen.seq_buckets) for s in (seq_lens or [s for s in gen.seq_buckets if s <= 1024])}
    V, E, pool = gen.cfg.vocab_size, gen.cfg.hidden_size, gen.pool
    for B, S in itertools.product([b for b in gen.batch_buckets if b <= max(Bs)], sorted(Ss)):
        k, v = pool.gather(np.zeros((B, S // pool.page_size), np.int32))
        logits, zeros = jnp.zeros((B, V), jnp.float32), np.zeros(B, np.int32)
        for T in gen.chunks(B, S, chunk_lens):
            logits, k, v = prefill_chunk_embeds(gen.params, gen.cfg, np.zeros((B, T), np.int32), zeros, zeros,
                                                logits, k, v, np.zeros((B, T, E), np.float32),
                                                np.zeros((B, T), bool))


def fork(gen: Generator, join: Join) -> Join:
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
                r.group.append(Row(r.tag, key, r.req, cached=r.cached, seed=(r.seed + i) & SEED_MASK,
                                    index=i, group=r.group, born=r.born, admitted=r.admitted))
                src.append(j)
            rows += r.group[1:]
            r.forks = []
    B = bucket(len(rows), gen.batch_buckets)
    idx = np.zeros(B, np.int32)  # padding rows copy row 0: they are never inserted or read
    idx[: len(src)] = src
    k, v, logits = fork_rows(join.k, join.v, join.logits, idx)
    table = gen.pool.table([r.key for r in rows], B, join.S)
    return Join(rows, join.S, table, k, v, join.pos[idx], [[]] * B, logits)


def insert(gen: Generator, batch: Batch | None, join: Join) -> Batch:
    """Sample the joined rows' first tokens and put them into free slots (or make them the
    batch when nothing runs)."""
    new, S, table, k, v, pos = join.rows, join.S, join.table, join.k, join.v, join.pos
    n, Bn = len(new), len(pos)
    seeds, temps, top_ps = np.zeros(Bn, np.uint32), np.zeros(Bn, np.float32), np.ones(Bn, np.float32)
    for j, r in enumerate(new):
        seeds[j], temps[j], top_ps[j] = r.seed, r.req.temperature, r.req.top_p
        if r.req.constraint is not None:
            r.state = r.req.constraint.start()
    first, first_lp = step.first_token(join.logits, seeds, pos, temps, top_ps, step.masks(gen, new, Bn),
                                  n_vocab=gen.n_vocab, greedy_only=not (temps > 0).any())
    if batch is None:  # nothing running: the new rows' batch is the batch
        batch = Batch.empty(Bn, S, gen.pool.page_size)
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

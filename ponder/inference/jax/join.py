"""Rows joining a running batch: prefilled in a batch of their own, a chunk per decode step of
the running rows (a long prompt does not stall them), forked into one row per sample when a
request asks for n > 1, then given their first token and inserted into free slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from . import step
from .batch import Batch, Join, bucket
from .kvcache import fork_rows, insert_rows
from .rows import SEED_MASK, Row

if TYPE_CHECKING:
    from .generate import Generator

__all__ = ["advance", "fork", "insert"]


def advance(gen: Generator, batch: Batch | None, join: Join) -> tuple[Batch | None, Join | None]:
    """Prefill one chunk of the joining rows, or all of them when nothing else decodes;
    once they are prefilled, insert them -> (batch, the join if it goes on)."""
    alone = batch is None or not batch.live
    while True:
        B = len(join.pos)
        chunks = gen.chunks(B, join.S)
        T = bucket(min(max(map(len, join.todo)), chunks[-1]), chunks)
        tokens, n_new = np.zeros((B, T), np.int32), np.zeros(B, np.int32)
        for b, t in enumerate(join.todo):
            n_new[b] = len(t[:T])
            tokens[b, : n_new[b]] = t[:T]
            join.todo[b] = t[T:]
        join.logits, join.k, join.v = step.prefill_chunk(gen.params, gen.cfg, tokens, join.pos, n_new,
                                                    join.logits, join.k, join.v)
        join.pos = join.pos + n_new  # not +=: on CPU the running step may still read the old array
        if not any(join.todo):
            return insert(gen, batch, fork(gen, join)), None
        if not alone:
            return batch, join


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

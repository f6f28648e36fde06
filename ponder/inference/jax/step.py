"""One decode step: run the model on every live row's pending token, then accept what it chose.

`decode` gives each live row of the batch the token sampled for it last step (its K/V are
written as it is fed back) and samples the next; `accept` takes a token for a row on the host
(EOS, stop strings, the constraint and the token budget decide whether the row goes on), and
`masks` builds the constrained rows' allowed-token masks. The jitted functions here are the
model's four entry points: a prefill chunk, a decode step, a verify step, and sampling a first
token.

Speculation (`Generator(speculate=...)`, drafts from `speculate`): when some greedy row may
draft, the step accepts the pending tokens first, drafts, and feeds each row [pending, d1..dk]
(T bucketed, padding never accepted) through `verify`, which picks the target token at every
position exactly as a decode step would (same masks, seeds and positions). The longest prefix
of drafts equal to the targets is accepted with `accept`, one token at a time, so EOS, stop
strings, the constraint and max_tokens act as in plain decoding; the target after the last
accepted draft is the new pending token. K/V written for rejected drafts lie past the row's
valid length and are overwritten by later steps (see model.decoder).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from .batch import Batch
from .compiles import counted_jit
from .config import ModelConfig
from .model import decoder, lm_logits
from .rows import Row
from .sampling import sample
from .speculate import Draft, draft, observe, plan, rate, verify_len

if TYPE_CHECKING:
    from .generate import Generator

__all__ = ["accept", "decode", "decode_step", "first_token", "masks", "prefill_chunk", "verify"]

CLOSE_RESERVE = 16  # constrained rows try to close their JSON once this few tokens are left


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


def _verify(params, cfg: ModelConfig, tokens, pos, k, v, seeds, temperature, top_p, mask,
            *, n_vocab: int, greedy_only: bool):
    # tokens: [B, T] each row's pending token then its drafts, the first at pos [B];
    # mask: [B, T, V] or None -> the target token after each position [B, T], its logprob [B, T]
    B, T = tokens.shape
    x, k, v = decoder(params, cfg, tokens, pos, k, v)  # x: [B, T, E]
    logits = lm_logits(params, cfg, x).reshape(B * T, -1)  # [B*T, V]
    at = (pos[:, None] + 1 + jnp.arange(T, dtype=pos.dtype)).reshape(-1)  # the drawn token's position

    def rep(a):
        return jnp.repeat(a, T)

    flat = None if mask is None else mask.reshape(B * T, -1)
    nxt, logprob = sample(logits, rep(seeds), at, rep(temperature), rep(top_p), flat,
                          n_vocab=n_vocab, greedy_only=greedy_only)
    return nxt.reshape(B, T), logprob.reshape(B, T), k, v


prefill_chunk = counted_jit(_prefill_chunk, "prefill", static_argnums=1, donate_argnums=(5, 6, 7))
decode_step = counted_jit(_decode_step, "decode", static_argnums=1, donate_argnums=(4, 5),
                          static_argnames=("n_vocab", "greedy_only"))
verify = counted_jit(_verify, "verify", static_argnums=1, donate_argnums=(4, 5),
                     static_argnames=("n_vocab", "greedy_only"))
first_token = counted_jit(sample, "sample", static_argnames=("n_vocab", "greedy_only"))


def decode(gen: Generator, batch: Batch, answer: Callable[[Row], None]) -> None:
    """Give every live row its pending token and sample the next one."""
    kw = {"n_vocab": gen.n_vocab, "greedy_only": batch.greedy_only}
    args = batch.dev
    for row in batch.live:
        if row.cancelled:  # the caller gave up: free the slot
            row.finish, row.error = "error", "cancelled"
            answer(row)
    live = batch.live
    if not live:
        return
    if (spec := gen.speculate) is not None:
        T_cap = spec.max_len(len(batch.rows))
        if T_cap > 1:
            ks = [plan(spec, r) if r is not None and r.finish is None else 0 for r in batch.rows]
            if any(k or (r.state is not None and r.req.temperature == 0) for k, r in zip(ks, batch.rows)
                   if r is not None and r.finish is None):
                _speculative(gen, batch, answer, ks, T_cap)
                return
        gen.spec_stats.plain += 1
    ahead = None
    if all(r.state is None for r in live) and any(len(r.out) + 1 < r.req.max_tokens for r in live):
        # no constraint waits on this token and some row goes on: queue the next step before
        # reading this one, so the device never idles on the host
        ahead = decode_step(gen.params, gen.cfg, batch.tok, batch.pos, batch.k, batch.v,
                            *args, None, **kw)
    toks, lps = np.asarray(batch.tok).tolist(), np.asarray(batch.logprob).tolist()
    for row, t, lp in zip(batch.rows, toks, lps):
        if row is not None and row.finish is None:
            accept(gen, row, t, lp)
            if row.finish:
                answer(row)
    if ahead is None and batch.live:
        mask = masks(gen, batch.rows, len(batch.rows))
        ahead = decode_step(gen.params, gen.cfg, batch.tok, batch.pos, batch.k, batch.v,
                            *args, mask, **kw)
    if ahead is not None:  # batch.k, batch.v were donated to the step
        batch.tok, batch.logprob, batch.pos, batch.k, batch.v = ahead


def _speculative(gen: Generator, batch: Batch, answer: Callable[[Row], None], ks: list[int],
                 T_cap: int) -> None:
    """The decode step with drafts: accept the pending tokens, draft (slot b at most ks[b]
    lookup tokens, T_cap - 1 in all), verify, accept the drafts the model agrees with."""
    spec, stats, B, V = gen.speculate, gen.spec_stats, len(batch.rows), gen.cfg.vocab_size
    toks, lps = np.asarray(batch.tok).tolist(), np.asarray(batch.logprob).tolist()
    pos = np.asarray(batch.pos)
    drafts: list[Draft | None] = [None] * B
    for b, (row, t, lp) in enumerate(zip(batch.rows, toks, lps)):
        if row is None or row.finish is not None:
            continue
        accept(gen, row, t, lp)
        if row.finish:
            answer(row)
            continue
        # the target after the drafts is a token too: k + 1 <= the tokens left
        left = row.req.max_tokens - len(row.out)
        limit = min(T_cap - 1, spec.k_max, left - 1)
        if row.state is not None and left - 1 <= CLOSE_RESERVE:  # the next token closes the JSON
            limit = min(limit, 1)
        if row.req.temperature == 0 and limit > 0 and (ks[b] or row.state is not None):
            drafts[b] = draft(spec, row, limit, ks[b], gen.eos_ids)
        elif row.state is not None:  # only its mask
            drafts[b] = Draft([], [], [row.req.constraint.mask(row.state)])
    if not batch.live:
        return
    kw = {"n_vocab": gen.n_vocab, "greedy_only": batch.greedy_only}
    live = [(d, rate(spec, r)) if d is not None else (Draft([], [], None), 1.0)
            for r, d in zip(batch.rows, drafts) if r is not None and r.finish is None]
    T = verify_len(spec, B, live)
    drafts = [d if d is None or len(d.tokens) < T else d.cut(T - 1) for d in drafts]
    mask = None
    if any(d is not None and d.masks is not None for d in drafts):
        mask = np.ones((B, T, V), bool)
        for b, d in enumerate(drafts):
            if d is not None and d.masks is not None:
                mask[b, : len(d.masks)] = d.masks
    if T == 1:  # nobody drafted, or drafts do not pay at this batch size: a plain step
        stats.plain += 1
        batch.tok, batch.logprob, batch.pos, batch.k, batch.v = decode_step(
            gen.params, gen.cfg, batch.tok, batch.pos, batch.k, batch.v, *batch.dev,
            None if mask is None else mask[:, 0], **kw)
        return
    tokens = np.zeros((B, T), np.int32)
    tokens[:, 0] = toks
    for b, d in enumerate(drafts):
        if d is not None:
            tokens[b, 1 : 1 + len(d.tokens)] = d.tokens
    target, logprob, batch.k, batch.v = verify(gen.params, gen.cfg, tokens, batch.pos, batch.k, batch.v,
                                               *batch.dev, mask, **kw)
    target, logprob = np.asarray(target), np.asarray(logprob)
    new = np.zeros(B, np.int32)  # accepted drafts per slot
    stats.steps += 1
    for b, (row, d) in enumerate(zip(batch.rows, drafts)):
        if row is None or row.finish is not None:
            continue
        a = 0
        while d is not None and a < len(d.tokens) and d.tokens[a] == target[b, a]:
            a += 1
        new[b] = a
        stats.row_steps += 1
        stats.tokens += a + 1
        if d is not None and d.tokens:
            judged = d.forced[: a + 1]  # the accepted drafts and the first rejected one
            took = d.forced[:a]
            stats.forced += sum(judged)
            stats.forced_accepted += sum(took)
            stats.drafted += len(judged) - sum(judged)
            stats.accepted += len(took) - sum(took)
            observe(spec, row, len(judged) - sum(judged), len(took) - sum(took))
        for i in range(a):  # a row that stops mid-draft drops the rest
            accept(gen, row, d.tokens[i], float(logprob[b, i]))
            if row.finish:
                answer(row)
                break
    rows = np.arange(B)
    batch.tok = jnp.asarray(target[rows, new])
    batch.logprob = jnp.asarray(logprob[rows, new])
    batch.pos = jnp.asarray(pos + new + 1)


def accept(gen: Generator, row: Row, t: int, logprob: float) -> None:
    """Take token t for a row; set row.finish when the row stops."""
    req, c = row.req, row.req.constraint
    if not row.first:
        row.first = time.perf_counter()
    if t in gen.eos_ids and not req.ignore_eos and (c is None or c.is_complete(row.state)):
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

def masks(gen: Generator, rows: Sequence[Row | None], B: int) -> np.ndarray | None:
    """bool [B, V] of the active constrained rows' allowed tokens; None if there are none."""
    live = [(b, r) for b, r in enumerate(rows) if r is not None and r.state is not None
            and r.finish is None]
    if not live:
        return None
    mask = np.ones((B, gen.cfg.vocab_size), bool)
    for b, r in live:
        mask[b] = r.req.constraint.mask(r.state)
    return mask

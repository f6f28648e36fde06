"""One decode step: run the model on every live row's pending token, then accept what it chose.

`decode` gives each live row of the batch the token sampled for it last step (its K/V are
written as it is fed back) and samples the next; `accept` takes a token for a row on the host
(EOS, stop strings, the constraint and the token budget decide whether the row goes on), and
`masks` builds the constrained rows' allowed-token masks. The jitted functions here are the
model's three entry points: a prefill chunk, a decode step, and sampling a first token.
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

if TYPE_CHECKING:
    from .generate import Generator

__all__ = ["accept", "decode", "decode_step", "first_token", "masks", "prefill_chunk"]

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


prefill_chunk = counted_jit(_prefill_chunk, "prefill", static_argnums=1, donate_argnums=(5, 6, 7))
decode_step = counted_jit(_decode_step, "decode", static_argnums=1, donate_argnums=(4, 5),
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

"""Pure samplers over float32 logits [B, V]: greedy, and temperature + top-p with a PRNG key.

Everything here is jittable and free of side effects. Each row draws with its own key, made from
the row's seed folded with the position of the token being drawn, so a seeded request draws the
same tokens whatever batch it runs in and however its prompt was split between cache and prefill.

Masks: ids >= `n_vocab` (embedding rows the tokenizer never produces) are always masked; a
boolean `mask` [B, V] (a constraint's allowed tokens) is applied on top when given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NEG", "apply_masks", "greedy", "row_keys", "sample", "sample_top_p", "top_p_filter"]

NEG = float(jnp.finfo(jnp.float32).min)  # not -inf: a fully masked row must not turn into NaN


def apply_masks(logits, n_vocab: int, mask=None):
    """logits [B, V] -> logits with disallowed ids set to NEG."""
    allowed = jnp.arange(logits.shape[-1]) < n_vocab  # [V]
    if mask is not None:
        allowed = allowed & mask  # [B, V]
    return jnp.where(allowed, logits, NEG)


def greedy(logits):
    """[B, V] -> int32 [B]: the most likely id (lowest id on a tie)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def row_keys(seeds, pos):
    """seeds uint32 [B], pos int32 [B] -> one PRNG key per row: fold_in(PRNGKey(seed), pos)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds, pos)


def top_p_filter(logits, top_p):
    """Keep the smallest set of ids whose probability reaches top_p [B] (at least one id)."""
    desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the ids ranked above each one
    keep = before < top_p[:, None]  # the top id always has before == 0
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits >= cutoff, logits, NEG)


def sample_top_p(keys, logits, temperature, top_p):
    """keys [B, 2], logits [B, V], temperature, top_p [B] -> int32 [B]."""
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    return jax.vmap(jax.random.categorical)(keys, top_p_filter(scaled, top_p)).astype(jnp.int32)


def sample(logits, seeds, pos, temperature, top_p, mask=None, *, n_vocab: int, greedy_only: bool):
    """Draw one token per row; rows with temperature 0 are greedy.

    logits float32 [B, V]; seeds uint32 [B]; pos int32 [B] (position of the token drawn);
    temperature, top_p float32 [B]; mask bool [B, V] or None.
    -> (tokens int32 [B], their log-probabilities under the masked, unscaled distribution [B]).
    `greedy_only` (static) skips the sort that top-p needs when no row samples.
    """
    logits = apply_masks(logits, n_vocab, mask)
    tokens = greedy(logits)
    if not greedy_only:
        drawn = sample_top_p(row_keys(seeds, pos), logits, temperature, top_p)
        tokens = jnp.where(temperature > 0, drawn, tokens)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]

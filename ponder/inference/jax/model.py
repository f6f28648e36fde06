"""A Llama-family decoder in JAX: one forward function for prefill and decode.

Params are a plain dict pytree (weights stored [in, out], so `x @ w`; layers stacked on a
leading L axis and run with `lax.scan`):

    embed [V, E]   norm [E]   lm_head [E, V] (absent when tied)
    layers: attn_norm [L, E]  wq [L, E, Hq*D]  wk, wv [L, E, Hkv*D]  wo [L, Hq*D, E]
            bq, bk, bv [L, H*D] (Qwen2)  bo [L, E] (Llama attention_bias)
            mlp_norm [L, E]  w_gate, w_up [L, E, F]  w_down [L, F, E]

A LLaVA checkpoint's params also hold `vision` (the tower and projector, see vision.py),
which the decoder does not read: image features come in as `embeds`.

Which biases exist is read from the params, so `forward` follows whatever was loaded.
Compute runs in the params' dtype (float32 or bfloat16); RMSNorm statistics, attention
scores, softmax and the logits are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .kvcache import init_cache, store

__all__ = ["rope_frequencies", "init_cache", "forward", "decoder", "lm_logits", "rms_norm"]

Params = dict


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [D/2] (float32) and the cos/sin scale, computed as transformers does.

    rope_scaling types: `linear` divides every frequency by `factor`; `llama3` divides the low
    frequencies by `factor` and blends the middle band; `yarn` blends interpolated and
    extrapolated frequencies and scales cos/sin by its attention factor. `dynamic` (NTK) equals
    plain RoPE up to max_position_embeddings, exactly as in transformers; past that point
    transformers recomputes the base from the longest position of each call, which would leave
    already-cached keys rotated with other frequencies, so here it stays plain RoPE (positions
    beyond max_position_embeddings then do not match transformers).
    """
    D, base = cfg.head_dim, cfg.rope_theta
    rs = dict(cfg.rope_scaling or {})
    kind = rs.get("rope_type", "default")
    exps = np.arange(0, D, 2, dtype=np.float32) / np.float32(D)  # [D/2]
    inv = (1.0 / np.float32(base) ** exps).astype(np.float32)
    scale = 1.0
    if kind == "linear":
        inv = inv / np.float32(rs["factor"])
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old / lo, inv / np.float32(factor), inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, blended, scaled).astype(np.float32)
    elif kind == "yarn":
        old = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or cfg.max_position_embeddings / old

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scale = rs.get("attention_factor")
        if scale is None:
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def corr_dim(rot):
            return D * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr_dim(rs.get("beta_fast") or 32), corr_dim(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(D // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        inv = (inv / np.float32(factor) * (1 - keep) + inv * keep).astype(np.float32)
    return inv, float(scale)


def rms_norm(x, w, eps: float):
    # x: [..., E]; statistics in float32, then back to x's dtype before the weight (as HF does)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def _rotate(x, cos, sin):
    # x: [B, T, H, D]; cos, sin: [B, T, 1, D]. HF layout: halves, not interleaved pairs.
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _dense(x, w, b=None):
    y = x @ w
    return y if b is None else y + b


def decoder(params: Params, cfg: ModelConfig, tokens, start, k_cache, v_cache, embeds=None, embed_mask=None):
    """Run the layers; return the final hidden states [B, T, E] (before the last norm) and the caches.

    embeds [B, T, E] with embed_mask bool [B, T]: where the mask is set, the input is that
    embedding (e.g. an image's projected features), not the token's; None costs nothing.

    tokens: int32 [B, T]. Token t of row b sits at position start[b] + t: its K/V are written
    to cache index start[b] + t, and it attends to cache indices <= start[b] + t (and, with a
    sliding window, > start[b] + t - window). So one call serves prefill (T = prompt length),
    incremental prefill (start = tokens already cached) and decode (T = 1).

    Rows may be right-padded to a common T: the padding writes junk K/V past the row's valid
    length, which is harmless, because no valid token attends past its own position and the
    next call for that row (start = valid length) overwrites those slots. Writes at indices
    >= S are dropped. Logits of padded tokens are meaningless; read row b's at its last valid t.
    """
    B, T = tokens.shape
    S = v_cache.shape[3]
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = Hq // Hkv
    dtype = params["embed"].dtype

    pos = start[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    inv_freq, rope_scale = rope_frequencies(cfg)
    angles = pos[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos = (jnp.cos(angles) * rope_scale).astype(dtype)
    sin = (jnp.sin(angles) * rope_scale).astype(dtype)

    kv_pos = jnp.arange(S, dtype=jnp.int32)
    mask = kv_pos <= pos[..., None]  # [B, T, S]
    if cfg.sliding_window is not None:
        mask &= kv_pos > pos[..., None] - cfg.sliding_window
    mask = mask[:, None, None]  # [B, 1, 1, T, S]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))  # [B, T]

    def layer(carry, lp):
        x, k_cache, v_cache, i = carry  # x: [B, T, E]
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q = _dense(h, lp["wq"], lp.get("bq")).reshape(B, T, Hq, D)
        k = _dense(h, lp["wk"], lp.get("bk")).reshape(B, T, Hkv, D)
        v = _dense(h, lp["wv"], lp.get("bv")).reshape(B, T, Hkv, D)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        k_cache, v_cache, keys, values = store(k_cache, v_cache, i, rows, pos, k, v)  # see kvcache

        q = q.reshape(B, T, Hkv, G, D)  # query head h uses kv head h // G, as HF's repeat_kv
        if T == 1:  # decode: multiply-accumulate over rows; a dot per (row, head) is far slower
            q1 = q[:, 0, :, :, :, None].astype(jnp.float32)  # [B, Hkv, G, D, 1]
            scores = jnp.sum(q1 * keys[:, :, None], axis=3)[:, :, :, None]  # [B, Hkv, G, 1, S]
        else:
            scores = jnp.einsum("btkgd,bkds->bkgts", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores / math.sqrt(D), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, Hkv, G, T, S] float32
        if T == 1:  # accumulate in float32, as the einsum's dot does
            out = jnp.sum(probs[:, :, :, 0, :, None] * values[:, :, None], axis=3)  # [B, Hkv, G, D]
            out = out.astype(dtype).reshape(B, T, Hq * D)
        else:
            out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(dtype), values)
            out = out.reshape(B, T, Hq * D)
        x = x + _dense(out, lp["wo"], lp.get("bo"))

        h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]
        return (x, k_cache, v_cache, i + 1), None

    x = params["embed"][tokens]  # [B, T, E]
    if embeds is not None:
        x = jnp.where(embed_mask[..., None], embeds.astype(dtype), x)
    (x, k_cache, v_cache, _), _ = jax.lax.scan(layer, (x, k_cache, v_cache, 0), params["layers"])
    return x, k_cache, v_cache


def lm_logits(params: Params, cfg: ModelConfig, x):
    """Final norm and the LM head: hidden [..., E] -> float32 logits [..., V]."""
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("...e,ve->...v", x, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", x, params["lm_head"], preferred_element_type=jnp.float32)


def forward(params: Params, cfg: ModelConfig, tokens, start, k_cache, v_cache, embeds=None, embed_mask=None):
    """tokens: int32 [B, T], start: int32 [B], caches from `init_cache` in the compute dtype
    -> (logits float32 [B, T, V], k_cache, v_cache). See `decoder` for positions, padding and
    the optional embeds [B, T, E] / embed_mask bool [B, T] that replace token embeddings.

    Jit it with cfg static: `jax.jit(forward, static_argnums=1, donate_argnums=(4, 5))`.
    A caller that needs only some positions' logits (e.g. the last prompt token of a long
    prefill) can call `decoder`, gather those rows, then `lm_logits`.
    """
    x, k_cache, v_cache = decoder(params, cfg, tokens, start, k_cache, v_cache, embeds, embed_mask)
    return lm_logits(params, cfg, x), k_cache, v_cache

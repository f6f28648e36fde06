"""The KV layout: the one module that knows how keys and values are laid out in memory.

Batch caches (what the decoder reads and writes): K [L, B, Hkv, D, S] and V [L, B, Hkv, S, D].
Heads before positions, so each (row, head) is one contiguous block and XLA CPU never transposes
the cache inside a layer (5x faster at batch 32 than [L, B, S, Hkv, D]). Within a block K is
stored transposed: both attention products then run along contiguous rows (q . K is
[T, D] @ [D, S]; probs . V is [T, S] @ [S, D]), and a decode step (T = 1) becomes two vectorised
accumulations over rows instead of many tiny matmuls (2x faster at batch 32).

Pool pages (where sessions live between rounds, `sessions.SessionPool`): K [L, N+1, Hkv, D, P]
and V [L, N+1, Hkv, P, D], the batch layouts cut into pages of P positions along S, so a page
move copies whole [D, P] / [P, D] blocks and never transposes within one. Page 0 is a scratch
page that padding rows read and write.

Moves between them: `gather_*` builds batch caches from a page table [B, S/P], `scatter_*`
writes them back, `scatter_row` writes back one slot, `insert_rows` puts joining rows into
free slots of a running batch, `fork_rows` copies rows (the samples of one prompt), and
`read_pages` / `write_pages` copy pages to and from the host (spill and restore).

Host pages (sessions spilled to host memory) are stored as `HOST_KV` names: "none" copies
the pages as they are; "int8" and "int4" quantise them on the device before the copy
(`pack_pages`, so only the small form crosses to the host) and dequantise them on the device
after the copy back (`unpack_pages`). Both are symmetric with float32 scales, KIVI-style: V one
scale per (layer, page, head, token) over D, K one per (layer, page, head, channel) over the
page's P tokens. Per-channel for K because trained models' keys carry a few outlier channels:
a per-token scale would be set by the outlier and crush the token's other channels, while a
per-channel scale follows each channel's own range (values, by contrast, have no outlier
channels, and attention mixes them per token). Measured with `small` and 512 tokens, 2 of the 64
channels of every K head scaled 8x: per-channel K cut the K-only next-token logits error from
2.4e-3 to 1.4e-3 (int8) and 4.1e-2 to 2.1e-2 (int4); without outliers the two tie. Positions of
a page past the session's last token are zeroed first, so stale values do not widen a scale.
int4 stores values -7..7 two to a byte (adjacent along the scaled axis), one scale per group of
`INT4_GROUP` along it. Each element comes back within half its scale: amax/254 (int8) or
amax/14 (int4) of the largest magnitude that scale covers.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .compiles import counted_jit
from .config import ModelConfig

__all__ = ["HOST_KV", "INT4_GROUP", "dequantise", "fork_rows", "gather_k", "gather_v", "init_cache", "insert_rows", "layer_view",
           "pack_pages", "quantise", "read_pages", "scatter_k", "scatter_row", "scatter_v", "store", "unpack_pages",
           "write_pages"]

HOST_KV = ("int8", "int4", "none")  # how host pages are stored (see the module docstring)
INT4_GROUP = 32  # int4 values per scale along D (the whole D when D is not a multiple)


def init_cache(cfg: ModelConfig, batch: int, seq_len: int, dtype=jnp.float32):
    """Zeroed batch caches: K [L, B, Hkv, D, S] and V [L, B, Hkv, S, D]."""
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    return jnp.zeros((L, batch, H, D, seq_len), dtype), jnp.zeros((L, batch, H, seq_len, D), dtype)


def store(k_cache, v_cache, layer, rows, pos, k, v):
    """Write one layer's new K/V (k, v: [B, T, Hkv, D]; rows, pos: [B, T]) at their positions;
    writes at positions >= S are dropped -> (k_cache, v_cache, keys [B, Hkv, D, S],
    values [B, Hkv, S, D]) for the layer's attention."""
    # advanced indices split by a slice go first: the indexed view is [B, T, Hkv, D], like k
    k_cache = k_cache.at[layer, rows, :, :, pos].set(k, mode="drop")
    v_cache = v_cache.at[layer, rows, :, pos].set(v, mode="drop")
    return k_cache, v_cache, *layer_view(k_cache, v_cache, layer)


def layer_view(k_cache, v_cache, layer):
    """One layer's keys [B, Hkv, D, S] and values [B, Hkv, S, D]."""
    return k_cache[layer], v_cache[layer]


# --- batch <-> pages ---------------------------------------------------------------------------


def _gather_k(pool, table):
    # table: int32 [B, S/P] -> K [L, B, Hkv, D, S]
    L, _, H, D, P = pool.shape
    B, n = table.shape
    return pool[:, table].transpose(0, 1, 3, 4, 2, 5).reshape(L, B, H, D, n * P)


def _gather_v(pool, table):
    # table: int32 [B, S/P] -> V [L, B, Hkv, S, D]
    L, _, H, P, D = pool.shape
    B, n = table.shape
    return pool[:, table].transpose(0, 1, 3, 2, 4, 5).reshape(L, B, H, n * P, D)


def _scatter_k(pool, table, cache):
    # cache: K [L, B, Hkv, D, S] -> pool with the table's pages overwritten
    L, B, H, D, S = cache.shape
    P = pool.shape[-1]
    return pool.at[:, table].set(cache.reshape(L, B, H, D, S // P, P).transpose(0, 1, 4, 2, 3, 5))


def _scatter_v(pool, table, cache):
    # cache: V [L, B, Hkv, S, D] -> pool with the table's pages overwritten
    L, B, H, S, D = cache.shape
    P = pool.shape[-2]
    return pool.at[:, table].set(cache.reshape(L, B, H, S // P, P, D).transpose(0, 1, 3, 2, 4, 5))


def _scatter_row(pool_k, pool_v, pages, k, v, slot):
    # pages: int32 [S/P] of the row in batch slot `slot` -> both pools with those pages overwritten
    row_k = jax.lax.dynamic_index_in_dim(k, slot, axis=1)  # [L, 1, Hkv, D, S]
    row_v = jax.lax.dynamic_index_in_dim(v, slot, axis=1)
    return _scatter_k(pool_k, pages[None], row_k), _scatter_v(pool_v, pages[None], row_v)


def _read(pool, idx):
    # idx: int32 [n] -> [L, n, ...page]
    return pool[:, idx]


def _write(pool, idx, data):
    return pool.at[:, idx].set(data)


def _fork(k, v, logits, src):
    # src: int32 [Bm], the joining row each new row copies -> K/V [L, Bm, ...], logits [Bm, V]
    return k[:, src], v[:, src], logits[src]


def _insert(k, v, k_new, v_new, slots):
    # slots: int32 [Bn], the batch slot of each new row; padding rows name slot B and are dropped
    return k.at[:, slots].set(k_new, mode="drop"), v.at[:, slots].set(v_new, mode="drop")


# --- host pages: quantised form ----------------------------------------------------------------


def _groups(x, axis: int, group: int):
    """x with `axis` (length n) split into [n / group, group] (axis is non-negative)."""
    n = x.shape[axis]
    g = group if n % group == 0 else n
    return x.reshape(*x.shape[:axis], n // g, g, *x.shape[axis + 1 :])


def quantise(x, axis: int, bits: int):
    """Symmetric quantisation along `axis` -> (q, scale float32): int8 q (bits 8, one scale over
    the whole axis) or uint8 q holding two 4-bit values (bits 4: q + 8 of the even element in
    the low nibble, of the odd one in the high; one scale per INT4_GROUP), the axis halved. The
    scales have the axis cut to its number of groups. Every element of dequantise(q, scale) is
    within scale / 2 of x."""
    axis %= x.ndim
    top = 127 if bits == 8 else 7
    xs = _groups(x.astype(jnp.float32), axis, x.shape[axis] if bits == 8 else INT4_GROUP)
    scale = jnp.max(jnp.abs(xs), axis=axis + 1, keepdims=True) / top
    q = jnp.clip(jnp.round(xs / jnp.where(scale == 0, 1, scale)), -top, top).astype(jnp.int8)
    scale = jnp.squeeze(scale, axis + 1)
    if bits == 8:
        return q.reshape(x.shape), scale
    pairs = (q + 8).astype(jnp.uint8).reshape(*q.shape[: axis + 1], -1, 2, *q.shape[axis + 2 :])
    lo, hi = jnp.take(pairs, 0, axis=axis + 2), jnp.take(pairs, 1, axis=axis + 2)
    packed = lo | (hi << 4)  # [..., groups, group / 2, ...]
    return packed.reshape(*x.shape[:axis], x.shape[axis] // 2, *x.shape[axis + 1 :]), scale


def dequantise(q, scale, axis: int, dtype=jnp.float32):
    """The inverse of `quantise` (which bits is read from q's dtype: int8 or packed uint8)."""
    axis %= q.ndim
    groups = scale.shape[axis]
    if q.dtype == jnp.uint8:
        lo = (q & 0xF).astype(jnp.int8) - 8
        hi = (q >> 4).astype(jnp.int8) - 8
        q = jnp.stack([lo, hi], axis=axis + 1)  # [..., n / 2, 2, ...]: the pairs interleave again
        q = q.reshape(*q.shape[:axis], -1, *q.shape[axis + 2 :])
    x = _groups(q.astype(jnp.float32), axis, q.shape[axis] // groups) * jnp.expand_dims(scale, axis + 1)
    return x.reshape(q.shape).astype(dtype)


# the scaled axis of a page block: P (per channel) for K [L, n, Hkv, D, P], D (per token) for V
# [L, n, Hkv, P, D]
K_AXIS = V_AXIS = 4


def _pack(pool_k, pool_v, idx, n_valid, bits):
    # idx: int32 [n], the pages of a session holding n_valid tokens -> (K q, K scales, V q, V scales)
    k = pool_k[:, idx]
    n, P = k.shape[1], k.shape[-1]
    valid = jnp.arange(n)[:, None] * P + jnp.arange(P)[None, :] < n_valid  # [n, P]
    kq, ks = quantise(jnp.where(valid[None, :, None, None, :], k, 0), K_AXIS, bits)
    vq, vs = quantise(pool_v[:, idx], V_AXIS, bits)
    return kq, ks, vq, vs


def _unpack(pool_k, pool_v, idx, kq, ks, vq, vs):
    # the pages `_pack` gave, dequantised into pages idx of both pools
    pool_k = pool_k.at[:, idx].set(dequantise(kq, ks, K_AXIS, pool_k.dtype))
    return pool_k, pool_v.at[:, idx].set(dequantise(vq, vs, V_AXIS, pool_v.dtype))


gather_k = counted_jit(_gather_k, "gather")
gather_v = counted_jit(_gather_v, "gather")
scatter_k = counted_jit(_scatter_k, "scatter", donate_argnums=0)
scatter_v = counted_jit(_scatter_v, "scatter", donate_argnums=0)
scatter_row = counted_jit(_scatter_row, "scatter_row", donate_argnums=(0, 1))
read_pages = counted_jit(_read, "read_pages")
write_pages = counted_jit(_write, "write_pages", donate_argnums=0)
insert_rows = counted_jit(_insert, "insert", donate_argnums=(0, 1))
fork_rows = counted_jit(_fork, "fork")
pack_pages = {"int8": counted_jit(partial(_pack, bits=8), "pack_pages"),
              "int4": counted_jit(partial(_pack, bits=4), "pack_pages")}
unpack_pages = counted_jit(_unpack, "unpack_pages", donate_argnums=(0, 1))

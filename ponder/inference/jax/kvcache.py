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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .compiles import counted_jit
from .config import ModelConfig

__all__ = ["fork_rows", "gather_k", "gather_v", "init_cache", "insert_rows", "layer_view",
           "read_pages", "scatter_k", "scatter_row", "scatter_v", "store", "write_pages"]


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


gather_k = counted_jit(_gather_k, "gather")
gather_v = counted_jit(_gather_v, "gather")
scatter_k = counted_jit(_scatter_k, "scatter", donate_argnums=0)
scatter_v = counted_jit(_scatter_v, "scatter", donate_argnums=0)
scatter_row = counted_jit(_scatter_row, "scatter_row", donate_argnums=(0, 1))
read_pages = counted_jit(_read, "read_pages")
write_pages = counted_jit(_write, "write_pages", donate_argnums=0)
insert_rows = counted_jit(_insert, "insert", donate_argnums=(0, 1))
fork_rows = counted_jit(_fork, "fork")

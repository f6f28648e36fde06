"""Quantised host pages (SessionPool host_kv="int8" / "int4"): the page round trip and its error
bound, the logits and greedy generations of a session restored from host memory, the host bytes
a session really costs (and so how many the host cap holds), no traces after `warm_moves`, and
the errors for bad options.

Bounds, measured on the random-weight `tiny` model with this file's prompts (max |Δ logit| of
the next token after a spill and restore, against the same session never spilled): int8 at most
4.9e-4, int4 at most 9.3e-3. The tests assert 2e-3 and 4e-2 (a 4x margin, for other prompts
and platforms), and that int8 changes no greedy token of 24 on four prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ponder.inference.jax import checkpoint, model
from ponder.inference.jax.compiles import TRACES
from ponder.inference.jax.generate import Generator, GenRequest
from ponder.inference.jax.kvcache import INT4_GROUP, pack_pages, unpack_pages
from ponder.inference.jax.sessions import SessionPool

P = 64  # page size
FORWARD = jax.jit(model.forward, static_argnums=1)
BOUND = {"none": 0.0, "int8": 2e-3, "int4": 4e-2}  # max |Δ logit| after a round trip (see above)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint.init_model(path, "tiny", seed=0)
    cfg, params = checkpoint.load(path)
    return cfg, params


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def page_bytes(cfg) -> int:
    return SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0).page_bytes


def host_page_bytes(cfg, kind: str) -> int:
    """Bytes one page of a session costs on the host, from first principles: per layer and KV
    head, P x D values for K and for V (4 bytes, 1 or a half), plus the float32 scales: K one per
    channel and group of the page's tokens, V one per token and group of D."""
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if kind == "none":
        return L * H * 2 * P * D * 4
    group_p = P if kind == "int8" else INT4_GROUP
    group_d = D if kind == "int8" or D % INT4_GROUP else INT4_GROUP
    values = 2 * P * D * (1 if kind == "int8" else 0.5)
    scales = D * (P // group_p) + P * (D // group_d)
    return L * H * int(values + 4 * scales)


# -- the page round trip -----------------------------------------------------------------------


def _pools(L=2, N=5, H=2, D=64, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(L, N + 1, H, D, P)).astype(np.float32)
    k[:, :, :, 5] *= 20  # an outlier channel
    v = rng.normal(size=(L, N + 1, H, P, D)).astype(np.float32)
    return k, v


def _per_element(scale, shape):
    """The scales [..., groups] repeated to the elements they cover [..., n]."""
    return np.repeat(np.asarray(scale), shape[-1] // scale.shape[-1], axis=-1)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_round_trip_is_within_half_a_scale_with_exact_shapes(kind):
    k, v = _pools()
    idx = np.asarray([3, 1, 4, 0], np.int32)  # a pow2-padded spill: page 0 is the padding
    kq, ks, vq, vs = pack_pages[kind](jnp.asarray(k), jnp.asarray(v), idx, np.int32(3 * P))
    L, n, H, D = 2, 4, 2, 64
    half = 2 if kind == "int4" else 1
    dt = np.uint8 if kind == "int4" else np.int8
    groups = 1 if kind == "int8" else P // INT4_GROUP
    assert (kq.shape, kq.dtype, vq.shape, vq.dtype) == ((L, n, H, D, P // half), dt, (L, n, H, P, D // half), dt)
    assert (ks.shape, ks.dtype, vs.shape, vs.dtype) == ((L, n, H, D, groups), np.float32,
                                                        (L, n, H, P, groups), np.float32)
    k2, v2 = unpack_pages(jnp.zeros_like(k), jnp.zeros_like(v), idx, kq, ks, vq, vs)
    k2, v2 = np.asarray(k2)[:, idx], np.asarray(v2)[:, idx]
    tol = 1 + 1e-6  # float32 rounding of x / scale and q * scale
    assert np.all(np.abs(k2 - k[:, idx])[:, :3] <= _per_element(ks, k2.shape)[:, :3] / 2 * tol)
    assert np.all(k2[:, 3] == 0)  # past the 3 pages of valid tokens: zeroed
    assert np.all(np.abs(v2 - v[:, idx]) <= _per_element(vs, v2.shape) / 2 * tol)
    # the scale is the covered amax over the largest level: int8 127, int4 7
    top = 127 if kind == "int8" else 7
    np.testing.assert_allclose(np.asarray(vs)[..., 0], np.abs(v[:, idx, ..., : D // groups]).max(-1) / top, rtol=1e-6)
    # K per channel: the outlier channel has a scale of its own, the others keep theirs small
    assert np.asarray(ks)[:, :3, :, 5].min() > 10 * np.asarray(ks)[:, :3, :, 4].max()


def test_positions_past_the_last_token_are_zeroed_and_do_not_widen_k_scales():
    k, v = _pools(seed=1)
    k[:, 2, :, :, 10:] = 1e4  # stale values after the session's 64 + 10 tokens (pages 1, 2)
    idx = np.asarray([1, 2], np.int32)
    kq, ks, vq, vs = pack_pages["int8"](jnp.asarray(k), jnp.asarray(v), idx, np.int32(P + 10))
    k2, _ = unpack_pages(jnp.zeros_like(k), jnp.zeros_like(v), idx, kq, ks, vq, vs)
    last = np.asarray(k2)[:, 2]
    assert np.all(last[..., 10:] == 0)
    valid = k[:, 2, ..., :10]  # int8: within amax / 254 of the valid tokens' largest magnitude
    assert np.all(np.abs(last[..., :10] - valid) <= np.abs(valid).max(-1, keepdims=True) / 254 * 1.001)


def test_an_all_zero_page_comes_back_zero():
    z = jnp.zeros((1, 2, 1, 16, P)), jnp.zeros((1, 2, 1, P, 16))
    for kind in ("int8", "int4"):
        parts = pack_pages[kind](*z, np.asarray([1], np.int32), np.int32(P))
        k2, v2 = unpack_pages(jnp.ones_like(z[0]), jnp.ones_like(z[1]), np.asarray([1], np.int32), *parts)
        assert np.all(np.asarray(k2)[:, 1] == 0) and np.all(np.asarray(v2)[:, 1] == 0)


# -- a session spilled and restored ------------------------------------------------------------


def _next_logits(cfg, params, pool: SessionPool, key: str, prompt: list[int]) -> np.ndarray:
    """Acquire `key` for `prompt` and run its last token over the cached K/V -> logits [V]."""
    cached = pool.acquire(key, prompt, 4 * P)
    assert cached == len(prompt) - 1
    table = pool.table([key], 1, 4 * P)
    k, v = pool.gather(table)
    logits, k, v = FORWARD(params, cfg, jnp.asarray([prompt[-1:]], jnp.int32),
                                 jnp.full(1, cached, jnp.int32), k, v)
    pool.release(key, prompt[:-1])
    return np.asarray(logits[0, -1])


def _fill(cfg, params, pool: SessionPool, key: str, prompt: list[int]) -> None:
    """Prefill `prompt` into session `key`."""
    pool.acquire(key, prompt, 4 * P)
    table = pool.table([key], 1, 4 * P)
    k, v = pool.gather(table)
    _, k, v = FORWARD(params, cfg, jnp.asarray([prompt], jnp.int32), jnp.zeros(1, jnp.int32), k, v)
    pool.scatter(table, k, v)
    pool.release(key, prompt)


@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_restored_session_logits_are_within_the_stated_bound(tiny, kind):
    cfg, params = tiny
    worst = 0.0
    for seed, n in ((1, 150), (2, 200), (3, 70)):
        prompt = ids(n, seed)
        kept = SessionPool(cfg, jnp.float32, device_bytes=4 * page_bytes(cfg), host_bytes=1 << 30, host_kv=kind)
        _fill(cfg, params, kept, "s", prompt)
        base = _next_logits(cfg, params, kept, "s", prompt)

        pool = SessionPool(cfg, jnp.float32, device_bytes=4 * page_bytes(cfg), host_bytes=1 << 30, host_kv=kind)
        _fill(cfg, params, pool, "s", prompt)
        pool.acquire("other", [], 4 * P)  # takes every page: "s" goes to host
        pool.release("other", [])
        assert pool.where("s") == "host" and pool.stats["spilled"] == 1
        after = _next_logits(cfg, params, pool, "s", prompt)
        assert pool.where("s") == "device" and pool.stats["restored"] == 1 and pool.host_used == 0
        worst = max(worst, float(np.abs(after - base).max()))
    if kind == "none":
        assert worst == 0.0  # exact copies
    else:
        assert 0 < worst <= BOUND[kind]


def test_int8_restored_sessions_generate_the_same_greedy_tokens(tiny):
    cfg, params = tiny
    kw = {"max_batch": 1, "batch_buckets": (1,), "seq_buckets": (256,), "chunk_buckets": (64,),
          "host_bytes": 1 << 30, "device_bytes": 4 * page_bytes(cfg)}
    spilled = Generator(cfg, params, host_kv="int8", **kw)
    fresh = Generator(cfg, params, host_kv="none", **kw)
    for seed in range(4):
        prompt = ids(60 + 25 * seed, 40 + seed)
        spilled.generate([GenRequest("s", prompt, 1)])
        spilled.generate([GenRequest("big", ids(200, 99), 1)])  # 4 pages: "s" spills
        assert spilled.pool.where("s") == "host"
        again = spilled.generate([GenRequest("s", prompt, 24)])[0]
        ref = fresh.generate([GenRequest(f"f{seed}", prompt, 24)])[0]
        assert again.cached_tokens == len(prompt) - 1 and ref.cached_tokens == 0
        assert again.tokens == ref.tokens
        spilled.pool.drop("s")
    assert spilled.pool.stats["restored"] == 4 + 3  # "s" each time, "big" from the second on


# -- host bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_host_bytes_are_the_stored_bytes_and_the_cap_holds_that_many_more(tiny, kind):
    cfg, _ = tiny
    cap = 6 * 2 * host_page_bytes(cfg, "none")  # six float32 sessions of 2 pages
    pool = SessionPool(cfg, jnp.float32, device_bytes=2 * page_bytes(cfg), host_bytes=cap, host_kv=kind)
    per_session = 2 * host_page_bytes(cfg, kind)
    for i in range(40):  # each 2-page session spills the one before it
        prompt = ids(100, i)
        pool.acquire(f"k{i}", prompt, 128)
        pool.release(f"k{i}", prompt)
    # tiny (D = 16, P = 64): a float32 page is 32768 bytes on the host, int8 9472 (0.289), int4
    # 5632 (0.172); at D = 64 (kvcache's docstring) the scales weigh less: 0.266 and 0.156
    held = cap // per_session
    assert held == {"none": 6, "int8": 20, "int4": 34}[kind]
    assert pool.usage() == {"device_sessions": 1, "host_sessions": held, "device_bytes": 2 * page_bytes(cfg),
                            "host_bytes": held * per_session}
    assert [pool.where(f"k{i}") for i in range(40)] == [None] * (39 - held) + ["host"] * held + ["device"]
    assert pool.stats["spilled"] == 39 and pool.stats["dropped"] == 39 - held
    # a restore gives its bytes back, exactly, before it allocates: the device session it
    # spills (k39) takes k38's place on the host, and no other host session is dropped for it
    pool.acquire("k38", ids(100, 38), 128)
    assert pool.host_used == held * per_session and pool.stats["dropped"] == 39 - held
    assert pool.where("k38") == "device" and pool.where("k39") == "host"


def test_warm_moves_trace_every_spill_and_restore(tiny):
    cfg, _ = tiny
    for kind in ("int8", "none"):
        pool = SessionPool(cfg, jnp.float32, device_bytes=5 * page_bytes(cfg), host_bytes=1 << 30, host_kv=kind)
        pool.warm_moves()
        before = sum(TRACES.values())
        for n in (60, 130, 250, 300):  # 1, 3, 4 and 5 pages (5 rounds up to 8)
            pool.acquire("s", ids(n, n), n + 1)
            pool.release("s", ids(n, n))
            pool.acquire("t", [], 5 * P)  # spills "s"
            pool.release("t", [])
            pool.acquire("s", ids(n, n) + [7], n + 1)  # restores it
            pool.release("s", [])
        assert pool.stats["spilled"] == pool.stats["restored"] == 4
        assert sum(TRACES.values()) == before, kind
    jax.block_until_ready(pool.k)


# -- options -----------------------------------------------------------------------------------


def test_a_bad_host_kv_is_a_clear_error(tiny):
    cfg, params = tiny
    msg = "SessionPool: host_kv='fp8' is not one of 'int8', 'int4', 'none'"
    with pytest.raises(ValueError, match=f"^{msg}$"):
        SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0, host_kv="fp8")
    with pytest.raises(ValueError, match=f"^{msg}$"):
        Generator(cfg, params, host_kv="fp8")
    odd = "^SessionPool: host_kv='int4' packs pairs of tokens, so page_size=63 must be even$"
    with pytest.raises(ValueError, match=odd):
        SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0, host_kv="int4", page_size=63)

"""Quantised host KV (SessionPool host_kv): sessions per GB of host memory, restore vs recompute,
and the logits error a restore leaves.

For each session length N (`small` preset, ~32M params, random float32 weights; 2048 and 8192
tokens) one session of N random tokens is prefilled through `Generator.generate` (the
recompute time: a fresh session's full chunked prefill to its first token, after a warm-up
of the same shapes). Then, for each host form (none / int8 / int4) in turn, the session is
spilled to host (another session takes every page) and restored (its key's next request):

* **host bytes** of the spilled session as the pool counts them (values + scales), and the warm
  sessions of that length one GB (2**30 bytes) of host memory holds;
* **spill** and **restore** time (median of `--repeat`): device -> host incl. quantising, and
  host -> device incl. dequantising, both after `SessionPool.warm_moves` (no compiles timed);
* **logits error**: max |Δ| of the next-token logits computed over the restored K/V against
  the same session before it was spilled, and whether the greedy next token is the same.

Ratios against "none" (sessions per GB) and against recompute (restore speed-up) are in the
same record. On a CPU host -> device is a memcpy, so restore times here are a floor for an
accelerator, where the copy crosses PCIe and the quantised form's 3.8x / 6.4x fewer bytes count.

    python benchmarks/kv_quant.py                  # -> results/kv_quant.json (a few minutes)
    python benchmarks/kv_quant.py --quick --out /tmp/q.json   # tiny preset, 256 tokens, seconds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ponder.inference.jax import model
from ponder.inference.jax.checkpoint import init_params
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.generate import Generator, GenRequest
from ponder.inference.jax.kvcache import HOST_KV
from ponder.inference.jax.sessions import SessionPool

RESULTS = Path(__file__).resolve().parent / "results"
P = 64
FORWARD = jax.jit(model.forward, static_argnums=1)


def next_logits(gen: Generator, key: str, prompt: list[int], S: int) -> np.ndarray:
    """The next-token logits of session `key` (holding `prompt`): its last token run again over
    the cached K/V of the others, which leaves the session as it was."""
    pool = gen.pool
    cached = pool.acquire(key, prompt, S)
    assert cached == len(prompt) - 1, (cached, len(prompt))
    table = pool.table([key], 1, S)
    k, v = pool.gather(table)
    logits, _, _ = FORWARD(gen.params, gen.cfg, jnp.asarray([prompt[-1:]], jnp.int32),
                           jnp.full(1, cached, jnp.int32), k, v)
    pool.release(key, prompt)
    return np.asarray(logits[0, -1])


def spill(pool: SessionPool, pages: int) -> float:
    """Spill every idle session by pinning all the pool's pages for a moment -> seconds."""
    t0 = time.perf_counter()
    pool.acquire("\0other", [], pages * P)
    pool.release("\0other", [])
    return time.perf_counter() - t0


def one_length(cfg, params, n: int, repeat: int, seed: int) -> dict[str, Any]:
    S = n + P  # the prompt and the token it asks for, rounded to a page
    pages = S // P
    page_bytes = SessionPool(cfg, jnp.float32, device_bytes=1 << 30, host_bytes=0).page_bytes
    gen = Generator(cfg, params, eos_ids=(), max_batch=1, batch_buckets=(1,), seq_buckets=(S,),
                    max_seq_len=S, chunk_buckets=(64, 512), prefill_tokens=512,
                    device_bytes=pages * page_bytes, host_bytes=1 << 40, host_kv="none")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, cfg.vocab_size, n).tolist()
    gen.warmup(batch_sizes=(1,), seq_lens=(S,), page_moves=False)  # compiles: not timed
    t0 = time.perf_counter()
    res = gen.generate([GenRequest("s", prompt, 1)])[0]
    recompute = time.perf_counter() - t0
    assert res.error is None and gen.pool.tokens("s") == prompt
    base = next_logits(gen, "s", prompt, S)
    assert np.array_equal(next_logits(gen, "s", prompt, S), base)  # it leaves the session as it was
    out: dict[str, Any] = {"tokens": n, "recompute_s": recompute, "host_kv": {}}
    # the prefill is the expensive part, so it is done once: one pool, its form switched while no
    # session is on the host, and its K/V put back before each spill (a restore always hands "s"
    # the same pages, 1..pages, so each round trip starts from the exact prefill)
    exact = jnp.array(gen.pool.k, copy=True), jnp.array(gen.pool.v, copy=True)
    for kind in sorted(HOST_KV, key=("none", "int8", "int4").index):  # none first: the baseline
        gen.pool.host_kv = kind
        gen.pool.warm_moves()
        spills, restores, nbytes = [], [], 0
        for _ in range(repeat):
            gen.pool.k, gen.pool.v = (jnp.array(a, copy=True) for a in exact)
            spills.append(spill(gen.pool, pages))
            assert gen.pool.where("s") == "host"
            nbytes = gen.pool.usage()["host_bytes"]
            t0 = time.perf_counter()
            gen.pool.acquire("s", prompt, S)
            jax.block_until_ready((gen.pool.k, gen.pool.v))
            restores.append(time.perf_counter() - t0)
            gen.pool.release("s", prompt)
        after = next_logits(gen, "s", prompt, S)
        restore = statistics.median(restores)
        out["host_kv"][kind] = {
            "host_bytes": nbytes,
            "bytes_per_token": nbytes / n,
            "sessions_per_gb": (1 << 30) // nbytes,
            "spill_s": statistics.median(spills),
            "restore_s": restore,
            "recompute_over_restore": recompute / restore,
            "max_abs_logit_error": float(np.abs(after - base).max()),
            "same_greedy_token": bool(np.argmax(after) == np.argmax(base)),
        }
        if kind != "none":  # a restore must not be a recompute in disguise
            assert gen.pool.stats["restored"] >= repeat
    none = out["host_kv"]["none"]["host_bytes"]
    for rec in out["host_kv"].values():
        rec["sessions_vs_none"] = none / rec["host_bytes"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens per session")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 256 tokens, 2 repeats")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_quant.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.preset, a.tokens, a.repeat = "tiny", [256], 2
    cfg = PRESETS[a.preset]
    params = jax.tree_util.tree_map(jnp.asarray, init_params(cfg, seed=0))
    runs = []
    for i, n in enumerate(a.tokens):
        runs.append(one_length(cfg, params, n, a.repeat, seed=i))
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "settings": vars(a) | {"out": str(a.out)},
        "model": {"preset": a.preset, "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
                  "head_dim": cfg.head_dim, "dtype": "float32", "page_size": P},
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

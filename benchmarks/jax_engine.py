"""The JAX engine: session reuse, batched decode, recompiles, and a 0.5B-shaped model.

Random weights throughout (the speed of a forward pass does not depend on the values). Every
number is a wall-clock median over `--repeat` runs of `Generator.generate`, after one untimed
run of the same shapes (the warm-up), so compile time is excluded and counted separately.

* **append vs full prefill** (`small` preset, ~32M params, float32): a session holds N cached
  tokens (N = 512, 2048, 8192); a request whose prompt is those N plus 32 new tokens is timed to
  its first token (prefill of the 32 + the first sample + the pool copies) against the same
  prompt in a fresh session (prefill of all N + 32). Target at N = 2048: >= 10x. A full
  prefill that takes over 10 s (N = 8192 on a CPU) is timed once. The preset's
  nominal context is 8192; the N = 8192 row runs at 8225 positions (RoPE does not care).
* **decode tokens/s** at batch 1, 8, 32 (`small`, 128-token prompts, 64 new tokens, EOS
  ignored): B * 63 / (time for 64 tokens - time for 1), batch sizes interleaved within each
  repeat. Target: batch 32 >= 8x batch 1.
* **continuous vs static batching** (`small`, `--mixed` requests of 64-token prompts whose
  lengths are spread over 8..96 new tokens, EOS ignored, all queued at once, max batch 16):
  one `Generator.serve` in which a request takes a slot as soon as one frees, against
  `generate` on 16 requests at a time (each group waits for its longest row). Tokens/s and the
  mean time for a request to be answered, measured from when all were queued.
* **recompiles after warm-up**: traces of the jitted functions during all timed runs. Target: 0.
* **0.5B shape** (`qwen2.5-0.5b-shape`, bf16 and f32): time to first token for a
  `--big-prompt`-token prompt (default 256 on CPU, 2048 on an accelerator) and batch-1 decode
  tokens/s, against the memory roofline: bandwidth (measured with a large device copy) / bytes
  read per token (weights + the KV cache at that context).

    python benchmarks/jax_engine.py                 # -> results/jax_engine.json
    python benchmarks/jax_engine.py --device-info   # print jax.devices() and exit
    python benchmarks/jax_engine.py --quick --out /tmp/j.json   # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ponder.inference.jax.checkpoint import init_params
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.generate import Generator, GenRequest
from ponder.inference.jax.sessions import TRACES

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(gen: Generator, reqs: list[GenRequest]) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = gen.generate(reqs)
    dt = time.perf_counter() - t0
    for r in out:
        if r.error:
            raise RuntimeError(r.error)
    return dt, out


def _traces() -> int:
    return sum(TRACES.values())


def _ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(3, vocab, n).tolist()


def bandwidth_gbps(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Device memory bandwidth from a large copy: an in-place (donated) elementwise update of
    `nbytes` reads and writes each byte once, and allocates nothing."""
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.ones(nbytes // 4, jnp.float32)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / statistics.median(times) / 1e9


def prefix_reuse(preset: str, cached: list[int], append: int, repeat: int, seed: int) -> tuple[list, int]:
    """Rows per cached length, and the traces seen during the timed runs."""
    cfg = PRESETS[preset]
    params = init_params(cfg, seed)
    longest = max(cached) + append + 1
    gen = Generator(cfg, params, max_batch=1, max_seq_len=longest + 64,
                    device_bytes=3 * (longest + 64) * _kv_bytes_per_token(cfg, 4) + (64 << 20))
    rng = np.random.default_rng(seed)
    rows, recompiles = [], 0
    for n in cached:
        base = _ids(rng, n, cfg.vocab_size)
        key = f"p{n}"
        gen.generate([GenRequest(key, base, 1)])  # the session now holds `base`
        gen.generate([GenRequest(key, base + _ids(rng, append, cfg.vocab_size), 1)])  # warm-up
        t0 = time.perf_counter()
        gen.generate([GenRequest(None, base + _ids(rng, append, cfg.vocab_size), 1)])
        slow = time.perf_counter() - t0 > 10  # one timed full prefill is enough at that length
        inc, full = [], []
        before = _traces()
        for i in range(repeat):
            dt, (r,) = _timed(gen, [GenRequest(key, base + _ids(rng, append, cfg.vocab_size), 1)])
            assert r.cached_tokens == n, (r.cached_tokens, n)
            inc.append(dt)
            if slow and i:
                continue
            dt, (r,) = _timed(gen, [GenRequest(None, base + _ids(rng, append, cfg.vocab_size), 1)])
            assert r.cached_tokens == 0
            full.append(dt)
        recompiles += _traces() - before
        a, f = statistics.median(inc), statistics.median(full)
        rows.append({"cached": n, "new": append, "append_s": a, "full_s": f, "ratio": f / a,
                     "append_runs_s": inc, "full_runs_s": full})
    return rows, recompiles


def decode_rate(preset: str, batches: list[int], prompt: int, tokens: int, repeat: int, seed: int,
                dtype: str = "float32", params=None) -> tuple[list, int]:
    """Rows per batch size, and the traces seen during the timed runs."""
    cfg = PRESETS[preset]
    params = params if params is not None else init_params(cfg, seed, dtype)
    itemsize = jnp.dtype(params["embed"].dtype).itemsize
    gen = Generator(cfg, params, max_batch=max(batches), max_seq_len=prompt + tokens + 64,
                    device_bytes=2 * max(batches) * (prompt + tokens + 64) * _kv_bytes_per_token(cfg, itemsize))
    rng = np.random.default_rng(seed)

    def reqs(B: int, n: int) -> list[GenRequest]:
        return [GenRequest(None, _ids(rng, prompt, cfg.vocab_size), n, ignore_eos=True) for _ in range(B)]

    for B in batches:  # warm-up: both shapes of every batch size
        _timed(gen, reqs(B, 1))
        _timed(gen, reqs(B, tokens))
    first: dict[int, list[float]] = {B: [] for B in batches}
    whole: dict[int, list[float]] = {B: [] for B in batches}
    before = _traces()
    for _ in range(repeat):  # batch sizes interleaved, so the machine's drift hits them alike
        for B in batches:
            first[B].append(_timed(gen, reqs(B, 1))[0])
            dt, out = _timed(gen, reqs(B, tokens))
            assert all(len(r.tokens) == tokens for r in out)
            whole[B].append(dt)
    rows = []
    for B in batches:
        t1, tn = statistics.median(first[B]), statistics.median(whole[B])
        rows.append({"batch": B, "prompt": prompt, "new_tokens": tokens, "ttft_s": t1, "total_s": tn,
                     "decode_tok_s": B * (tokens - 1) / max(tn - t1, 1e-9),
                     "step_ms": 1000 * (tn - t1) / (tokens - 1)})
    return rows, _traces() - before


def mixed_workload(preset: str, n: int, max_batch: int, prompt: int, repeat: int, seed: int) -> dict:
    """Continuous vs static batching on one queue of mixed-length requests (see the docstring)."""
    cfg = PRESETS[preset]
    params = init_params(cfg, seed, "float32")
    rng = np.random.default_rng(seed + 1)
    lengths = [int(m) for m in rng.integers(8, 97, n)]
    prompts = [_ids(rng, prompt, cfg.vocab_size) for _ in range(n)]
    gen = Generator(cfg, params, max_batch=max_batch, max_seq_len=prompt + 96 + 64,
                    device_bytes=2 * max_batch * (prompt + 160) * _kv_bytes_per_token(cfg, 4))

    def reqs() -> list[GenRequest]:
        return [GenRequest(None, p, m, ignore_eos=True) for p, m in zip(prompts, lengths)]

    def static() -> tuple[float, list[float]]:
        t0, answered = time.perf_counter(), []
        todo = reqs()
        for i in range(0, n, max_batch):
            group = todo[i : i + max_batch]
            gen.generate(group)
            answered += [time.perf_counter() - t0] * len(group)
        return time.perf_counter() - t0, answered

    def continuous() -> tuple[float, list[float]]:
        t0, answered, todo = time.perf_counter(), [], [list(enumerate(reqs()))]
        gen.serve(lambda: todo.pop() if todo else [], lambda i, r: answered.append(time.perf_counter() - t0))
        return time.perf_counter() - t0, answered

    static(), continuous()  # warm-up: every shape both modes use
    before = _traces()
    runs: dict[str, list] = {"static": [], "continuous": []}
    for _ in range(repeat):
        for name, fn in (("static", static), ("continuous", continuous)):
            runs[name].append(fn())
    tokens = sum(lengths)
    out: dict[str, Any] = {"requests": n, "max_batch": max_batch, "prompt": prompt, "tokens": tokens,
                           "recompiles": _traces() - before}
    for name, rs in runs.items():
        total = statistics.median(t for t, _ in rs)
        out[name] = {"total_s": total, "tok_s": tokens / total,
                     "mean_latency_s": statistics.median(statistics.mean(a) for _, a in rs),
                     "runs_s": [t for t, _ in rs]}
    out["throughput_ratio"] = out["continuous"]["tok_s"] / out["static"]["tok_s"]
    out["latency_ratio"] = out["static"]["mean_latency_s"] / out["continuous"]["mean_latency_s"]
    return out


def _kv_bytes_per_token(cfg, itemsize: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def big_model(preset: str, dtypes: list[str], prompt: int, tokens: int, repeat: int, seed: int,
              bw: float) -> list[dict]:
    cfg = PRESETS[preset]
    rows = []
    for dtype in dtypes:
        params = init_params(cfg, seed, dtype)
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
        (row,), recompiles = decode_rate(preset, [1], prompt, tokens, repeat, seed, dtype, params)
        itemsize = jnp.dtype(params["embed"].dtype).itemsize
        # bytes a decode step reads: every weight (the tied embedding once, as the LM head; its
        # gather of one row is negligible) + the KV cache at the mean decode context
        per_token = weight_bytes + _kv_bytes_per_token(cfg, itemsize) * (prompt + tokens // 2)
        roofline = bw * 1e9 / per_token
        rows.append({"dtype": dtype, "params": cfg.num_params, "weight_bytes": weight_bytes,
                     "prompt": prompt, "new_tokens": tokens, "ttft_s": row["ttft_s"],
                     "decode_tok_s": row["decode_tok_s"], "roofline_tok_s": roofline,
                     "roofline_fraction": row["decode_tok_s"] / roofline, "recompiles": recompiles})
        del params
        gc.collect()
    return rows


def table(result: dict) -> str:
    lines = ["| measure | value |", "| --- | --- |"]
    for r in result["prefix"]:
        lines.append(f"| append {r['new']} to {r['cached']} cached vs full prefill of {r['cached'] + r['new']} "
                     f"({result['preset']}) | {1000 * r['append_s']:.1f} ms vs {1000 * r['full_s']:.0f} ms: "
                     f"**{r['ratio']:.1f}x** |")
    d1 = result["decode"][0]["decode_tok_s"]
    for r in result["decode"]:
        lines.append(f"| decode tokens/s, batch {r['batch']} ({result['preset']}) | {r['decode_tok_s']:,.0f} "
                     f"({r['decode_tok_s'] / d1:.1f}x batch 1; {r['step_ms']:.1f} ms/step) |")
    m = result.get("mixed")
    if m:
        for name in ("static", "continuous"):
            lines.append(f"| {m['requests']} mixed-length requests, {name} batching (max {m['max_batch']}) | "
                         f"{m[name]['tok_s']:,.0f} tokens/s, mean answer {m[name]['mean_latency_s']:.2f} s |")
        lines.append(f"| continuous / static | **{m['throughput_ratio']:.2f}x** tokens/s, "
                     f"**{m['latency_ratio']:.2f}x** sooner on average |")
    lines.append(f"| recompiles after warm-up | **{result['recompiles_after_warmup']}** "
                 f"(warm-up traced {result['compiles_warmup']}) |")
    lines.append(f"| memory bandwidth (device copy) | {result['bandwidth_gbps']:.1f} GB/s |")
    for r in result["big"]:
        lines.append(f"| {result['big_preset']} {r['dtype']}: TTFT ({r['prompt']}-token prompt) | "
                     f"{1000 * r['ttft_s']:,.0f} ms |")
        lines.append(f"| {result['big_preset']} {r['dtype']}: decode tokens/s, batch 1 | "
                     f"{r['decode_tok_s']:.1f} (roofline {r['roofline_tok_s']:.1f}: "
                     f"{100 * r['roofline_fraction']:.0f}%) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--cached", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--append", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--mixed", type=int, default=64, help="requests in the continuous-batching run (0: skip)")
    ap.add_argument("--big-preset", default="qwen2.5-0.5b-shape")
    ap.add_argument("--big-prompt", type=int, default=None, help="[default: 256 on CPU, 2048 elsewhere]")
    ap.add_argument("--big-tokens", type=int, default=None, help="[default: 16 on CPU, 128 elsewhere]")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--no-big", action="store_true", help="skip the 0.5B-shape runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    ap.add_argument("--device-info", action="store_true", help="print jax.devices() and exit")
    ap.add_argument("--out", type=Path, default=RESULTS / "jax_engine.json")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    if a.device_info:
        print(f"backend={backend} devices={jax.devices()}")
        return {"backend": backend, "devices": [str(d) for d in jax.devices()]}
    if a.quick:
        a.preset, a.cached, a.batches, a.big_preset = "tiny", [128, 256], [1, 4], "tiny"
        a.decode_prompt, a.decode_tokens, a.repeat, a.big_prompt, a.big_tokens = 32, 8, 1, 32, 8
        a.mixed = min(a.mixed, 12)
    cpu = backend == "cpu"
    a.big_prompt = a.big_prompt or (256 if cpu else 2048)
    a.big_tokens = a.big_tokens or (16 if cpu else 128)

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    say(f"backend={backend} devices={jax.devices()}")
    bw = bandwidth_gbps(1 << 28 if a.quick else 1 << 30)
    say(f"bandwidth {bw:.1f} GB/s; append vs full prefill on {a.preset} ...")
    c0 = _traces()
    prefix, rc_prefix = prefix_reuse(a.preset, a.cached, a.append, a.repeat, a.seed)
    say(json.dumps(prefix))
    gc.collect()
    say(f"decode at batches {a.batches} ...")
    decode, rc_decode = decode_rate(a.preset, a.batches, a.decode_prompt, a.decode_tokens, a.repeat, a.seed)
    say(json.dumps(decode))
    gc.collect()
    mixed = None
    if a.mixed:
        say(f"continuous vs static batching, {a.mixed} requests ...")
        mixed = mixed_workload(a.preset, a.mixed, 4 if a.quick else 16, 32 if a.quick else 64, a.repeat, a.seed)
        say(json.dumps(mixed))
        gc.collect()
    recompiles = rc_prefix + rc_decode + (mixed["recompiles"] if mixed else 0)
    compiles = _traces() - c0 - recompiles
    say(f"{a.big_preset} at {a.dtypes} ...")
    big = [] if a.no_big else big_model(a.big_preset, a.dtypes, a.big_prompt, a.big_tokens,
                                          a.repeat, a.seed, bw)
    result: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "jax": jax.__version__, "backend": backend,
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "preset": a.preset, "params": PRESETS[a.preset].num_params, "repeat": a.repeat,
        "bandwidth_gbps": bw, "prefix": prefix, "decode": decode, "mixed": mixed,
        "compiles_warmup": compiles, "recompiles_after_warmup": recompiles + sum(r["recompiles"] for r in big),
        "big_preset": a.big_preset, "big": big,
    }
    ratio = {r["cached"]: r["ratio"] for r in prefix}
    scale = decode[-1]["decode_tok_s"] / decode[0]["decode_tok_s"]
    result["targets"] = {
        "append_vs_full_at_2048_ge_10x": ratio.get(2048, 0) >= 10 if 2048 in ratio else None,
        f"decode_batch_{decode[-1]['batch']}_ge_8x_batch_1": scale >= 8,
        "recompiles_after_warmup_0": result["recompiles_after_warmup"] == 0,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    if not a.quiet:
        print(table(result))
    return result


if __name__ == "__main__":
    main()

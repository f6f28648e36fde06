"""The engine on whatever device JAX finds: the 0.5B shape's decode rate against the memory
roofline, with and without speculative decoding. One prepared script for a GPU session (CI never
has one); it runs unchanged on a CPU, with smaller defaults.

* **bandwidth**: a large device-to-device copy (`jax_engine.bandwidth_gbps`), GB/s.
* **roofline**: a decode step at batch 1 reads every weight once plus the KV cache at its
  context, so tokens/s can be at most bandwidth / (weight bytes + KV bytes per token x context).
* **plain / adaptive / ...**: greedy JSON decisions (`benchmarks/speculation.py`'s requests: event
  lines plus, in the *echo* setting, a previous decision the model writes again, as a trained
  model copies its prompt) at batch 1, decoded one token per step (`speculate=None`) and with
  `Speculation()` (prompt lookup + grammar fast-forward, adaptive lookahead), plus the fixed
  lookahead and forced-tokens-only modes of `speculation.py`. `roofline_fraction` is decode
  tokens/s (prefill left out) over the roofline; speculation can pass 1 (several tokens per
  weight read), which is its point.

The model is `qwen2.5-0.5b-shape` with random weights (the rate does not depend on the values);
its tokenizer is a byte-level BPE of `--vocab` ids trained here (generation is masked to those
ids, while the LM head still computes all 151,936 logits).

    python benchmarks/device_engine.py                    # -> results/device_engine.json
    python benchmarks/device_engine.py --dtype float32 --tokens 24 --repeat 1   # a CPU quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jax_engine import _kv_bytes_per_token, bandwidth_gbps  # noqa: E402
from speculation import ACTIONS, cells, event_text, prompts, tokenizer  # noqa: E402

from ponder.inference.jax.checkpoint import init_params  # noqa: E402
from ponder.inference.jax.config import PRESETS  # noqa: E402
from ponder.inference.jax.constrain import Constraint  # noqa: E402
from ponder.types import answer_schema  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    accel = jax.default_backend() != "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b-shape")
    ap.add_argument("--dtype", default="bfloat16" if accel else "float32",
                    help="[default: bfloat16 on an accelerator, float32 on a CPU, whose bf16 matmuls are slow]")
    ap.add_argument("--tokens", type=int, default=96 if accel else 48, help="max_tokens of a decision")
    ap.add_argument("--vocab", type=int, default=4096, help="ids of the tokenizer trained here")
    ap.add_argument("--repeat", type=int, default=3 if accel else 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "device_engine.json")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = PRESETS[a.preset]
    bw = bandwidth_gbps(1 << 30 if accel else 1 << 28)
    tk = tokenizer(a.vocab, a.seed)
    params = init_params(cfg, a.seed, a.dtype)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    itemsize = jnp.dtype(params["embed"].dtype).itemsize
    c = Constraint.json_schema(answer_schema(ACTIONS), tk, vocab_size=cfg.vocab_size)
    rng = np.random.default_rng(a.seed)
    text = event_text(rng, 0)
    fresh = prompts(tk, [text])
    fresh_rows, plain_out = cells(cfg, params, tk, c, fresh, a.tokens, a.repeat)
    # echo: the prompt quotes plain decoding's own answer, which the model then writes again
    echo = prompts(tk, [f"{text}\nPrevious decision: {tk.decode(plain_out[0].tokens)}"])
    echo_rows, _ = cells(cfg, params, tk, c, echo, a.tokens, a.repeat)
    rows = []
    for setting, batch, cell_rows in (("fresh", fresh, fresh_rows), ("echo", echo, echo_rows)):
        for row in cell_rows:
            context = len(batch[0]) + row["tokens"] // 2  # the mean context of a decode step
            roofline = bw * 1e9 / (weight_bytes + _kv_bytes_per_token(cfg, itemsize) * context)
            row.update({"setting": setting, "roofline_tok_s": roofline,
                        "roofline_fraction": row["decode_tok_s"] / roofline})
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), file=sys.stderr, flush=True)
    result = {
        "what": __doc__.split("\n\n")[0], "preset": a.preset, "dtype": a.dtype, "params": cfg.num_params,
        "weight_bytes": weight_bytes, "bandwidth_gbps": bw, "max_tokens": a.tokens, "repeat": a.repeat,
        "rows": rows, "seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

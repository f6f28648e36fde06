"""Speculative decoding in the JAX engine: plain decoding vs fixed vs adaptive lookahead.

Decision-sized generations: greedy JSON decisions (`ponder.types.answer_schema`, at most
`--tokens` tokens, the constraint closing the JSON near the budget) for prompts that list
events with the fields and values a decision copies. The `small` preset (~32M params, float32)
with random weights and a byte-level BPE trained here to its vocabulary. Three modes, in the
same run, on the same requests:

* **plain**: `speculate=None`, one token per step;
* **fixed**: `Speculation(k_max=4, adaptive=False, buckets=(5,))`: every greedy row drafts 4
  tokens whenever the lookup finds a match or the grammar forces tokens, at any batch size;
* **adaptive**: `Speculation()` (the defaults): lookahead from each row's acceptance EMA, the
  verify length from the batch's expected tokens per cost;
* **forced_only**: adaptive with the lookup switched off: only the grammar's forced tokens are
  drafted, so this row is the grammar fast-forward's effect alone.

Two settings, because random weights never copy their prompt the way a trained model does:

* **fresh**: the prompt holds events only. Lookup drafts are accepted only where the random
  model repeats itself, which it does a lot: greedy random weights fall into loops inside the
  free-text `reason` (a trained model loops far less, so read this as an upper bound); the
  grammar's forced tokens (`{"action":"`, `","severity":"`, ...) are counted apart as
  `forced` / `forced_accepted`, and `forced_only` shows what they alone buy.
* **echo**: the prompt also holds, as a "previous decision", the text that plain greedy
  decoding produced for the fresh prompt. The model then mostly writes that decision again
  (as a trained model copies fields, values and phrases from its prompt), so lookup drafts are
  accepted and the numbers show what acceptance buys.

Each cell runs at batch 1 and batch `--batch` (16): `tok_s` is generated tokens / wall time of
`Generator.generate` (median of `--repeat` runs after one untimed run of the same shapes, so
compile time is excluded; the modes' runs interleaved), `decode_tok_s` the same from the first
token on (prefill left out); `speedup` / `decode_speedup` are those over plain's; `acceptance` is accepted / drafted
lookup tokens, `forced_acceptance` the same for forced tokens; `tokens_per_step` is tokens a
row gains per verify step (accepted drafts + 1); `verify_steps` / `plain_steps` count the
steps of each kind; `same_as_plain` checks every answer is token-for-token plain's.

    python benchmarks/speculation.py                      # -> results/speculation.json
    python benchmarks/speculation.py --quick --out /tmp/s.json   # tiny preset, seconds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jax_engine import _timed as run  # noqa: E402 - one way to time a generate call

from ponder.inference.jax.checkpoint import init_params  # noqa: E402
from ponder.inference.jax.compiles import TRACES
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.constrain import Constraint
from ponder.inference.jax.generate import Generator, GenRequest, Speculation
from ponder.inference.jax.tokenizer import Tokenizer, train_bpe, write_tokenizer_files
from ponder.types import answer_schema

RESULTS = Path(__file__).resolve().parent / "results"
ACTIONS = ("ignore", "observe", "notify", "escalate", "inspect", "restart")
MODES = {
    "plain": None,
    "fixed": Speculation(k_max=4, adaptive=False, spec_tokens=1 << 20, buckets=(5,)),
    "adaptive": Speculation(),
    # lookup off (a rate of 0 drafts no lookup token, and never probes): forced tokens only
    "forced_only": Speculation(prior=0.0, probe_every=1 << 30),
}


def tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(d, train_bpe(vocab_size, seed, n_lines=max(20_000, vocab_size * 2 // 3)),
                              model_max_length=4096)
        return Tokenizer.from_dir(d)


def event_text(rng: np.random.Generator, i: int) -> str:
    """Telemetry lines for one device, the values a decision quotes."""
    key = f"pump-{i:04d}"
    lines = []
    for f in rng.choice(["vibration", "temperature", "pressure", "humidity"], 3, replace=False):
        v, m, z = rng.uniform(0, 120), rng.uniform(0, 100), rng.normal(0, 3)
        lines.append(f"{key} {f}={v:.2f} (mean {m:.1f}, z={z:+.2f})")
    return "\n".join(lines) + f"\nDecide one action of {', '.join(ACTIONS)} for {key}."


def prompts(tk: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tk.encode(tk.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
            for t in texts]


def decode_seconds(out: list) -> float:
    """From the first row's first token to the last row's answer (prefill left out)."""
    first = min(r.phases["queue"] + r.phases["prefill"] for r in out)
    return max(sum(r.phases.values()) for r in out) - first


def cells(cfg, params, tk, c, batch: list[list[int]], tokens: int, repeat: int) -> tuple[list, list]:
    """Every mode on the same requests, runs interleaved (the machine's drift hits all modes
    alike) -> (one row per mode, plain decoding's answers)."""
    B, seq = len(batch), max(map(len, batch)) + tokens + 64
    gens = {mode: Generator(cfg, params, n_vocab=tk.vocab_size, eos_ids=tk.eos_token_ids, max_batch=B,
                            max_seq_len=seq, device_bytes=64 << 20, host_bytes=64 << 20, speculate=spec)
            for mode, spec in MODES.items()}

    def reqs() -> list[GenRequest]:
        return [GenRequest(None, p, tokens, constraint=c) for p in batch]

    for gen in gens.values():  # warm-up: the same shapes
        run(gen, reqs())
        gen.spec_stats = type(gen.spec_stats)()
    before = sum(TRACES.values())
    times: dict[str, list[float]] = {m: [] for m in gens}
    decode: dict[str, list[float]] = {m: [] for m in gens}
    outs: dict[str, list] = {}
    for _ in range(repeat):
        for mode, gen in gens.items():
            dt, outs[mode] = run(gen, reqs())
            times[mode].append(dt)
            decode[mode].append(decode_seconds(outs[mode]))
    recompiles = sum(TRACES.values()) - before
    rows = []
    for mode, gen in gens.items():
        n = sum(len(r.tokens) for r in outs[mode])
        stats = gen.spec_stats.as_dict()
        row = {"mode": mode, "batch": B, "tokens": n, "tok_s": n / statistics.median(times[mode]),
               "decode_tok_s": (n - B) / statistics.median(decode[mode]), "runs_s": times[mode],
               "recompiles": recompiles, "verify_steps": stats["steps"] // repeat,
               "plain_steps": stats["plain"] // repeat}
        if MODES[mode] is not None:
            row.update({k: stats[k] for k in ("acceptance", "forced_acceptance")})
            row["tokens_per_step"] = stats["tokens_per_row_step"]
            row.update({k: stats[k] // repeat for k in ("drafted", "accepted", "forced", "forced_accepted")})
            row["same_as_plain"] = all(a.tokens == b.tokens for a, b in zip(outs[mode], outs["plain"]))
        rows.append(row)
    for row in rows:
        row["speedup"] = row["tok_s"] / rows[0]["tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows, outs["plain"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, few tokens: seconds")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=80, help="max_tokens of a decision")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "speculation.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.tokens, args.repeat = "tiny", 4, 32, 1
    cfg = PRESETS[args.preset]
    t0 = time.perf_counter()
    tk = tokenizer(cfg.vocab_size, args.seed)
    params = init_params(cfg, args.seed)
    c = Constraint.json_schema(answer_schema(ACTIONS), tk, vocab_size=cfg.vocab_size)
    rng = np.random.default_rng(args.seed)
    texts = [event_text(rng, i) for i in range(args.batch)]
    fresh = prompts(tk, texts)
    results: dict[str, Any] = {"settings": {}}
    echo: list[list[int]] = []  # set once plain decoding has answered the fresh prompts
    for setting in ("fresh", "echo"):
        rows = []
        for B in (1, args.batch):
            batch = (fresh if setting == "fresh" else echo)[:B]
            got, plain = cells(cfg, params, tk, c, batch, args.tokens, args.repeat)
            if setting == "fresh" and B == args.batch:  # the decisions the echo prompts quote
                echo = prompts(tk, [f"{t}\nPrevious decision: {tk.decode(r.tokens)}"
                                    for t, r in zip(texts, plain)])
            for row in got:
                print(json.dumps({"setting": setting, **{k: v for k, v in row.items() if k != "runs_s"}}),
                      file=sys.stderr)
            rows += got
        results["settings"][setting] = rows
    results.update({
        "what": __doc__.split("\n\n")[0],
        "preset": args.preset, "params": cfg.num_params, "batch": args.batch, "max_tokens": args.tokens,
        "repeat": args.repeat, "quick": args.quick, "seconds": time.perf_counter() - t0,
        "modes": {k: None if v is None else {f: getattr(v, f) for f in
                                             ("k_max", "spec_tokens", "buckets", "adaptive")}
                  for k, v in MODES.items()},
        "settings_meaning": {
            "fresh": "events-only prompts; lookup drafts are accepted where the random model loops "
                     "(an upper bound for a trained model); forced_only isolates the grammar's forced tokens",
            "echo": "the prompt also quotes plain decoding's own decision: the model writes it again, "
                    "so lookup acceptance is meaningful (a stand-in for a trained model copying its prompt)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "devices": [str(d) for d in jax.devices()]},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a vote costs on the JAX engine: n samples of one decision prompt, prefilled once.

A random checkpoint (`--preset`, random weights: the answers mean nothing, the machinery and
its speed are what is measured) behind `JaxEngine`, decision-shaped requests: the pipeline's
header (instructions and the decision JSON Schema), a key's data block of `--events` readings
(a few hundred tokens in all), the schema constraint on every answer, temperature 0.7. Three
ways to ask, each timed as one `JaxEngine.generate` call after a warm-up of the same shapes:

* **one**: one sample (n=1);
* **vote**: one request for `--samples` samples (n=5): the prompt is prefilled once and forked
  into n rows, each seeded seed + i;
* **apart**: the naive baseline, n requests of one sample each (seed + i), sent together in
  one call; each has a session of its own, so each prefills the prompt.

Each way is timed on `--keys` keys one call at a time, first **cold** (a new key: the whole
prompt is prefilled) and then **warm** (the key's next call: its session holds the prompt, and
only a new tail of statistics is prefilled), and on `--batch` keys in one call (cold). The ways
are interleaved key by key, so the machine's drift hits them alike. Reported: the median
seconds per call, the ratios vote/one (target <= 1.6 cold) and apart/one, and the completion
tokens per call (a vote waits for its longest sample).

    python benchmarks/vote_cost.py                       # -> results/vote_cost.json
    python benchmarks/vote_cost.py --preset tiny --keys 2 --batch 2 --out /tmp/v.json
"""

from __future__ import annotations

import argparse
import asyncio
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

from ponder.inference.engine import Completion, Request
from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.engine import JaxEngine, chat_messages
from ponder.operators.context import ContextPolicy, header
from ponder.types import answer_schema

RESULTS = Path(__file__).resolve().parent / "results"
ACTIONS = ("none", "notify", "inspect", "escalate")
SCHEMA = answer_schema(ACTIONS)
HEAD = header(ContextPolicy(), ACTIONS, SCHEMA)
WAYS = ("one", "vote", "apart")


def prompt(events: int, call: int) -> tuple[str, str]:
    """A decision prompt: a stable prefix (header and data block), and a tail of statistics
    that differs from call to call. Every key gets the same text (the sessions tell them apart),
    so the warm-up covers the timed calls' shapes."""
    key = "pump-07"
    lines = [f'- t={60 * i} temperature={20 + (i * 7) % 13}.{i % 10} vibration={1 + (i * 3) % 5}.{i % 7} '
             f'pressure={101 + i % 4}.{(i * 5) % 10} status="ok"' for i in range(events)]
    prefix = (HEAD + f"<data key={key}>\nHistory summary (oldest first):\n(none yet)\n"
              "Recent events (oldest first):\n" + "\n".join(lines) + "\n")
    tail = (f"Statistics after {events + call} events:\n- temperature: mean=24.{call} sd=3.1 min=20.0 "
            f"max=32.{call} last=31.{call} slope=0.{call}/min\n</data>\n"
            "Decide the action for the latest event. Reply with JSON only.\n")
    return prefix, tail


def requests(way: str, key: str, a: argparse.Namespace, call: int, seed: int) -> list[Request]:
    prefix, tail = prompt(a.events, call)
    n = a.samples

    def one(session: str, samples: int, s: int) -> Request:
        return Request(session, prefix, tail, a.answer_tokens, ACTIONS, SCHEMA, n=samples,
                       temperature=a.temperature, seed=s)

    if way == "one":
        return [one(f"one/{key}", 1, seed)]
    if way == "vote":
        return [one(f"vote/{key}", n, seed)]
    return [one(f"apart/{key}#{i}", 1, seed + i) for i in range(n)]  # a session each: they run together


async def timed(engine: JaxEngine, reqs: list[Request]) -> tuple[float, list[Completion]]:
    t0 = time.perf_counter()
    out = await engine.generate(reqs)
    dt = time.perf_counter() - t0
    for c in out:
        if c.error:
            raise RuntimeError(c.error)
    return dt, out


def _tokens(out: list[Completion]) -> int:
    return sum(c.usage.completion_tokens for c in out)


async def measure(engine: JaxEngine, a: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, list]] = {phase: {w: [] for w in WAYS} for phase in ("cold", "warm", "batch")}
    prefill: dict[str, dict[str, int]] = {}
    seeds = iter(range(0, 10**9, a.samples))  # every call its own seeds: no two draw alike

    def reqs(way: str, key: str, call: int) -> list[Request]:
        return requests(way, key, a, call, next(seeds))

    # warm-up: every shape the timed calls use, cold, warm and batched
    for way in WAYS:
        for call in (0, 1):
            await timed(engine, reqs(way, "warmup", call))
        await timed(engine, [r for k in range(a.batch) for r in reqs(way, f"warmup-b{k}", 0)])
    traces = engine.generator.compiles
    for k in range(a.keys):
        order = WAYS[k % 3:] + WAYS[: k % 3]  # interleaved, each way first in turn
        for phase, call in (("cold", 0), ("warm", 1)):
            for way in order:
                dt, out = await timed(engine, reqs(way, f"k{k}", call))
                runs[phase][way].append((dt, _tokens(out)))
                if k == 0:
                    u = [c.usage for c in out]
                    prefill.setdefault(phase, {})[way] = sum(x.prompt_tokens - x.cached_prompt_tokens for x in u)
    for r in range(a.rounds):
        for way in WAYS[r % 3:] + WAYS[: r % 3]:
            dt, out = await timed(engine, [x for k in range(a.batch) for x in reqs(way, f"b{r}-{k}", 0)])
            runs["batch"][way].append((dt, _tokens(out)))

    result: dict[str, Any] = {"prefilled_tokens_key0": prefill,
                              "recompiles_after_warmup": engine.generator.compiles - traces}
    for phase, ways in runs.items():
        med = {w: statistics.median(dt for dt, _ in xs) for w, xs in ways.items()}
        result[phase] = {
            "median_s": med,
            "completion_tokens_mean": {w: statistics.mean(t for _, t in xs) for w, xs in ways.items()},
            "vote_over_one": med["vote"] / med["one"],
            "apart_over_one": med["apart"] / med["one"],
            "runs_s": {w: [dt for dt, _ in xs] for w, xs in ways.items()},
        }
    return result


def table(result: dict[str, Any]) -> str:
    n = result["samples"]
    rows = [f"| calls | one (s) | vote n={n} (s) | {n} apart (s) | vote / one | apart / one |",
            "| --- | --- | --- | --- | --- | --- |"]
    for phase, what in (("cold", "one key, cold prompt"), ("warm", "one key, warm session"),
                        ("batch", f"{result['batch_keys']} keys at once, cold")):
        r = result[phase]
        m = r["median_s"]
        rows.append(f"| {what} | {m['one']:.3f} | {m['vote']:.3f} | {m['apart']:.3f} | "
                    f"{r['vote_over_one']:.2f}x | {r['apart_over_one']:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--events", type=int, default=4, help="readings in each key's data block")
    ap.add_argument("--answer-tokens", type=int, default=64,
                    help="each answer's budget (the constraint closes the JSON within it)")
    ap.add_argument("--keys", type=int, default=4, help="keys timed one call at a time")
    ap.add_argument("--batch", type=int, default=3, help="keys in each batched call")
    ap.add_argument("--rounds", type=int, default=2, help="batched calls per way")
    ap.add_argument("--out", type=Path, default=RESULTS / "vote_cost.json")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    max_batch = a.batch * a.samples

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    say(f"backend={jax.default_backend()} devices={jax.devices()}; {a.preset}, n={a.samples} ...")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / a.preset
        init_model(ckpt, a.preset, seed=0)
        engine = JaxEngine(ckpt, max_batch=max_batch, session_cap_bytes=256 << 20, max_seq_len=1024)

        async def run() -> dict[str, Any]:
            try:
                await engine.start()
                return await measure(engine, a)
            finally:
                await engine.stop()

        measured = asyncio.run(run())
        prompt_tokens = len(engine.encode_chat(chat_messages(*prompt(a.events, 0))))
    result: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "command": "python benchmarks/vote_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": a.preset, "params": PRESETS[a.preset].num_params, "samples": a.samples,
        "temperature": a.temperature, "answer_tokens": a.answer_tokens, "prompt_tokens": prompt_tokens, "keys": a.keys, "batch_keys": a.batch,
        "rounds": a.rounds, **measured, "wall_s": time.perf_counter() - t0,
    }
    result["targets"] = {"vote_over_one_cold_le_1.6": result["cold"]["vote_over_one"] <= 1.6}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    if not a.quiet:
        print(table(result))
    return result


if __name__ == "__main__":
    main()

"""Context size and prefix stability: what a key costs to remember and to prompt.

For each size (default 1k and 10k events per key) a few simulated devices are fed, in stream
order, through the iot_monitor pipeline's `logic.observe` (gate + context). Then, per key:

* **state bytes**: msgpack of the whole `KeyState` and of its `ContextState` alone;
* **rendered tokens**: the prompt `render(...)` gives for the key's latest event, counted with
  `approx_tokens` (and with a small BPE trained here on simulator text when the `tokenizers`
  package is importable), against **raw-history tokens**: every event of the key as its
  original JSON line, same counter. Their quotient is the compression ratio. Rendered tokens
  must stay flat as history grows;
* **compactions**: the context's epoch;
* **prefix stability**, over the last `--stability-window` events: after each event the prompt
  is rendered, and a step is stable when the new prefix starts with the previous one (expected
  about 1 - 1/compaction interval). Also the prefix characters an engine with a prefix cache
  must compute per event (prefix length past the longest common prefix with the previous
  render), the tail it computes every time, and the whole prompt for comparison.

    python benchmarks/context_size.py                       # -> results/context_size.json
    python benchmarks/context_size.py --sizes 500 1000 --keys 2 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import msgspec

from ponder.connectors.base import Record
from ponder.inference.openai import common_prefix
from ponder.operators.context import approx_tokens, render
from ponder.operators.keyed import KeyState
from ponder.pipelines.iot_monitor import pipeline
from ponder.simulate import Fleet
from ponder.types import SourcePos

RESULTS = Path(__file__).resolve().parent / "results"

_enc = msgspec.json.Encoder()
_mp = msgspec.msgpack.Encoder()



# -- optional real tokenizer --------------------------------------------------------------------


def train_bpe(corpus: list[str], vocab_size: int = 4096) -> Callable[[str], int] | None:
    """A byte-level BPE trained on `corpus`, as a token counter; None without `tokenizers`."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)

    def count(text: str) -> int:
        return len(tok.encode(text).ids)

    count.vocab_size = tok.get_vocab_size()  # type: ignore[attr-defined]
    return count


def bpe_corpus(seed: int, keys: int = 2, events: int = 2000, every: int = 25) -> list[str]:
    """Training text from a fleet the measurement does not use: raw JSON lines, and the prompts
    rendered from them."""
    logic, decoder, _ = pipeline.build()
    head = logic.reasoner.head
    states: dict[str, KeyState] = {}
    out: list[str] = []
    lines: list[str] = []
    for i, ev in enumerate(Fleet(keys, events, seed).iter_events()):
        raw = _enc.encode(ev)
        lines.append(raw.decode())
        e = decoder(Record(raw, SourcePos("bpe", 0, i)))
        st = states.get(e.key) or states.setdefault(e.key, logic.new_state(e.key))
        v = logic.observe(st, e)
        if i % every == 0:
            out.append(render(logic.context, st.context, head, v.findings).text)
    # raw lines in chunks, so the trainer sees them as documents of a few hundred lines
    out.extend("\n".join(lines[j : j + 200]) for j in range(0, len(lines), 200))
    return out


# -- one size -------------------------------------------------------------------------------------


def measure(events_per_key: int, keys: int, seed: int, window: int,
            bpe: Callable[[str], int] | None) -> dict[str, Any]:
    logic, decoder, _ = pipeline.build()
    policy, head = logic.context, logic.reasoner.head
    fleet = Fleet(keys, events_per_key, seed)
    states: dict[str, KeyState] = {}
    raw: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    last_verdict: dict[str, Any] = {}
    prev: dict[str, Any] = {}  # key -> (prefix, epoch) of the previous render
    stab = {k: {"steps": 0, "extends": 0, "breaks_without_compaction": 0, "compactions": 0,
                "new_prefix_chars": 0, "strict_new_prefix_chars": 0, "tail_chars": 0,
                "prompt_chars": 0, "renders": 0} for k in fleet.keys}
    first_measured = max(0, events_per_key - window)
    t0 = time.perf_counter()
    for i, ev in enumerate(fleet.iter_events()):
        line = _enc.encode(ev)
        e = decoder(Record(line, SourcePos("sim", 0, i)))
        key = e.key
        st = states.get(key)
        if st is None:
            st = states[key] = logic.new_state(key)
            raw[key] = []
            seen[key] = 0
        raw[key].append(line.decode())
        verdict = logic.observe(st, e)
        last_verdict[key] = verdict
        n = seen[key]
        seen[key] = n + 1
        if n < first_measured:
            continue
        p = render(policy, st.context, head, verdict.findings)
        s = stab[key]
        s["renders"] += 1
        s["tail_chars"] += len(p.tail)
        s["prompt_chars"] += len(p.prefix) + len(p.tail)
        before = prev.get(key)
        prev[key] = (p.prefix, p.epoch)
        if before is None:
            continue
        old, old_epoch = before
        s["steps"] += 1
        compacted = p.epoch != old_epoch
        s["compactions"] += compacted
        if p.prefix.startswith(old):
            s["extends"] += 1
            s["new_prefix_chars"] += len(p.prefix) - len(old)
            s["strict_new_prefix_chars"] += len(p.prefix) - len(old)
        else:
            s["breaks_without_compaction"] += not compacted
            s["new_prefix_chars"] += len(p.prefix) - common_prefix(old, p.prefix)
            s["strict_new_prefix_chars"] += len(p.prefix)
    feed_s = time.perf_counter() - t0

    per_key = []
    for key in fleet.keys:
        st = states[key]
        p = render(policy, st.context, head, last_verdict[key].findings)
        history = "\n".join(raw[key]) + "\n"
        s = stab[key]
        row: dict[str, Any] = {
            "key": key,
            "events": seen[key],
            "keystate_bytes": len(_mp.encode(st)),
            "context_bytes": len(_mp.encode(st.context)),
            "gate_bytes": len(_mp.encode(st.gate)),
            "rendered_chars": len(p.text),
            "rendered_tokens": approx_tokens(p.text),
            "prefix_tokens": approx_tokens(p.prefix),
            "tail_tokens": approx_tokens(p.tail),
            "raw_chars": len(history),
            "raw_tokens": approx_tokens(history),
            "compactions": st.context.epoch,
            "window_lines": len(st.context.window),
            "summary_segments": len(st.context.summary),
            "prefix_stability": s["extends"] / s["steps"] if s["steps"] else 1.0,
            "steps": s["steps"],
            "extends": s["extends"],
            "compactions_in_window": s["compactions"],
            "breaks_without_compaction": s["breaks_without_compaction"],
            "new_prefix_chars_per_event": s["new_prefix_chars"] / max(1, s["steps"]),
            "strict_new_prefix_chars_per_event": s["strict_new_prefix_chars"] / max(1, s["steps"]),
            "tail_chars_per_event": s["tail_chars"] / max(1, s["renders"]),
            "prompt_chars_per_event": s["prompt_chars"] / max(1, s["renders"]),
        }
        row["compression_ratio"] = row["raw_tokens"] / row["rendered_tokens"]
        if bpe is not None:
            row["bpe_rendered_tokens"] = bpe(p.text)
            row["bpe_raw_tokens"] = bpe(history)
            row["bpe_compression_ratio"] = row["bpe_raw_tokens"] / row["bpe_rendered_tokens"]
        per_key.append(row)

    def mean(name: str) -> float:
        return round(statistics.fmean(r[name] for r in per_key), 3)

    steps = sum(r["steps"] for r in per_key)
    extends = sum(r["extends"] for r in per_key)
    compactions_in_window = sum(s["compactions"] for s in stab.values())
    out: dict[str, Any] = {
        "events_per_key": events_per_key,
        "keys": keys,
        "feed_s": round(feed_s, 3),
        "header_tokens": approx_tokens(head),
        **{k: mean(k) for k in ("keystate_bytes", "context_bytes", "gate_bytes", "rendered_chars",
                                "rendered_tokens", "prefix_tokens", "tail_tokens", "raw_chars",
                                "raw_tokens", "compression_ratio", "compactions", "window_lines",
                                "summary_segments")},
        "rendered_tokens_max": max(r["rendered_tokens"] for r in per_key),
        "keystate_bytes_max": max(r["keystate_bytes"] for r in per_key),
        "stability_window": min(window, events_per_key),
        "prefix_stability": round(extends / steps, 4) if steps else 1.0,
        "compaction_interval": round(steps / compactions_in_window, 2) if compactions_in_window else None,
        "expected_stability": round(1.0 - compactions_in_window / steps, 4) if steps else 1.0,
        "breaks_without_compaction": sum(r["breaks_without_compaction"] for r in per_key),
        "new_prefix_chars_per_event": mean("new_prefix_chars_per_event"),
        "strict_new_prefix_chars_per_event": mean("strict_new_prefix_chars_per_event"),
        "tail_chars_per_event": mean("tail_chars_per_event"),
        "prompt_chars_per_event": mean("prompt_chars_per_event"),
    }
    out["computed_fraction"] = round(
        (out["new_prefix_chars_per_event"] + out["tail_chars_per_event"]) / out["prompt_chars_per_event"], 4)
    if bpe is not None:
        for k in ("bpe_rendered_tokens", "bpe_raw_tokens", "bpe_compression_ratio"):
            out[k] = mean(k)
    out["per_key"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in per_key]
    return out


# -- report ---------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    bpe = result["tokenizer"]["bpe"] is not None
    head = ["events/key", "KeyState B", "ContextState B", "rendered tok", "raw tok", "compression",
            *(["BPE rendered", "BPE raw", "BPE compression"] if bpe else []),
            "compactions", "prefix stability (expected)", "new prefix ch/event",
            "tail ch/event", "prompt ch", "computed"]
    rows = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for s in result["sizes"]:
        cells = [f"{s['events_per_key']:,}", f"{s['keystate_bytes']:,.0f}", f"{s['context_bytes']:,.0f}",
                 f"{s['rendered_tokens']:,.0f}", f"{s['raw_tokens']:,.0f}", f"{s['compression_ratio']:.1f}x"]
        if bpe:
            cells += [f"{s['bpe_rendered_tokens']:,.0f}", f"{s['bpe_raw_tokens']:,.0f}",
                      f"{s['bpe_compression_ratio']:.1f}x"]
        cells += [f"{s['compactions']:,.0f}", f"{s['prefix_stability']:.4f} ({s['expected_stability']:.4f})",
                  f"{s['new_prefix_chars_per_event']:.0f}", f"{s['tail_chars_per_event']:.0f}",
                  f"{s['prompt_chars_per_event']:,.0f}", f"{100 * s['computed_fraction']:.1f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    f = result["flat"]
    rows.append("")
    rows.append(f"rendered tokens, largest/smallest size: {f['rendered_tokens_ratio']:.3f} "
                f"({'flat' if f['ok'] else 'NOT flat'}); approx tokens = chars/3"
                + (f"; BPE: byte-level, vocab {result['tokenizer']['bpe']['vocab_size']}, trained on "
                   "simulator text (other seed)" if bpe else "; BPE: `tokenizers` not installed"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="events per key")
    ap.add_argument("--keys", type=int, default=4, help="simulated devices (keys) per size")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--stability-window", type=int, default=1000,
                    help="prefix stability over this many last events of each key")
    ap.add_argument("--no-bpe", action="store_true", help="skip the trained BPE count")
    ap.add_argument("--bpe-vocab", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=RESULTS / "context_size.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    bpe = None
    bpe_info = None
    if not args.no_bpe:
        t0 = time.perf_counter()
        bpe = train_bpe(bpe_corpus(args.seed + 1000), args.bpe_vocab)
        if bpe is not None:
            bpe_info = {"kind": "byte-level BPE (tokenizers)", "vocab_size": bpe.vocab_size,  # type: ignore[attr-defined]
                        "train_s": round(time.perf_counter() - t0, 2)}
            say(f"trained BPE (vocab {bpe.vocab_size}) in {bpe_info['train_s']}s")  # type: ignore[attr-defined]
        else:
            say("tokenizers not importable: approx_tokens only")

    sizes = []
    for n in sorted(set(args.sizes)):
        s = measure(n, args.keys, args.seed, args.stability_window, bpe)
        say(f"{n} events/key x {args.keys} keys: fed in {s['feed_s']}s")
        sizes.append(s)

    logic, _, _ = pipeline.build()
    pol = logic.context
    small, large = sizes[0], sizes[-1]
    ratio = large["rendered_tokens"] / small["rendered_tokens"]
    result: dict[str, Any] = {
        "benchmark": "context_size",
        "pipeline": "iot_monitor",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "keys": args.keys,
        "policy": {"window": pol.window, "summary_segments": pol.summary_segments,
                   "token_budget": pol.token_budget, "window_chars": pol.window_chars},
        "tokenizer": {"approx": "approx_tokens: (chars + 2) // 3", "bpe": bpe_info},
        "sizes": sizes,
        "flat": {"smallest": small["events_per_key"], "largest": large["events_per_key"],
                 "rendered_tokens_ratio": round(ratio, 4), "ok": ratio <= 1.2,
                 **({"bpe_rendered_tokens_ratio": round(large["bpe_rendered_tokens"]
                                                         / small["bpe_rendered_tokens"], 4)}
                    if bpe is not None else {})},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(table(result))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""Camera frames through JaxEngine: vision-encoder work with per-key frame reuse vs re-encoding
every frame, on the simulator's camera stream.

`ponder.simulate.Fleet(devices, events, seed, camera=True)` gives every event a `frame`: a 64x48
grey PNG data URL, byte-identical from one step to the next except during camera incidents.
Each step's events (one per device) go to the engine as one `generate` call, one Request per
device: a stable prefix (header and the key's data block), the frame, then a tail with the
event's readings; `max_tokens` answer tokens, greedy. The same stream runs through three engines
of one checkpoint, one after the other, each warmed up first on other keys (no compile timed):

* `reencode`: `frame_cache_bytes=0`, so every frame goes through the tower;
* `reuse`: the per-key frame cache (exact: a key's byte-identical frame reuses its features);
* `near`: the cache with `near_identical=8` grey levels.

Per engine: frames encoded, tower calls, encode seconds (PNG decode + preprocess + tower),
the whole run's wall seconds, and prompt / cached prompt tokens; ratios against `reencode`.
All engines name an image by its file digest, so the session's K/V reuse (cached tokens) is the
same with or without the frame cache: what the cache saves is the tower.

Two streams: `clean` (the simulator's frames as they are) and `noisy` (each frame with sensor
noise, every pixel moved by up to `--noise` grey levels, seeded, PNG re-encoded): there no two
frames are byte-identical, so only `near` reuses, and it also reuses the image's K/V (the
reused frame's digest names the prompt's image positions).

Checkpoint: `tiny-vl` text model (2 layers, hidden 64) with a larger CLIP tower so the image
costs what it does in a real LLaVA, relative to text: 224x224 in 16x16 patches (196 image
tokens), hidden 256, 6 layers, random weights (`--quick`: tiny-vl as is, 32x32, 16 tokens).

    python benchmarks/camera_frames.py                  # -> results/camera_frames.json
    python benchmarks/camera_frames.py --quick --out /tmp/c.json   # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as _dt
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from ponder.images import parse_image
from ponder.inference.engine import Request
from ponder.inference.jax import checkpoint
from ponder.inference.jax.engine import JaxEngine
from ponder.simulate import Fleet

RESULTS = Path(__file__).resolve().parent / "results"
HEAD = "You watch one device's thermal camera and telemetry.\nAllowed actions: none, alert, inspect.\n"
NEAR = 8  # grey levels
MODES = {"reencode": {"frame_cache_bytes": 0}, "reuse": {}, "near": {"near_identical": NEAR}}
BIG_TOWER = {"image_size": 224, "patch_size": 16, "hidden_size": 256, "intermediate_size": 1024,
             "num_hidden_layers": 6, "num_attention_heads": 4, "resize_shortest": 224, "crop_hw": (224, 224)}


def make_checkpoint(path: Path, quick: bool) -> dict[str, Any]:
    checkpoint.init_model(path, "tiny-vl", seed=0)
    cfg, _ = checkpoint.load(path)
    if not quick:  # keep the tokenizer and its <image> id, swap in the larger tower
        cfg = cfg.replace(vision=replace(cfg.vision, **BIG_TOWER))
        checkpoint.save(path, cfg, checkpoint.init_params(cfg, seed=1))
    v = cfg.vision
    return {"preset": "tiny-vl" if quick else "tiny-vl + 224px tower", "image_size": v.image_size,
            "patch_size": v.patch_size, "image_tokens": v.n_tokens, "vision_hidden": v.hidden_size,
            "vision_layers": v.num_hidden_layers, "vision_params": v.num_params, "params": cfg.num_params}


def noisy(url: str, rng: np.random.Generator, amp: int) -> str:
    """The frame with every pixel moved by up to `amp` grey levels, as a PNG data URL."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as im:
        a = np.asarray(im.convert("L"), np.int16)
    a = np.clip(a + rng.integers(-amp, amp + 1, a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def requests(events: list[dict[str, Any]], max_tokens: int, noise: int, rng: np.random.Generator) -> list[Request]:
    out = []
    for ev in events:
        key = ev["device_id"]
        frame = noisy(ev["frame"], rng, noise) if noise else ev["frame"]
        img = parse_image(frame, field="frame", allowed_dirs=(), max_bytes=1 << 20)
        readings = " ".join(f"{f}={ev[f]}" for f in ("temperature", "vibration", "pressure", "humidity"))
        prefix = HEAD + f"\n<data key={key}>\nsite={ev['site']}\ncamera frame:\n"
        out.append(Request(key, prefix, f"</data>\nnow: {readings} status={ev['status']}\n", max_tokens,
                           ("none", "alert", "inspect"), {}, images=(img,)))
    return out


async def run_mode(path: Path, steps: list[list[Request]], warm: list[Request], kw: dict[str, Any],
                   engine_kw: dict[str, Any]) -> dict[str, Any]:
    engine = JaxEngine(path, **engine_kw, **kw)
    try:
        n = 1
        while n <= len(warm):  # every tower batch shape the run can use (padded to powers of two)
            await engine.generate([msgspec.structs.replace(r, session=f"warm{n}-{r.session}") for r in warm[:n]])
            n *= 2
        s = engine.frames.stats
        base = s.as_dict()
        prompt = cached = 0
        t0 = time.perf_counter()
        for batch in steps:
            for c in await engine.generate(batch):
                assert c.error is None, c.error
                prompt += c.usage.prompt_tokens
                cached += c.usage.cached_prompt_tokens
        wall = time.perf_counter() - t0
        now = s.as_dict()
        return {"frames": sum(len(b) for b in steps),
                "frames_encoded": now["frames_encoded"] - base["frames_encoded"],
                "encoder_calls": now["encoder_calls"] - base["encoder_calls"],
                "hits": now["hits"] - base["hits"], "near_hits": now["near_hits"] - base["near_hits"],
                "encode_s": round(now["encode_seconds"] - base["encode_seconds"], 4), "wall_s": round(wall, 3),
                "prompt_tokens": prompt, "cached_tokens": cached, "cache_bytes": engine.frames.bytes}
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--events", type=int, default=40, help="events (frames) per device")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--noise", type=int, default=3, help="grey levels of the noisy stream's pixel noise")
    ap.add_argument("--quick", action="store_true", help="tiny-vl as is, 4 devices x 8 events")
    ap.add_argument("--out", type=Path, default=RESULTS / "camera_frames.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.devices, a.events = 4, 8
    fleet = Fleet(a.devices, a.events, a.seed, camera=True)
    events = list(fleet.iter_events())
    by_step: dict[int, list[dict[str, Any]]] = {}
    seen: dict[str, int] = {}
    for ev in events:  # one generate call per step: every device's event of that step
        step = seen[ev["device_id"]] = seen.get(ev["device_id"], -1) + 1
        by_step.setdefault(step, []).append(ev)
    rng = np.random.default_rng(a.seed)
    streams = {name: [requests(evs, a.max_tokens, noise, rng) for _, evs in sorted(by_step.items())]
               for name, noise in (("clean", 0), ("noisy", a.noise))}
    distinct = {name: len({(r.session, r.images[0].digest) for batch in steps for r in batch})
                for name, steps in streams.items()}
    # warm-up: the same shapes under keys the run never uses
    warm = [msgspec.structs.replace(r, session="warm-" + r.session) for r in streams["clean"][0]]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vl"
        model = make_checkpoint(path, a.quick)
        kw = {"max_batch": a.devices, "session_cap_bytes": 64 << 20, "batch_buckets": (1, a.devices),
              "seq_buckets": (512,), "chunk_buckets": (64,)}
        runs: dict[str, dict[str, Any]] = {}
        for name, steps in streams.items():
            runs[name] = {}
            for mode, engine_kw in MODES.items():
                runs[name][mode] = asyncio.run(run_mode(path, steps, warm, kw, engine_kw))
                print(json.dumps({"stream": name, "mode": mode, **runs[name][mode]}), flush=True)

    ratios = {name: {mode: {k: round(r[k] / by["reencode"][k], 4) for k in ("frames_encoded", "encode_s", "wall_s")}
                     for mode, r in by.items() if mode != "reencode"} for name, by in runs.items()}
    result = {
        "benchmark": "camera_frames",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python benchmarks/camera_frames.py" + (" --quick" if a.quick else ""),
        "stream": {"devices": a.devices, "events_per_device": a.events, "seed": a.seed, "frames": len(events),
                   "distinct_frames_per_key": distinct, "camera_incidents": len(fleet.camera.incidents),
                   "noise_grey_levels": a.noise, "near_identical": NEAR, "max_tokens": a.max_tokens},
        "model": model,
        "runs": runs,
        "vs_reencode": ratios,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

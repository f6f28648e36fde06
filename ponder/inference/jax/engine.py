"""JaxEngine: the in-process edge tier, a local checkpoint behind ponder's Engine protocol.

The prompt is laid out exactly as OpenAIEngine sends it to a server, and rendered with the
checkpoint's own chat template, so a Request gives the same token ids in process and through
`ponder serve-model` (which runs this engine):

* chat (default): a system message with the header before DATA_MARKER, then one user message
  with the key's data block and the tail (or one user message when there is no marker);
* completions: `prefix + tail` as raw text.

Each request's `session` (its stream key) selects a KV session, so a key's stable prefix is
computed once and each call prefills only what changed (see sessions.py); `request.schema`
constrains the answer to that JSON Schema (see constrain.py). A request with `n` > 1 is
prefilled once and decoded as n samples (sample i seeded `seed + i`, each constrained on its
own); its session keeps the prompt and sample 0's continuation. The blocking JAX work runs on
one worker thread, so the event loop stays free. Every request, from `generate` or from the
server, goes through one `Feed` into the generator's continuous batch: rows of a call that
arrives while another decodes join it at the next step.

Images. On a LLaVA checkpoint (`cfg.vision`), a Request's `images` are placed between its
stable prefix and its tail, one image token each (chat: in the user message, after the data
block and before the tail; completions: `prefix + images + tail`), expanded to the tower's
`n_tokens` positions that take the image's features (`GenRequest.embeds`). So an unchanged frame
after an unchanged prefix is a prefix the key's session already holds. Features come from the
per-key frame cache (frames.py: the same frame again, or with `near_identical` one within that
many grey levels of the key's last, is not encoded again); the frames it misses are decoded,
preprocessed and encoded in one tower call on the engine's thread, between decode steps, for
every request that arrived together. A request with images on a text-only checkpoint is
answered with an error Completion (the model cannot see them; the reasoner falls back to
another tier) rather than answered blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ponder.images import Image
from ponder.inference.engine import Completion, EngineError, Request
from ponder.inference.openai import DATA_MARKER
from ponder.types import Usage

from .frames import FrameCache, FrameJob
from .kvcache import HOST_KV
from .rows import GenResult
from .speculate import Speculation

__all__ = ["JaxEngine", "chat_messages"]

# a request's budget when it leaves it to the engine (max_tokens 0): the constraint closes a
# schema'd answer within any budget above a few tokens (constrain.py `close`), so a valid
# answer always fits in this many without spending a server-grammar's worst case
_ANSWER_BUDGET = 128

_MODES = ("chat", "completions")


def chat_messages(prefix: str, tail: str, images: str = "") -> list[dict[str, str]]:
    """The messages OpenAIEngine (chat mode) sends for a request's prefix and tail; `images`
    (their placeholder text) go between the two."""
    i = prefix.find(DATA_MARKER)
    if i < 0:
        return [{"role": "user", "content": prefix + images + tail}]
    return [{"role": "system", "content": prefix[:i]},
            {"role": "user", "content": prefix[i + 1 :] + images + tail}]


class Feed:
    """Feeds requests into `Generator.serve` on the engine's thread. `submit` queues a request
    and waits for its result; while the engine is idle, the first request waits `max_wait_s`
    for company, so a burst is prefilled together; later ones join the running batch."""

    def __init__(self, engine: JaxEngine, max_batch: int, max_wait_s: float = 0.0):
        self.engine, self.max_batch, self.max_wait_s = engine, max_batch, max_wait_s
        self.inbox: deque = deque()  # (id, GenRequest, FrameJob | None): drained by the engine
        self.futures: dict[int, asyncio.Future] = {}
        self.ids = itertools.count()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.answered: set[int] = set()  # ids whose result is on its way (engine thread adds)
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop of the running feed
        self.on_admit: Callable[[int], None] | None = None  # rows that joined together (engine thread)
        self.on_done: Callable[[Any, float], None] | None = None  # (GenResult, seconds since submit)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.wake = asyncio.Event()  # a new event loop (or a dead task): start over on it
            self.task = asyncio.create_task(self._loop(), name="ponder-jax-feed")
            if self.inbox:
                self.wake.set()

    async def stop(self) -> None:
        """Stop feeding. Requests not yet handed to the generator are answered with an
        EngineError; the ones it holds finish (the engine's stop waits for them)."""
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self.inbox:
            i, _, _ = self.inbox.popleft()
            fut = self.futures.get(i)
            if fut is not None and not fut.done():
                fut.set_exception(EngineError("the engine stopped before this request ran"))

    async def submit(self, req, frames: FrameJob | None = None):
        """Run one GenRequest in the continuous batch -> its GenResult. `frames`: its images,
        turned into `req.embeds` on the engine's thread just before it joins."""
        if self.stopping:
            raise EngineError("the engine is stopping")
        if req.cancelled is None:
            req = dataclasses.replace(req, cancelled=threading.Event())
        i, t0 = next(self.ids), time.perf_counter()
        fut = self.futures[i] = asyncio.get_running_loop().create_future()
        self.inbox.append((i, req, frames))
        self.start()
        self.wake.set()
        try:
            res = await fut
        except asyncio.CancelledError:  # the caller gave up (a timeout): free its row
            req.cancelled.set()
            raise
        finally:
            self.futures.pop(i, None)
            self.answered.discard(i)
        if self.on_done:
            self.on_done(res, time.perf_counter() - t0)
        return res

    def _fetch(self) -> list:  # engine thread
        items = []
        while self.inbox:
            items.append(self.inbox.popleft())
        jobs = [(i, req, job) for i, req, job in items if job is not None]
        if not jobs:
            return [(i, req) for i, req, _ in items]
        embeds = self.engine.frames.embeds([job for _, _, job in jobs], self.engine.prepare_image,
                                           self.engine.encode_pixels, max_frames=self.engine.max_batch)
        ready = {}
        for (i, req, _), got in zip(jobs, embeds):
            if isinstance(got, str):  # a bad image fails its own request only
                self._done(i, GenResult(prompt_tokens=len(req.prompt), finish_reason="error", error=got))
            else:
                ready[i] = dataclasses.replace(req, embeds=got)
        return [(i, ready[i] if job is not None else req) for i, req, job in items
                if job is None or i in ready]

    def _done(self, i: int, res) -> None:  # engine thread
        if i in self.futures:  # a cancelled caller's id is gone: do not keep it forever
            self.answered.add(i)
        # to the loop of the caller waiting for it: a `serve` started from an earlier event
        # loop (asyncio.run after asyncio.run) may still be running when a later loop's
        # request arrives, and takes it; its answer must not go to the closed loop
        fut = self.futures.get(i)
        target = fut.get_loop() if fut is not None else self.loop
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            target.call_soon_threadsafe(self._resolve, i, res)

    def _resolve(self, i: int, res) -> None:
        fut = self.futures.get(i)
        if fut is not None and not fut.done():
            fut.set_result(res)

    async def _loop(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.inbox:
                continue  # the last serve already took them
            if len(self.inbox) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            try:
                await self.engine.run(self.engine.generator.serve, self._fetch, self._done, self.on_admit)
            except Exception as e:  # noqa: BLE001 - serve answers batch failures itself; this is worse
                queued = {i for i, _, _ in self.inbox}
                for i, fut in list(self.futures.items()):
                    if i not in queued and i not in self.answered and not fut.done():
                        fut.set_exception(e)


class JaxEngine:
    """A Hugging Face checkpoint directory (Llama, Qwen2, Mistral) run in this process.

    :param dtype: compute and KV dtype, float32 or bfloat16.
    :param max_batch: most requests decoded together; more wait for a free slot.
    :param session_cap_bytes: device memory for KV sessions (allocated at start).
    :param host_cap_bytes: host memory for sessions spilled from the device.
    :param mode: chat (the chat template) or completions (raw prefix + tail).
    :param temperature/top_p/seed: sampling for `generate` (0: greedy).
    :param warmup: trace the usual shapes at start (a dict is passed to Generator.warmup).
    :param max_wait_ms: how long a request that finds the engine idle waits for others.
    :param near_identical: a LLaVA checkpoint's frames: grey levels within which a key's frame
        reuses its last frame's features and cached K/V (None: only a byte-identical frame does;
        see frames.py).
    :param frame_cache_bytes: host memory for the keys' encoded frames (least recently used
        dropped first).
    :param generator_kw: more Generator options (buckets, page_size, prefill_tokens, ...).
    """

    name = "jax"

    def __init__(self, path: str | Path, *, dtype: str = "float32", max_batch: int = 8,
                 session_cap_bytes: int = 256 << 20, host_cap_bytes: int = 1 << 30,
                 mode: str = "chat", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, max_seq_len: int | None = None,
                 warmup: bool | dict[str, Any] = False, model_name: str | None = None,
                 max_wait_ms: float = 0.0, near_identical: int | None = None,
                 frame_cache_bytes: int = 64 << 20, **generator_kw: Any) -> None:
        if mode not in _MODES or dtype not in ("float32", "bfloat16"):
            msg = f"JaxEngine: mode must be one of {_MODES} and dtype float32 or bfloat16"
            raise ValueError(msg)
        self.path = Path(path)
        self.model = model_name or self.path.name
        self.dtype, self.max_batch, self.mode = dtype, max_batch, mode
        self.session_cap_bytes, self.host_cap_bytes = session_cap_bytes, host_cap_bytes
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.max_seq_len, self.warmup = max_seq_len, warmup
        if generator_kw.get("host_kv", "int8") not in HOST_KV:
            msg = f"JaxEngine: host_kv={generator_kw['host_kv']!r} is not one of {', '.join(map(repr, HOST_KV))}"
            raise ValueError(msg)
        # greedy decisions under a schema: speculation gives the same answers in fewer steps
        generator_kw.setdefault("speculate", Speculation())
        self.generator_kw = generator_kw
        self.frames = FrameCache(frame_cache_bytes, near_identical)  # ValueError for bad options
        self.cfg = self.tokenizer = self.generator = None
        self.vision_params = self.image_text = None  # a LLaVA checkpoint's, once loaded
        self._executor: ThreadPoolExecutor | None = None
        self.feed = Feed(self, max_batch, max_wait_ms / 1000)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.feed.stopping:  # a second executor would run the generator beside the first
            raise EngineError(f"{self.name} engine ({self.path}) is stopping")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ponder-jax")
        if self.generator is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def stop(self) -> None:
        """Answer what is queued with an error, let the running rows finish, release the
        thread. Calls made meanwhile raise EngineError; after it, the engine can start again."""
        self.feed.stopping = True
        try:
            await self.feed.stop()
            ex, self._executor = self._executor, None
            if ex is not None:  # waits for the rows in flight; the model stays loaded
                await asyncio.get_running_loop().run_in_executor(None, ex.shutdown)
        finally:
            self.feed.stopping = False

    def load(self) -> None:
        """Read the checkpoint and tokenizer, allocate the session pool, warm up (blocking)."""
        if self.generator is not None:
            return
        from .checkpoint import load
        from .generate import Generator
        from .tokenizer import Tokenizer

        if not (self.path / "config.json").exists():
            msg = f"JaxEngine: {self.path} is not a checkpoint directory (no config.json)"
            raise FileNotFoundError(msg)
        cfg, params = load(self.path, self.dtype)
        tokenizer = Tokenizer.from_dir(self.path)
        gen = Generator(cfg, params, n_vocab=tokenizer.vocab_size,
                        eos_ids=tokenizer.eos_token_ids or cfg.eos_token_id, max_batch=self.max_batch,
                        max_seq_len=self.max_seq_len, device_bytes=self.session_cap_bytes,
                        host_bytes=self.host_cap_bytes, **self.generator_kw)
        if cfg.vision is not None:
            text = tokenizer.tk.id_to_token(cfg.vision.image_token_id)
            if text is None or tokenizer.encode(text) != [cfg.vision.image_token_id]:
                msg = (f"JaxEngine: {self.path}'s tokenizer has no token for the image token id "
                       f"{cfg.vision.image_token_id} (config.json image_token_id)")
                raise ValueError(msg)
            self.image_text = text
        if self.warmup:  # with cfg.vision, also the prefill chunks that carry image embeddings
            gen.warmup(**(self.warmup if isinstance(self.warmup, dict) else {}))
        self.vision_params = params.get("vision")
        if self.warmup and cfg.vision is not None:  # the tower at every padded batch (encode_pixels)
            import numpy as np

            self.cfg, n = cfg, 1
            S = cfg.vision.image_size
            while n < 2 * self.max_batch:  # embeds() encodes at most max_batch frames a call
                self.encode_pixels(np.zeros((n, cfg.vision.num_channels, S, S), np.float32))
                n *= 2
        self.cfg, self.tokenizer, self.generator = cfg, tokenizer, gen

    # -- the Engine protocol ------------------------------------------------------------------

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        await self.start()
        try:
            return await self._generate(list(requests))
        except Exception as e:
            msg = f"{self.name} engine ({self.path}) failed on a batch of {len(requests)}: {type(e).__name__}: {e}"
            raise EngineError(msg) from e

    async def _generate(self, requests: list[Request]) -> list[Completion]:
        from .generate import GenRequest

        out: list[Completion | None] = [None] * len(requests)
        batch, where = [], []
        for i, r in enumerate(requests):
            try:
                prompt, frames = self.request_prompt(r)
                constraint = self.constraint(r.schema) if r.schema else None
            except ValueError as e:
                out[i] = Completion("", Usage(), self.model, "error", f"request {r.request_id or i}: {e}")
                continue
            temperature = self.temperature if r.temperature is None else r.temperature
            seed = self.seed if r.seed is None else r.seed
            batch.append((GenRequest(r.session, prompt, r.max_tokens or _ANSWER_BUDGET, temperature,
                                     self.top_p, seed, constraint, n=r.n), frames))
            where.append(i)
        results = await asyncio.gather(*(self.submit(g, frames) for g, frames in batch))
        for i, res in zip(where, results):
            out[i] = self.completion(res)
        return out  # type: ignore[return-value]

    def completion(self, res) -> Completion:
        """A GenResult as a Completion: with n > 1, every sample's text, the prompt counted once."""
        samples = res.samples or [res]
        texts = tuple(self.decode(s.tokens) for s in samples)
        usage = Usage(res.prompt_tokens, res.cached_tokens, sum(len(s.tokens) for s in samples))
        return Completion(texts[0], usage, self.model, res.finish_reason, res.error,
                          samples=texts if res.samples else (), timings=res.phases)

    async def submit(self, req, frames: FrameJob | None = None):
        """One GenRequest through the continuous batch -> its GenResult; `frames` (its images,
        see place_images) fill `req.embeds` on the engine's thread."""
        await self.start()
        return await self.feed.submit(req, frames)

    def request_prompt(self, r: Request) -> tuple[list[int], FrameJob | None]:
        """A Request's prompt ids and, with images, where they go (ValueError if they cannot)."""
        if r.images and self.cfg.vision is None:
            msg = (f"{self.model} has no vision tower: this request's {len(r.images)} image(s) cannot be "
                   f"seen, so it is not answered without them")
            raise ValueError(msg)
        # one image per line, between the stable prefix and the tail (see the module docstring)
        images = (self.image_text + "\n") * len(r.images) if r.images else ""
        ids = (self.encode_chat(chat_messages(r.prefix, r.tail, images)) if self.mode == "chat"
               else self.encode_text(r.prefix + images + r.tail))
        if self.cfg.vision is None:
            return ids, None
        prompt, frames = self.place_images(ids, r.session, r.images)  # text spelling <image>: refused
        return prompt, frames if r.images else None

    def place_images(self, ids: list[int], key: str | None,
                     images: Sequence[Image]) -> tuple[list[int], FrameJob]:
        """A tokenized prompt with one image token per image -> the prompt with each expanded to
        the tower's n_tokens positions, and the FrameJob that fills them (cached under `key`)."""
        from .vision import expand_image_tokens

        vcfg = self.cfg.vision
        found = ids.count(vcfg.image_token_id)
        if found != len(images):
            msg = (f"the prompt holds {found} image tokens {self.image_text!r} for {len(images)} image(s): "
                   f"its text must not spell {self.image_text!r}")
            raise ValueError(msg)
        prompt, starts = expand_image_tokens(ids, vcfg)
        return prompt, FrameJob(key, tuple(images), tuple(starts))

    def prepare_image(self, image: Image):
        """An image's pixels for the tower (engine thread; ValueError if it does not decode)."""
        import io

        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError

        from .vision import preprocess

        try:
            with PILImage.open(io.BytesIO(image.data)) as im:
                im.load()
                return preprocess(im, self.cfg.vision)
        except (UnidentifiedImageError, OSError) as e:
            msg = f"cannot decode the image ({type(e).__name__})"  # PIL's text names a memory address
            raise ValueError(msg) from None

    def encode_pixels(self, pixels):
        """Pixels [N, 3, S, S] -> features [N, n_tokens, E] (engine thread): one tower call,
        N padded to a power of two so a warmed-up engine traces few shapes."""
        import numpy as np

        from .vision import encode_jit

        n = len(pixels)
        padded = 1 << (n - 1).bit_length()
        if padded > n:
            pixels = np.concatenate([pixels, np.zeros((padded - n, *pixels.shape[1:]), pixels.dtype)])
        return np.asarray(encode_jit(self.vision_params, self.cfg.vision, pixels))[:n]

    # -- shared with the server -----------------------------------------------------------------

    async def run(self, fn, *args):
        """Run `fn(*args)` on the engine's worker thread (where all JAX work happens)."""
        if self._executor is None:
            raise EngineError(f"{self.name} engine is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def constraint(self, schema: dict[str, Any]):
        """The Constraint for a JSON Schema (built once per schema; ValueError if unsupported)."""
        from .constrain import Constraint

        if not isinstance(schema, dict):
            msg = f"a JSON Schema must be an object, got {type(schema).__name__}"
            raise ValueError(msg)  # noqa: TRY004 - callers report every bad schema the same way
        try:
            return Constraint.json_schema(schema, self.tokenizer, vocab_size=self.cfg.vocab_size)
        except (TypeError, RuntimeError) as e:
            msg = f"cannot constrain to this JSON Schema: {e}; schema: {json.dumps(schema)[:200]}"
            raise ValueError(msg) from e

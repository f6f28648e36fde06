"""JaxEngine: the in-process edge tier, a local checkpoint behind ponder's Engine protocol.

The prompt is laid out exactly as OpenAIEngine sends it to a server, and rendered with the
checkpoint's own chat template, so a Request gives the same token ids in process and through
`ponder serve-model` (which runs this engine):

* chat (default): a system message with the header before DATA_MARKER, then one user message
  with the key's data block and the tail (or one user message when there is no marker);
* completions: `prefix + tail` as raw text.

Each request's `session` (its stream key) selects a KV session, so a key's stable prefix is
computed once and each call prefills only what changed (see sessions.py); `request.schema`
constrains the answer to that JSON Schema (see constrain.py). The blocking JAX work runs on one
worker thread, so the event loop stays free and calls are served one batch at a time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ponder.inference.engine import Completion, EngineError, Request
from ponder.inference.openai import DATA_MARKER
from ponder.types import Usage

__all__ = ["JaxEngine", "chat_messages"]

_MODES = ("chat", "completions")


def chat_messages(prefix: str, tail: str) -> list[dict[str, str]]:
    """The messages OpenAIEngine (chat mode) sends for a request's prefix and tail."""
    i = prefix.find(DATA_MARKER)
    if i < 0:
        return [{"role": "user", "content": prefix + tail}]
    return [{"role": "system", "content": prefix[:i]},
            {"role": "user", "content": prefix[i + 1 :] + tail}]


class JaxEngine:
    """A Hugging Face checkpoint directory (Llama, Qwen2, Mistral) run in this process.

    :param dtype: compute and KV dtype, float32 or bfloat16.
    :param max_batch: most requests decoded together; a larger call runs in several rounds.
    :param session_cap_bytes: device memory for KV sessions (allocated at start).
    :param host_cap_bytes: host memory for sessions spilled from the device.
    :param mode: chat (the chat template) or completions (raw prefix + tail).
    :param temperature/top_p/seed: sampling for `generate` (0: greedy).
    :param warmup: trace the usual shapes at start (a dict is passed to Generator.warmup).
    :param generator_kw: more Generator options (buckets, page_size, prefill_tokens, ...).
    """

    name = "jax"

    def __init__(self, path: str | Path, *, dtype: str = "float32", max_batch: int = 8,
                 session_cap_bytes: int = 256 << 20, host_cap_bytes: int = 1 << 30,
                 mode: str = "chat", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, max_seq_len: int | None = None,
                 warmup: bool | dict[str, Any] = False, model_name: str | None = None,
                 **generator_kw: Any) -> None:
        if mode not in _MODES or dtype not in ("float32", "bfloat16"):
            msg = f"JaxEngine: mode must be one of {_MODES} and dtype float32 or bfloat16"
            raise ValueError(msg)
        self.path = Path(path)
        self.model = model_name or self.path.name
        self.dtype, self.max_batch, self.mode = dtype, max_batch, mode
        self.session_cap_bytes, self.host_cap_bytes = session_cap_bytes, host_cap_bytes
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.max_seq_len, self.warmup = max_seq_len, warmup
        self.generator_kw = generator_kw
        self.cfg = self.tokenizer = self.generator = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ponder-jax")
        if self.generator is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def stop(self) -> None:
        ex, self._executor = self._executor, None
        if ex is not None:  # waits for the batch in flight; the model stays loaded
            await asyncio.get_running_loop().run_in_executor(None, ex.shutdown)

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
        if self.warmup:
            gen.warmup(**(self.warmup if isinstance(self.warmup, dict) else {}))
        self.cfg, self.tokenizer, self.generator = cfg, tokenizer, gen

    # -- the Engine protocol ------------------------------------------------------------------

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        await self.start()
        try:
            return await self.run(self._generate, list(requests))
        except Exception as e:
            msg = f"{self.name} engine ({self.path}) failed on a batch of {len(requests)}: {type(e).__name__}: {e}"
            raise EngineError(msg) from e

    def _generate(self, requests: list[Request]) -> list[Completion]:
        from .generate import GenRequest

        out: list[Completion | None] = [None] * len(requests)
        batch, where = [], []
        for i, r in enumerate(requests):
            try:
                prompt = (self.encode_chat(chat_messages(r.prefix, r.tail)) if self.mode == "chat"
                          else self.encode_text(r.prefix + r.tail))
                constraint = self.constraint(r.schema) if r.schema else None
            except ValueError as e:
                out[i] = Completion("", Usage(), self.model, "error", f"request {r.request_id or i}: {e}")
                continue
            batch.append(GenRequest(r.session, prompt, r.max_tokens, self.temperature, self.top_p,
                                    self.seed, constraint))
            where.append(i)
        for i, res in zip(where, self.generator.generate(batch)):
            usage = Usage(res.prompt_tokens, res.cached_tokens, len(res.tokens))
            out[i] = Completion(self.decode(res.tokens), usage, self.model, res.finish_reason, res.error)
        return out  # type: ignore[return-value]

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

"""OpenAI-compatible engine: vLLM, llama.cpp, SGLang, our own `serve-model`, or OpenAI itself.

One HTTP call per request, sent concurrently: the server batches them (continuous batching),
and a semaphore caps how many are in flight. The prompt is laid out so its bytes for one key
stay a prefix of the next call's until the key's context compacts, which is what automatic
prefix caching (vLLM, llama.cpp slots) needs to hit:

* chat: a system message with the pipeline's header (instructions + schema, the same for every
  key and call), then one user message with the key's data block and the tail (see DATA_MARKER);
* completions: `prefix + tail` as the raw prompt.

`request.session` (the stream key) goes in the standard `user` field, which every server
accepts; `session_fields` adds or renames fields (e.g. `prompt_cache_key` for OpenAI).

Failures. A transient failure (timeout, reset connection, 429, 5xx) is retried `retries` times
with exponential backoff and jitter, waiting at least what `Retry-After` asks. Any other 4xx
is not retried, and neither is a failure to connect (refused, connect timeout): a backend
that is down stays down for longer than a backoff, retrying every request of an outage
multiplies the load on it when it comes back, and the router's breaker is what decides when
to try again. A request that still fails yields a Completion with `error` set, so one bad
request does not fail its batch; but when *no* request of a batch could even connect, the
backend as a whole is down and `generate` raises EngineError.

Structured output. `json_schema` sends OpenAI's `response_format` (vLLM, llama.cpp, SGLang
and OpenAI accept it); `vllm` sends vLLM's `structured_outputs: {"json": schema}` (current
vLLM; `guided_json`, which v0.12 removed, can still go through `extra_body` for older servers);
`none` sends neither.
`auto` starts as `json_schema` and drops to `none` for good if the server rejects it with a 400.
The answer is validated after generation either way (operators/decide.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import Any, Sequence
from urllib.parse import urlsplit

import httpx
import msgspec

from ponder.inference.engine import Completion, EngineError, Request
from ponder.types import Usage

__all__ = ["OpenAIEngine", "DATA_MARKER"]

logger = logging.getLogger(__name__)

# Where context.render's untrusted data starts: before it is the pipeline's header (the system
# message); the newline between them is dropped, so system + "\n" + user == the prompt.
DATA_MARKER = "\n<data key="
_MODES = ("chat", "completions")
_STRUCTURED = ("auto", "json_schema", "vllm", "none")


class OpenAIEngine:
    """Engine over an OpenAI-compatible HTTP server (`base_url` like `http://host:8000/v1`)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, mode: str = "chat",
                 max_concurrency: int = 8, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.2, structured: str = "auto", temperature: float = 0.0,
                 seed: int | None = None, extra_body: dict[str, Any] | None = None,
                 session_fields: Sequence[str] = ("user",),
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if mode not in _MODES or structured not in _STRUCTURED:
            msg = f"OpenAIEngine: mode must be one of {_MODES} and structured one of {_STRUCTURED}"
            raise ValueError(msg)
        if max_concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("OpenAIEngine: max_concurrency >= 1, retries >= 0, timeout_s > 0")
        base = base_url.rstrip("/")
        if urlsplit(base).path in ("", "/"):
            base += "/v1"  # `http://host:8000` means the usual OpenAI root
        self.base_url, self.model, self.mode = base, model, mode
        self.url = base + ("/chat/completions" if mode == "chat" else "/completions")
        self.api_key = api_key  # explicit only: never send an ambient key to an arbitrary URL
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.structured, self.temperature, self.seed = structured, temperature, seed
        self.extra_body = dict(extra_body or {})
        self.session_fields = tuple(session_fields)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._sem = asyncio.Semaphore(max_concurrency)  # remade by start(): one per event loop

    async def start(self) -> None:
        if self._client is None:
            headers = {"content-type": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            n = self.max_concurrency
            self._sem = asyncio.Semaphore(n)
            self._client = httpx.AsyncClient(
                headers=headers, transport=self._transport,
                # a dead host should fail fast, a slow generation may take the whole timeout
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0)),
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        await self.start()
        results = await asyncio.gather(*(self._one(r) for r in requests))
        if results and all(unreachable for _, unreachable in results):
            msg = f"{self.name} backend unreachable at {self.base_url}: {results[0][0].error}"
            raise EngineError(msg)
        return [c for c, _ in results]

    # -- one request --------------------------------------------------------------------------

    def body(self, req: Request) -> dict[str, Any]:
        """The JSON body sent for `req` (public so tests and tools can inspect the layout)."""
        b: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                             "temperature": self.temperature}
        if self.seed is not None:
            b["seed"] = self.seed
        for f in self.session_fields:
            b[f] = req.session
        if self.mode == "chat":
            i = req.prefix.find(DATA_MARKER)
            if i < 0:
                b["messages"] = [{"role": "user", "content": req.prefix + req.tail}]
            else:
                b["messages"] = [{"role": "system", "content": req.prefix[:i]},
                                 {"role": "user", "content": req.prefix[i + 1 :] + req.tail}]
        else:
            b["prompt"] = req.prefix + req.tail
        if req.schema and self.structured in ("auto", "json_schema"):
            b["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "ponder_decision", "schema": req.schema, "strict": True}}
        elif req.schema and self.structured == "vllm":
            b["structured_outputs"] = {"json": req.schema}
        b.update(self.extra_body)
        return b

    def _fail(self, error: str) -> Completion:
        return Completion("", Usage(), self.model, finish_reason="error", error=error[:500])

    async def _one(self, req: Request) -> tuple[Completion, bool]:
        """(completion, unreachable): unreachable means the last attempt could not connect."""
        assert self._client is not None
        body = self.body(req)
        attempt = 0
        while True:
            wait = 0.0
            try:
                async with self._sem:
                    r = await self._client.post(self.url, content=msgspec.json.encode(body))
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # fail fast: see "Failures" above
                error = f"connect failed: {type(e).__name__}: {e}"
                return self._fail(f"{error} (after {attempt + 1} attempts)" if attempt else error), True
            except httpx.TimeoutException as e:
                error = f"timed out after {self.timeout_s}s: {type(e).__name__}"
            except httpx.TransportError as e:  # reset, protocol error: worth another try
                error = f"transport error: {type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return self._parse(r), False
                error = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code == 400 and self.structured == "auto" and "response_format" in body \
                        and any(w in r.text for w in ("response_format", "json_schema")):
                    logger.warning("%s rejects response_format; sending no schema from now on: %s",
                                   self.url, r.text[:200])
                    self.structured = "none"
                    body = self.body(req)
                    continue  # not a retry: the same request without the parameter
                if r.status_code != 429 and r.status_code < 500:
                    return self._fail(error), False
                wait = _retry_after(r.headers.get("retry-after"))
            if attempt >= self.retries:
                return self._fail(f"{error} (after {attempt + 1} attempts)"), False
            backoff = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(max(backoff, wait), self.timeout_s))
            attempt += 1

    def _parse(self, r: httpx.Response) -> Completion:
        try:
            data = msgspec.json.decode(r.content)
            choice = data["choices"][0]
            text = choice["message"].get("content") if self.mode == "chat" else choice["text"]
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
            return self._fail(f"malformed response ({type(e).__name__}: {e}): {r.text[:200]}")
        return Completion(text or "", _usage(data.get("usage"), data.get("timings")),
                          str(data.get("model") or self.model), choice.get("finish_reason") or "stop")


def _int(x: Any) -> int:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else 0


def _usage(usage: Any, timings: Any) -> Usage:
    """Map OpenAI usage (vLLM: `prompt_tokens_details.cached_tokens`, reported when the server
    runs with `--enable-prompt-tokens-details`; llama.cpp: `timings.cache_n`) to ponder's."""
    u = usage if isinstance(usage, dict) else {}
    prompt = _int(u.get("prompt_tokens"))
    details = u.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    if not cached and isinstance(timings, dict):
        cached = _int(timings.get("cache_n"))
    return Usage(prompt, min(cached, prompt), _int(u.get("completion_tokens")))


def _retry_after(value: str | None) -> float:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date); 0 if none."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0

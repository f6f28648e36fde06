"""OpenAI-compatible engine: vLLM, llama.cpp, SGLang, our own `serve-model`, or OpenAI itself.

What each server supports (structured output, cached-token reporting, how many requests it
runs at once, streaming) is its profile (inference/servers.py), chosen by `server=` or
discovered at start from `GET /v1/models`, which also checks that the tier's model is served:
a tier naming a model the server does not serve fails at start with a message naming it.

One HTTP call per request, sent concurrently up to `max_concurrency` (or the profile's
`max_requests`: llama-cpp-python runs one request at a time, and requests queued inside it
would only time out there). The prompt is laid out so its bytes for one key stay a prefix of
the next call's until the key's context compacts, which is what automatic prefix caching
(vLLM, llama.cpp's context reuse) needs to hit:

* chat: a system message with the pipeline's header (instructions + schema, the same for every
  key and call), then one user message with the key's data block and the tail (see DATA_MARKER);
* completions: `prefix + tail` as the raw prompt.

The session (the stream key) goes in the profile's `session_fields` (`user` by default).

Images. A request's images (its event's camera frames, ponder/images.py) go in chat mode as
OpenAI content parts of the user message: `[{"type": "text", "text": <data block>},
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}, ..., {"type": "text",
"text": <tail>}]` (the images where JaxEngine puts them too), which vLLM
and llama.cpp's server accept for vision models; the system message, and every request without
images, is as above. The completions API has no place for them: such a request fails, unsent,
saying so, rather than reach the model without the images it was built around.

Samples. A request with `n` > 1 (a vote) is sent as one body with `n`, its `temperature` and
`seed` where the profile says the server answers `n` (the server then prefills the prompt once,
and usage counts it once); its choices are collected by `index`. Elsewhere it is sent as n
requests at once, sample i with `seed + i`, and their usage is summed as each was reported.
`Completion.samples` holds every choice's text, in order.

Deadlines. `timeout_s` is one deadline for a request, all its attempts together, counted from
`generate`. Answers are streamed where the profile allows, so a request that waits in a queue
is told apart from one that is generating (`stall_s`, if set, bounds the silence between
events once the first has arrived), and a request given up on is cancelled by closing its
stream before anything is retried: the server stops generating at its next token. A request
that cannot be cancelled (not streamed) and timed out is never retried, since it may still be
running.

Failures. A transient failure (429, 5xx, a reset connection, a stalled stream) is retried up
to `retries` times with exponential backoff and jitter, waiting at least what `Retry-After`
asks, while the deadline allows. A rejected request (any other 4xx, or a 500 whose body is a
request-validation error, which is how llama-cpp-python answers an unknown `response_format`)
is not retried as sent: if the server names the structured-output fields, the next structured
mode is tried (json_schema → json_object + schema → none) and kept for later requests;
otherwise the request fails. A failure to connect is not retried either: a backend that is
down stays down for longer than a backoff, and the router's breaker decides when to try again.
A request that still fails yields a Completion with `error` set, so one bad request does not
fail its batch; but when *no* request of a batch could even connect, `generate` raises
EngineError.

Timings. A completion says where its request's time went (`Completion.timings`), from the
start of `generate`: `queue` (waiting for one of the client's concurrent requests, and on
first use the discovery; `retries` before it: the failed attempts and their backoff), then,
streamed, `first token` (sent until the first event: the server's queue and prefill, and the
network) and `decode` (until the last event), or, answered whole, `response`.

Usage. Every attempt's tokens count: prompt tokens once the server has started on it, the
completion tokens it streamed. Cached prompt tokens come from `usage` where the server reports
them; where it does not, they are estimated from the prefix this client last sent for the same
session (or, for a server with one context, to the server at all), and `Usage.estimated` says
so. A stream that ends without usage counts completion tokens by streamed chunks and prompt
tokens by the profile's tokenize endpoint, or by a characters-per-token ratio learnt from
earlier reports.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

import httpx
import msgspec

from ponder.inference.engine import Completion, EngineError, Request, answer_token_bound
from ponder.inference.servers import (
    FALLBACK,
    ServerProfile,
    ServerNotReady,
    discover,
    profile_named,
    rejection,
    structured_fields,
)
from ponder.types import Usage

__all__ = ["OpenAIEngine", "DATA_MARKER", "common_prefix"]

logger = logging.getLogger(__name__)

# Where context.render's untrusted data starts: before it is the pipeline's header (the system
# message); the newline between them is dropped, so system + "\n" + user == the prompt.
DATA_MARKER = "\n<data key="
_MODES = ("chat", "completions")
_STRUCTURED = ("auto", "json_schema", "json_object", "structured_outputs", "guided_json", "vllm", "none")
_REDISCOVER_S = 5.0  # between discovery attempts while the server cannot be reached
_DISCOVER_S = 10.0  # the longest a discovery may take
_SENT_KEYS = 4096  # sessions whose last prompt is remembered for cache estimates (bounded memory)


@dataclass
class _Attempt:
    """What one HTTP attempt came to."""

    texts: list[str] = field(default_factory=list)  # each choice's text, by its index
    finish: str = "stop"  # choice 0's
    model: str = ""
    status: int = 0  # HTTP status; 0 when none arrived
    body: str = ""  # a failed response's text
    error: str = ""  # set when the attempt failed
    started: bool = False  # the server began on it: its prompt is paid for
    chunks: int = 0  # streamed content events (one per token on the servers we know)
    first: float = 0.0  # when the first streamed event arrived (loop clock); 0 when none did
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    unreachable: bool = False
    running: bool = False  # timed out with no way to cancel: the server may still be generating
    out_of_time: bool = False
    retry_after: str | None = None


class OpenAIEngine:
    """Engine over an OpenAI-compatible HTTP server (`base_url` like `http://host:8000/v1`)."""

    name = "openai"

    def __init__(self, base_url: str, model: str = "", *, api_key: str | None = None, mode: str = "chat",
                 server: str | ServerProfile = "auto", max_concurrency: int = 8, timeout_s: float = 30.0,
                 stall_s: float | None = None, retries: int = 3, backoff_s: float = 0.2,
                 structured: str = "auto", temperature: float = 0.0, seed: int | None = None,
                 extra_body: dict[str, Any] | None = None, session_fields: Sequence[str] | None = None,
                 cache_salt: str | None = None, tier: str = "",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if mode not in _MODES or structured not in _STRUCTURED:
            msg = f"OpenAIEngine: mode must be one of {_MODES} and structured one of {_STRUCTURED}"
            raise ValueError(msg)
        if max_concurrency < 1 or retries < 0 or timeout_s <= 0 or (stall_s is not None and stall_s <= 0):
            raise ValueError("OpenAIEngine: max_concurrency >= 1, retries >= 0, timeout_s > 0, stall_s > 0")
        base = base_url.rstrip("/")
        if urlsplit(base).path in ("", "/"):
            base += "/v1"  # `http://host:8000` means the usual OpenAI root
        self.base_url, self.model, self.mode = base, model, mode
        self.url = base + ("/chat/completions" if mode == "chat" else "/completions")
        self.label = f"tier {tier!r} ({base})" if tier else base
        self.api_key = api_key  # explicit only: never send an ambient key to an arbitrary URL
        self.max_concurrency, self.timeout_s, self.stall_s = max_concurrency, timeout_s, stall_s
        self.retries, self.backoff_s = retries, backoff_s
        self.temperature, self.seed, self.cache_salt = temperature, seed, cache_salt
        self.extra_body = dict(extra_body or {})
        self._server = server if isinstance(server, ServerProfile) else (
            server if server == "auto" else profile_named(server))
        self._structured_override = {"auto": None, "vllm": "structured_outputs"}.get(structured, structured)
        self._session_override = tuple(session_fields) if session_fields is not None else None
        self._apply(self._server if isinstance(self._server, ServerProfile) else profile_named("openai"))
        self._discovered = False
        self._not_served = ""  # set when the server does not serve the tier's model
        self._rediscover_at = 0.0
        self._discovery_lock: asyncio.Lock | None = None
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._sem = asyncio.Semaphore(self.concurrency)  # remade by start(): one per event loop
        self._sent: OrderedDict[str, str] = OrderedDict()  # scope -> last prompt sent
        self._chars_per_token = 4.0  # learnt from reported usage; for estimates only
        self._warned_cached = False

    def _apply(self, profile: ServerProfile) -> None:
        self.profile = profile
        mode = profile.structured if self.mode == "chat" else profile.structured_completions
        self.structured = self._structured_override or mode
        self.session_fields = self._session_override if self._session_override is not None \
            else profile.session_fields
        # the server's own limit when it has one (llama.cpp: one request at a time)
        self.concurrency = min(self.max_concurrency, profile.max_requests or self.max_concurrency)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client and discover the server. A model the server does not serve raises
        EngineError (here, or from `generate` when the server could not be reached at start,
        and from every `generate` after); a server not reachable yet is asked again on use."""
        if self._client is None:
            headers = {"content-type": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.AsyncClient(
                headers=headers, transport=self._transport,
                # a dead host should fail fast; reads are bounded by the request's deadline
                timeout=httpx.Timeout(None, connect=min(self.timeout_s, 5.0)),
                limits=httpx.Limits(max_connections=self.max_concurrency + 2,
                                    max_keepalive_connections=self.max_concurrency))
            self._discovery_lock = asyncio.Lock()
            known = self._discovered or not isinstance(self._server, str)  # a named or given profile
            self._sem = asyncio.Semaphore(self.concurrency if known else 1)
            await self._discover(_DISCOVER_S)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _discover(self, within: float) -> None:
        """Ask the server what it is. Until that succeeds, requests go one at a time: a
        server that turns out to run one request would end the others' streams early."""
        assert self._client is not None and self._discovery_lock is not None
        async with self._discovery_lock:
            if self._not_served:
                raise EngineError(self._not_served)
            if self._discovered or within <= 0:
                return
            try:
                found = await asyncio.wait_for(discover(self._client, self.base_url, self._server), within)
            except (httpx.TransportError, asyncio.TimeoutError, ServerNotReady) as e:
                # not again for a while: an outage must not add a probe to every batch
                self._rediscover_at = time.monotonic() + _REDISCOVER_S
                logger.warning("%s: cannot reach the server yet (%s): its model is checked on first use",
                               self.label, type(e).__name__)
                return
            if found.models is not None:
                if not self.model and len(found.models) == 1:
                    self.model = found.models[0]
                elif self.model not in found.models:
                    served = ", ".join(found.models) or "nothing"
                    # kept: every later batch fails the same way rather than guessing
                    self._not_served = (f"{self.label}: model {self.model!r} is not served there (it serves: "
                                        f"{served}); set the tier's model= to one of those")
                    raise EngineError(self._not_served)
            self._discovered = True
            self._apply(found.profile)
            self._sem = asyncio.Semaphore(self.concurrency)  # holders of the old one release it
            logger.info("%s: server profile %s, structured %s, %d request(s) at once",
                        self.label, self.profile.name, self.structured, self.concurrency)

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s  # discovery on first use comes out of it too
        if self._client is None:
            await self.start()
        elif self._not_served or (not self._discovered and time.monotonic() >= self._rediscover_at):
            await self._discover(min(_DISCOVER_S, (deadline - loop.time()) / 2))
        results = await asyncio.gather(*(self._one(r, deadline) for r in requests))
        if results and all(unreachable for _, unreachable in results):
            msg = f"{self.name} backend unreachable at {self.base_url}: {results[0][0].error}"
            raise EngineError(msg)
        return [c for c, _ in results]

    # -- the body ---------------------------------------------------------------------------

    def body(self, req: Request) -> dict[str, Any]:
        """The JSON body sent for `req` (public so tests and tools can inspect the layout)."""
        p = self.profile
        max_tokens = req.max_tokens or p.max_tokens or answer_token_bound(req.schema)
        temperature = self.temperature if req.temperature is None else req.temperature
        seed = self.seed if req.seed is None else req.seed
        b: dict[str, Any] = {"model": self.model or "default", "max_tokens": max_tokens,
                             "temperature": temperature}
        if req.n > 1:
            b["n"] = req.n
        if temperature == 0.0:
            b.update(p.greedy)
        if seed is not None:
            b["seed"] = seed
        for f in self.session_fields:
            b[f] = req.session
        # the tenant's salt from the egress (inference/egress.py), else the tier's own
        if p.cache_salt and (req.salt or self.cache_salt):
            b["cache_salt"] = req.salt or self.cache_salt
        if self.mode == "chat":
            i = req.prefix.find(DATA_MARKER)
            if i < 0:
                b["messages"] = [{"role": "user", "content": _content(req.prefix, req)}]
            else:
                b["messages"] = [{"role": "system", "content": req.prefix[:i]},
                                 {"role": "user", "content": _content(req.prefix[i + 1 :], req)}]
        else:
            b["prompt"] = req.prefix + req.tail
        b.update(structured_fields(self.structured, req.schema, p.number_bounds))
        if p.stream:
            b["stream"] = True
            if p.stream_usage:
                b["stream_options"] = {"include_usage": True}
        b.update(p.extra_body)
        b.update(self.extra_body)
        return b

    def _fail(self, error: str, usage: Usage) -> Completion:
        return Completion("", usage, self.model, finish_reason="error", error=error[:500],
                          enforced=self.structured != "none")

    # -- one request ------------------------------------------------------------------------

    async def _one(self, req: Request, deadline: float) -> tuple[Completion, bool]:
        """(completion, unreachable): unreachable means the last attempt could not connect."""
        if req.images and self.mode != "chat":
            return self._fail(f"{self.label}: a request with images needs mode='chat' (the completions API "
                              f"takes no images); not sent", Usage()), False
        if req.n > 1 and not self.profile.n:
            return await self._samples_apart(req, deadline)
        loop = asyncio.get_running_loop()
        started = deadline - self.timeout_s  # when `generate` began
        total = Usage()
        attempt = 0
        while True:
            body, mode = self.body(req), self.structured
            queued = loop.time()
            async with self._sem:
                sent = loop.time()
                a = await self._attempt(body, deadline)
                done = loop.time()
                usage = await self._usage(req, a, deadline)
            total = total + usage
            if not a.error and a.status == 200:
                samples = tuple(a.texts) if req.n > 1 else ()
                timings = {"retries": queued - started} if attempt else {}
                timings["queue"] = sent - (queued if attempt else started)
                if a.first:
                    timings.update({"first token": a.first - sent, "decode": done - a.first})
                else:
                    timings["response"] = done - sent
                return Completion(a.texts[0], total, a.model or self.model, a.finish,
                                  enforced=body_enforced(body), samples=samples, timings=timings), False
            error = a.error or f"HTTP {a.status}: {a.body[:300]}"
            if a.unreachable:
                error = f"{error} (after {attempt + 1} attempts)" if attempt else error
                return self._fail(error, total), True
            if a.status and a.status != 200:
                why = rejection(a.status, a.body, mode)
                if why == "structured" and self._structured_override is None and mode != "none":
                    if self.structured == mode:  # else a concurrent request has moved on already
                        self.structured = FALLBACK[mode]
                        logger.warning("%s rejects structured output as %s; using %s from now on: %s",
                                       self.label, mode, self.structured, a.body[:200])
                    continue  # not a retry: the same request in a form the server accepts
                if why is not None:
                    return self._fail(error, total), False
            if a.running or a.out_of_time or attempt >= self.retries:
                note = ("timed out and could not be cancelled, so not retried" if a.running else
                        f"deadline of {self.timeout_s}s reached" if a.out_of_time else
                        f"after {attempt + 1} attempts")
                return self._fail(f"{error} ({note})", total), False
            backoff = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
            wait = max(backoff, _retry_after(a.retry_after))
            if wait >= deadline - loop.time():  # asked to wait past the deadline: fail now
                return self._fail(f"{error} (no time left for a retry within {self.timeout_s}s)", total), False
            await asyncio.sleep(wait)
            attempt += 1

    async def _samples_apart(self, req: Request, deadline: float) -> tuple[Completion, bool]:
        """A request with n > 1 for a server that does not answer `n`: n requests at once,
        sample i seeded `seed + i` (each its own prompt, as the server reports it)."""
        seed = self.seed if req.seed is None else req.seed
        parts = await asyncio.gather(*(
            self._one(msgspec.structs.replace(req, n=1, seed=None if seed is None else seed + i), deadline)
            for i in range(req.n)))
        usage = sum((c.usage for c, _ in parts), Usage())
        bad = next(((i, c) for i, (c, _) in enumerate(parts) if c.error), None)
        if bad is not None:
            return self._fail(f"sample {bad[0]}: {bad[1].error}", usage), all(u for _, u in parts)
        first = parts[0][0]
        return msgspec.structs.replace(first, usage=usage, samples=tuple(c.text for c, _ in parts)), False

    async def _attempt(self, body: dict[str, Any], deadline: float) -> _Attempt:
        assert self._client is not None
        loop = asyncio.get_running_loop()
        a = _Attempt()
        if deadline - loop.time() <= 0:
            a.error, a.out_of_time = f"deadline of {self.timeout_s}s reached before sending", True
            return a
        content = msgspec.json.encode(body)
        stream = bool(body.get("stream"))
        try:
            async with asyncio.timeout_at(deadline) as clock:
                if not stream:
                    r = await self._client.post(self.url, content=content)
                    a.status, a.retry_after = r.status_code, r.headers.get("retry-after")
                    if r.status_code == 200:
                        a.started = True
                        self._read_whole(r, a, body.get("n", 1))
                    else:
                        a.body = r.text
                    return a
                async with self._client.stream("POST", self.url, content=content) as r:
                    a.status, a.retry_after = r.status_code, r.headers.get("retry-after")
                    if r.status_code != 200:
                        a.body = (await r.aread()).decode("utf-8", "replace")
                        return a
                    if "text/event-stream" not in r.headers.get("content-type", ""):
                        await r.aread()  # a server that ignores `stream` answers whole
                        a.started = True
                        self._read_whole(r, a, body.get("n", 1))
                        return a
                    await self._read_stream(r, a, clock, body.get("n", 1))
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            a.error, a.unreachable = f"connect failed: {type(e).__name__}: {e}", True
        except TimeoutError:
            # leaving the `async with` closed the stream: the server stops at its next token
            a.out_of_time = loop.time() >= deadline - 1e-3
            a.running = not stream
            a.started = a.started or not stream  # a posted body is being worked on: its prompt counts
            a.error = (f"timed out after {self.timeout_s}s" if a.out_of_time else
                       f"stream stalled for {self.stall_s}s")
        except httpx.TransportError as e:  # reset, protocol error: worth another try
            a.error = f"transport error: {type(e).__name__}: {e}"
        return a

    def _read_whole(self, r: httpx.Response, a: _Attempt, n: int) -> None:
        texts: dict[int, str] = {}
        try:
            data = msgspec.json.decode(r.content)
            for choice in data["choices"]:
                text = choice["message"].get("content") if self.mode == "chat" else choice["text"]
                if not isinstance(text, (str, type(None))):
                    raise TypeError(f"content is a {type(text).__name__}, not a string")
                i = _index(choice, n)
                texts[i] = text or ""
                if i == 0:
                    a.finish = choice.get("finish_reason") or "stop"
            if len(texts) < n:
                raise IndexError(f"{len(texts)} choices for n={n}")
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
            a.error = f"malformed response ({type(e).__name__}: {e}): {r.text[:200]}"
            return
        a.texts = [texts[i] for i in range(n)]
        a.model, a.usage, a.timings = str(data.get("model") or ""), data.get("usage"), data.get("timings")

    async def _read_stream(self, r: httpx.Response, a: _Attempt, clock: asyncio.Timeout, n: int) -> None:
        """Server-sent events: `data: {chunk}` lines until `data: [DONE]` (comments and pings
        skipped), each choice's pieces gathered by its `index`. The first event means the
        server is working on the request."""
        loop = asyncio.get_running_loop()
        deadline = clock.when()
        parts: list[list[str]] = [[] for _ in range(n)]
        finished: set[int] = set()
        async for line in r.aiter_lines():
            if line.startswith("error:"):  # llama.cpp's C++ server reports a failure so
                a.error = f"server error in stream: {line[6:].strip()[:300]}"
                return
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if not data:
                continue
            if data == "[DONE]":
                break
            a.started = True
            a.first = a.first or loop.time()
            if self.stall_s is not None and deadline is not None:
                clock.reschedule(min(deadline, loop.time() + self.stall_s))
            try:
                chunk = msgspec.json.decode(data)
            except msgspec.DecodeError:
                a.error = f"malformed stream event: {data[:200]}"
                return
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):  # a failure after the 200 went out
                err = chunk["error"]
                a.error = f"server error in stream: {err.get('message') if isinstance(err, dict) else err}"[:400]
                return
            a.model = str(chunk.get("model") or a.model)
            if isinstance(chunk.get("usage"), dict):
                a.usage = chunk["usage"]
            if isinstance(chunk.get("timings"), dict):
                a.timings = chunk["timings"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                try:
                    i = _index(choice, n)
                except IndexError as e:
                    a.error = f"malformed stream event ({e}): {data[:200]}"
                    return
                delta = choice.get("delta")
                piece = (delta.get("content") if isinstance(delta, dict) else None) if self.mode == "chat" \
                    else choice.get("text")
                if isinstance(piece, str) and piece:
                    parts[i].append(piece)
                    a.chunks += 1
                if choice.get("finish_reason"):
                    finished.add(i)
                    if i == 0:
                        a.finish = str(choice["finish_reason"])
        a.texts = ["".join(p) for p in parts]
        if len(finished) < n:
            # cut off: a stream ended early (llama-cpp-python ends a running stream when
            # another request arrives), a proxy closed it: worth another try
            a.error = "stream ended without a finish reason" if a.started else "stream ended without an event"

    # -- usage ------------------------------------------------------------------------------

    async def _usage(self, req: Request, a: _Attempt, deadline: float) -> Usage:
        """This attempt's usage: the server's report where it made one, else an estimate."""
        if not a.started:
            return Usage()
        prompt_text = req.prefix + req.tail
        u = a.usage if isinstance(a.usage, dict) else {}
        prompt, completion = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        estimated = False
        if prompt:
            self._chars_per_token = 0.9 * self._chars_per_token + 0.1 * len(prompt_text) / prompt
        else:
            prompt, estimated = await self._count(prompt_text, a, deadline), True
        if not completion and a.chunks:
            completion, estimated = a.chunks, True
        cached, reported = _cached(u, a.timings)
        if not reported and self.profile.cached_tokens and not self._warned_cached:
            self._warned_cached = True
            logger.warning("%s reports no cached prompt tokens (vLLM: --enable-prompt-tokens-details); "
                           "estimating them", self.label)
        if not reported:
            cached, estimated = self._estimate_cached(req, prompt_text, prompt), True
        self._remember(req, prompt_text)
        return Usage(prompt, min(cached, prompt), completion, estimated=estimated)

    async def _count(self, text: str, a: _Attempt, deadline: float) -> int:
        """Prompt tokens of a stream that reported none: the server's tokenizer if the profile
        names its endpoint (and the attempt succeeded, so the server is free) and the deadline
        leaves time, else chars/ratio."""
        path = self.profile.tokenize_path
        left = min(5.0, deadline - asyncio.get_running_loop().time())
        if path and not a.error and self._client is not None and left > 0:
            root = self.base_url.removesuffix("/v1")
            try:
                r = await asyncio.wait_for(self._client.post(
                    root + path, content=msgspec.json.encode({"input": text, "model": self.model})), left)
                n = _int(r.json().get("count")) if r.status_code == 200 else 0
                if n:
                    return n
            except (httpx.HTTPError, asyncio.TimeoutError, ValueError, AttributeError):
                pass
        return max(1, round(len(text) / self._chars_per_token))

    def _scope(self, req: Request) -> str:
        return "" if self.profile.cache_scope == "server" else req.session

    def _estimate_cached(self, req: Request, text: str, prompt_tokens: int) -> int:
        last = self._sent.get(self._scope(req))
        if not last or not text:
            return 0
        return int(prompt_tokens * common_prefix(text, last) / len(text))

    def _remember(self, req: Request, text: str) -> None:
        scope = self._scope(req)
        self._sent[scope] = text
        self._sent.move_to_end(scope)
        if len(self._sent) > _SENT_KEYS:
            self._sent.popitem(last=False)


def _content(head: str, req: Request) -> str | list[dict[str, Any]]:
    """A user message's content: its head (the key's data block) and the request's tail, with
    the request's images as parts between them, where the in-process engine puts them too: an
    unchanged frame after an unchanged head is then a prefix a server's cache already holds."""
    if not req.images:
        return head + req.tail
    parts = [{"type": "text", "text": head}] if head else []
    parts += [{"type": "image_url", "image_url": {"url": img.data_url()}} for img in req.images]
    return parts + ([{"type": "text", "text": req.tail}] if req.tail else [])


def body_enforced(body: dict[str, Any]) -> bool:
    """Whether a body asked the server to constrain the answer to the schema."""
    return any(k in body for k in ("response_format", "structured_outputs", "guided_json"))


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix, by halving (string slices compare in C)."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _index(choice: dict[str, Any], n: int) -> int:
    """A choice's `index` (0 when a server leaves it out); IndexError outside 0..n-1."""
    i = choice.get("index") or 0
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise IndexError(f"choice index {i!r} for n={n}")
    return i


def _int(x: Any) -> int:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else 0


def _cached(usage: dict[str, Any], timings: Any) -> tuple[int, bool]:
    """(cached prompt tokens, whether the server reported them at all): vLLM
    `prompt_tokens_details.cached_tokens` (with `--enable-prompt-tokens-details`), llama.cpp's
    C++ server `timings.cache_n`."""
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and "cached_tokens" in details:
        return _int(details.get("cached_tokens")), True
    if isinstance(timings, dict) and "cache_n" in timings:
        return _int(timings.get("cache_n")), True
    return 0, False


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

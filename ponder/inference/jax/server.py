"""`ponder serve-model`: a JaxEngine behind an OpenAI-compatible HTTP API (Starlette + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events in OpenAI's chunk format, ending `data: [DONE]`),
GET /metrics (Prometheus text), GET /health.

Beyond OpenAI's fields: `session` (else `user`, else `prompt_cache_key`) names the KV session, so
a client that sends its stream key there gets its prefix from cache (vLLM's `cache_salt` picks
the namespace it lives in, below); `usage` reports it as
`prompt_tokens_details.cached_tokens`. `response_format` (`json_schema`, or `json_object`)
constrains the output. `n` (1 to 16, and at most the engine's `max_batch`) asks for that many
samples of the one prompt, prefilled once: choice i is seeded `seed + i`, and `usage` counts
the prompt once and every choice's tokens. `stop` strings end the output (the stop string is
not included); `logprobs`, `tools` and penalties are not supported.

Images. On a LLaVA checkpoint a chat message's `content` may be a list of OpenAI content parts,
text and `image_url` (at most 8 images a request); each image takes the tower's `n_tokens`
prompt positions where its part appears (the message's parts are joined in order, an image
as the checkpoint's `<image>` token), and `usage.prompt_tokens` counts them. Only data URLs
(`data:image/png;base64,...`, PNG, JPEG or WebP, at most `max_image_bytes`) are accepted: the
server fetches no URL, so a request can make it reach nothing on the network. Each image goes
through the engine's per-key frame cache under the request's session (below), so a camera
client that sends the same frame again skips the vision encoder and, after the same text,
gets the image's K/V from its session; a request without a session caches nothing. A text-only
model refuses image parts (400), as it does any part it cannot read.

Bodies are decoded into the msgspec Structs of requests.py, so a malformed request (a token id
outside the model's vocabulary, NaN, a field of the wrong type) is answered 400 with OpenAI's
error JSON naming the field (`param`) before it can reach the shared batch. Any other failure
is answered 500 for its own request; neither closes the kept-alive connection.

Access and isolation. With API keys (`api_keys`, `ponder serve-model --api-key`, one or several),
every endpoint but /health needs `Authorization: Bearer KEY` (else 401 with OpenAI's error JSON;
keys are compared in constant time). Sessions live in namespaces: one per (API key, vLLM's
`cache_salt`), so the engine's session id is a keyed digest of the key, the salt and the
session name. Two namespaces naming the same session share nothing: a request reads
(`cached_tokens`), waits for, overwrites or cuts only its own namespace's sessions, and the
pool's fair share (sessions.py, Eviction) keeps one namespace from pushing out the sessions of
another that holds no more than its share of the device pages (and of host memory). A request
without a session field keeps nothing and reuses nothing; there is no prefix cache shared
between sessions. What is still shared: the batch (a busy server answers everyone later), the
pages a namespace holds beyond its share (spilled or dropped when another needs them, so their
loss tells it that others are busy) and /metrics (server-wide counts: with keys, any key reads
it). Without keys the server is open: one namespace per `cache_salt`, one for all without.

Requests are batched continuously by the engine (`JaxEngine.submit`): one that arrives while
others decode joins them at the next step (up to `max_batch` rows); an idle engine waits
`max_wait_ms` for a burst to gather. Streamed tokens flow back as they are chosen, and a stream whose client
goes away (streaming or not) leaves the batch at the next step, or before it is admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from jinja2.exceptions import TemplateError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ponder.images import Image, ImageError, parse_image

from .engine import JaxEngine
from .frames import FrameJob
from .generate import GenRequest, GenResult
from .requests import (
    MAX_IMAGES,
    MAX_SAMPLES,
    BadRequest,
    Bodies,
    Body,
    ChatBody,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    prompt_of,
)
from .sessions import SPACE_SEP

__all__ = ["Access", "ModelServer", "create_app", "serve"]

log = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
           headers: dict[str, str] | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --- access and namespaces ------------------------------------------------------------------

NO_KEY = ("no API key: this server needs `Authorization: Bearer KEY` with one of its keys "
          "(serve-model --api-key)")
BAD_KEY = "incorrect API key provided"  # never echoed: it may be someone's key with a typo


class Unauthorized(Exception):
    """A request without one of the server's keys: answered 401, `code` OpenAI's."""

    def __init__(self, message: str, code: str | None):
        super().__init__(message)
        self.code = code


class _Salt(msgspec.Struct):
    """The one field read beside a body's own: vLLM's prefix-cache namespace."""

    cache_salt: Annotated[str, msgspec.Meta(min_length=1)] | None = None


_SALT = msgspec.json.Decoder(_Salt)


def salt_of(raw: bytes) -> str:
    """A body's `cache_salt` ('' if none), or BadRequest. The body already decoded as JSON."""
    try:
        return _SALT.decode(raw).cache_salt or ""
    except msgspec.ValidationError:
        msg = "`cache_salt` must be a non-empty string if given (it names a prefix-cache namespace)"
        raise BadRequest(msg, "cache_salt") from None


class Access:
    """Who may call (the API keys) and where each request's sessions live (its namespace).

    A caller is named by the SHA-256 of its key, never the key; namespaces and session ids are
    digests keyed with a secret of this process, so none of them can be computed outside it.
    """

    def __init__(self, api_keys: Sequence[str] = ()) -> None:
        if isinstance(api_keys, str):  # one key given bare: not its characters as keys
            api_keys = [api_keys]
        api_keys = list(api_keys or ())
        for i, key in enumerate(api_keys, 1):
            if not isinstance(key, str) or not key or any(c.isspace() or not c.isprintable() for c in key):
                msg = (f"API key #{i} is empty or holds whitespace or control characters: a key is "
                       f"sent as `Authorization: Bearer KEY`")
                raise ValueError(msg)
        self.digests = [hashlib.sha256(k.encode()).digest() for k in dict.fromkeys(api_keys)]
        self.secret = os.urandom(32)

    @property
    def open(self) -> bool:
        return not self.digests

    def caller(self, authorization: str | None) -> str:
        """The caller's id ('' on an open server), or Unauthorized."""
        if self.open:
            return ""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(NO_KEY, None)
        given = hashlib.sha256(token.encode("latin-1")).digest()  # header bytes as sent
        found = None
        for d in self.digests:  # every key compared, in constant time: no early exit
            if hmac.compare_digest(given, d) and found is None:
                found = d
        if found is None:
            raise Unauthorized(BAD_KEY, "invalid_api_key")
        return found.hex()

    def _digest(self, *parts: str) -> str:
        data = json.dumps(parts).encode()  # a JSON list: no part can run into the next
        return hashlib.blake2b(data, key=self.secret, digest_size=16).hexdigest()

    def session(self, caller: str, salt: str, name: str | None) -> str | None:
        """The engine's session key for a request's session `name` (None: no session)."""
        if name is None:
            return None
        space = self._digest("space", caller, salt)
        return space + SPACE_SEP + self._digest("session", space, name)


class _Metrics:
    def __init__(self, engine: JaxEngine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ponder_model_requests", "HTTP generation requests", ["endpoint", "status"], registry=r)
        self.prompt = Counter("ponder_model_prompt_tokens", "prompt tokens", registry=r)
        self.cached = Counter("ponder_model_cached_prompt_tokens", "prompt tokens served from a session", registry=r)
        self.completion = Counter("ponder_model_completion_tokens", "generated tokens", registry=r)
        self.batch = Histogram("ponder_model_batch_size", "requests that joined the batch together",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.latency = Histogram("ponder_model_request_seconds", "from submit to the last token",
                                 registry=r)
        r.register(_PoolCollector(engine))
        # the same counts under vLLM's names (its v1 engine's), so one dashboard or alert serves
        # both servers; labelled by model_name as vLLM's are
        self.model = engine.model
        model, label = [engine.model], ["model_name"]
        self.vllm_prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed", label, registry=r).labels(*model)
        self.vllm_generation = Counter("vllm:generation_tokens", "Generation tokens processed", label,
                                       registry=r).labels(*model)
        self.vllm_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                    label, registry=r).labels(*model)
        self.vllm_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", label,
                                 registry=r).labels(*model)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", label,
                                  registry=r).labels(*model)
        self.vllm_success = Counter("vllm:request_success", "Finished requests by finish reason",
                                    [*label, "finished_reason"], registry=r)
        r.register(_QueueCollector(engine))

    def on_done(self, res: GenResult, seconds: float) -> None:
        generated = sum(len(s.tokens) for s in res.samples or [res])
        self.latency.observe(seconds)
        self.prompt.inc(res.prompt_tokens)
        self.cached.inc(res.cached_tokens)
        self.completion.inc(generated)
        self.vllm_e2e.observe(seconds)
        self.vllm_prompt.inc(res.prompt_tokens)
        self.vllm_generation.inc(generated)
        self.vllm_queries.inc(res.prompt_tokens)
        self.vllm_hits.inc(res.cached_tokens)
        self.vllm_success.labels(self.model, res.finish_reason).inc()


class _QueueCollector:
    """vLLM's scheduler gauges: requests in the running batch and those waiting to join it."""

    def __init__(self, engine: JaxEngine):
        self.engine = engine

    def collect(self):
        feed, model = self.engine.feed, self.engine.model
        waiting = len(feed.inbox)
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch",
                                    labels=["model_name"])
        running.add_metric([model], max(0, len(feed.futures) - waiting))
        yield running
        queued = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to join the batch",
                                   labels=["model_name"])
        queued.add_metric([model], waiting)
        yield queued


class _PoolCollector:
    def __init__(self, engine: JaxEngine):
        self.engine = engine

    def collect(self):
        gen = self.engine.generator
        if gen is None:
            return
        yield GaugeMetricFamily("ponder_model_compiles", "traces of the jitted functions", value=gen.compiles)
        usage, stats = gen.pool.usage(), gen.pool.stats
        sessions = GaugeMetricFamily("ponder_model_sessions", "KV sessions", labels=["where"])
        sessions.add_metric(["device"], usage["device_sessions"])
        sessions.add_metric(["host"], usage["host_sessions"])
        yield sessions
        used = GaugeMetricFamily("ponder_model_session_bytes", "bytes held by KV sessions", labels=["where"])
        used.add_metric(["device"], usage["device_bytes"])
        used.add_metric(["host"], usage["host_bytes"])
        yield used
        moves = GaugeMetricFamily("ponder_model_session_moves", "sessions spilled, restored, dropped",
                                  labels=["kind"])
        for kind in ("spilled", "restored", "dropped"):
            moves.add_metric([kind], stats[kind])
        yield moves
        if self.engine.cfg.vision is not None:
            fs = self.engine.frames.stats
            frames = GaugeMetricFamily("ponder_model_frames", "images by how their features were found",
                                       labels=["kind"])
            for kind, value in (("encoded", fs.frames_encoded), ("hit", fs.hits), ("near", fs.near_hits)):
                frames.add_metric([kind], value)
            yield frames
            yield GaugeMetricFamily("ponder_model_vision_encoder_calls", "vision tower calls", value=fs.encoder_calls)
            yield GaugeMetricFamily("ponder_model_frame_cache_bytes", "features held by the frame cache",
                                    value=self.engine.frames.bytes)


# --- request parsing ------------------------------------------------------------------------


DEFAULT_IMAGE_BYTES = 4 << 20


def _chat_prompt(engine: JaxEngine, body: ChatBody, session: str | None,
                 max_image_bytes: int) -> tuple[list[int], FrameJob | None]:
    """A chat body's prompt ids and its images (see Images above), or BadRequest."""
    parts = [(i, j, p) for i, m in enumerate(body.messages) if not isinstance(m.content, str)
             for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
    if parts and engine.cfg.vision is None:
        i, j, _ = parts[0]
        msg = (f"`messages[{i}].content[{j}]` is an image, but this model ({engine.model}) has no vision "
               f"tower: send text only")
        raise BadRequest(msg, "messages")
    if len(parts) > MAX_IMAGES:
        raise BadRequest(f"`messages` holds {len(parts)} images; a request may hold at most {MAX_IMAGES}", "messages")
    images: list[Image] = []
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if not isinstance(content, str):
            pieces = []
            for j, part in enumerate(content):
                if not isinstance(part, ImagePart):
                    pieces.append(part.text)
                    continue
                where, url = f"messages[{i}].content[{j}]", part.image_url.url
                if not url.startswith("data:"):
                    msg = (f"`{where}.image_url.url` must be a data URL (data:image/png;base64,...): this server "
                           f"fetches no URLs")
                    raise BadRequest(msg, "messages")
                try:  # `where` is also the image's field: a key's frames are compared per field
                    images.append(parse_image(url, field=where, allowed_dirs=(), max_bytes=max_image_bytes))
                except ImageError as e:
                    raise BadRequest(str(e), "messages") from None
                pieces.append(engine.image_text)
            content = "".join(pieces)
        messages.append({"role": m.role, "content": content})
    try:
        ids = engine.encode_chat(messages)
    except TemplateError as e:  # the template's raise_exception: e.g. roles out of order
        raise BadRequest(f"the chat template refused these `messages`: {e}", "messages") from e
    if engine.cfg.vision is None:
        return ids, None
    try:
        prompt, frames = engine.place_images(ids, session, images)
    except ValueError as e:
        raise BadRequest(f"`messages`: {e}", "messages") from None
    return prompt, frames if images else None


class _Call:
    """One generation request, parsed and checked (BadRequest if it cannot run)."""

    def __init__(self, engine: JaxEngine, body: Body, chat: bool, session: str | None,
                 max_image_bytes: int = DEFAULT_IMAGE_BYTES):
        gen = engine.generator
        self.n = body.n or 1
        if self.n > MAX_SAMPLES:
            raise BadRequest(f"`n` is {self.n}: a request may ask for n=1 to {MAX_SAMPLES} samples", "n")
        if self.n > gen.max_batch:  # a request's samples decode side by side
            raise BadRequest(f"`n` is {self.n}: this server decodes at most {gen.max_batch} rows together "
                             f"(max_batch), so a request may ask for n=1 to {gen.max_batch} samples", "n")
        self.frames = None
        if chat:
            prompt, self.frames = _chat_prompt(engine, body, session, max_image_bytes)  # type: ignore[arg-type]
        else:
            p = prompt_of(body)
            prompt = engine.encode_text(p) if isinstance(p, str) else p
        field = "messages" if chat else "prompt"
        if not prompt:
            raise BadRequest(f"`{field}` gives an empty prompt (no tokens)", field)
        left = gen.max_seq_len - len(prompt)
        if left < 1:
            raise BadRequest(f"the prompt (`{field}`) has {len(prompt)} tokens; this model's context is "
                             f"{gen.max_seq_len}", field, "context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or (left if chat else 16)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        constraint = None
        if isinstance(body.response_format, JsonObjectFormat):
            constraint = self._constraint(engine, {"type": "object"})
        elif isinstance(body.response_format, JsonSchemaFormat):
            constraint = self._constraint(engine, body.response_format.json_schema.schema)
        self.chat, self.stream, self.stop = chat, bool(body.stream), [s for s in stop if s]
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.req = GenRequest(
            session=session, prompt=prompt, max_tokens=min(max_tokens, left),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, constraint=constraint,
            n=self.n)

    @staticmethod
    def _constraint(engine: JaxEngine, schema: dict):
        try:
            return engine.constraint(schema)
        except ValueError as e:
            raise BadRequest(str(e), "response_format") from e


def _cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def _usage(res: GenResult) -> dict[str, Any]:
    """The prompt once (every sample continued the one prefill), every sample's tokens."""
    completion = sum(len(s.tokens) for s in res.samples or [res])
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": completion,
            "total_tokens": res.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


def _choice(chat: bool, i: int, text: str, finish: str) -> dict[str, Any]:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}


# --- the app ----------------------------------------------------------------------------------


def create_app(engine: JaxEngine, *, max_wait_ms: float = 5.0, api_keys: Sequence[str] = (),
               max_image_bytes: int = DEFAULT_IMAGE_BYTES) -> Starlette:
    """The ASGI app. Its lifespan starts the engine (loading the model). With `api_keys`, every
    endpoint but /health needs one of them (see Access and isolation above). `max_image_bytes`
    bounds each image part's file."""
    if isinstance(max_image_bytes, bool) or not isinstance(max_image_bytes, int) or max_image_bytes < 1:
        msg = f"max_image_bytes must be an int >= 1, got {max_image_bytes!r}"
        raise ValueError(msg)
    access = Access(api_keys)
    metrics = _Metrics(engine)
    engine.feed.max_wait_s = max_wait_ms / 1000
    engine.feed.on_admit, engine.feed.on_done = metrics.batch.observe, metrics.on_done
    created = int(time.time())

    bodies: list[Bodies] = []  # the request decoders: token ids need the loaded model's vocabulary

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        bodies[:] = [Bodies(engine.cfg.vocab_size)]
        yield
        await engine.stop()

    def refused(e: Unauthorized) -> Response:
        return _error(401, str(e), code=e.code, headers={"WWW-Authenticate": "Bearer"})

    def guarded(handler):
        async def check(request: HttpRequest):
            try:
                access.caller(request.headers.get("authorization"))
            except Unauthorized as e:
                return refused(e)
            return await handler(request)

        return check

    @guarded
    async def models(request: HttpRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model, "object": "model", "created": created, "owned_by": "ponder",
             "max_model_len": engine.generator.max_seq_len}]})

    async def health(request: HttpRequest):
        return JSONResponse({"status": "ok"})

    @guarded
    async def prometheus(request: HttpRequest):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def generate(request: HttpRequest, chat: bool):
        """Answer one request. Whatever goes wrong is answered for this request alone, as
        OpenAI's error JSON (an exception escaping to uvicorn would also drop the connection)."""
        endpoint = "chat" if chat else "completions"
        try:
            response = await _answer(request, chat)
        except Unauthorized as e:
            response = refused(e)
        except BadRequest as e:
            response = _error(400, str(e), param=e.param, code=e.code)
        except Exception as e:  # a bug shows up as this request's 500, nothing more
            log.exception("serve-model: a %s request failed", endpoint)
            response = _error(500, f"{type(e).__name__}: {e}", "server_error")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _answer(request: HttpRequest, chat: bool) -> Response:
        caller = access.caller(request.headers.get("authorization"))  # before reading the body
        raw = await request.body()
        body = bodies[0].parse(raw, chat)
        name = body.session or body.user or body.prompt_cache_key
        call = _Call(engine, body, chat, access.session(caller, salt_of(raw), name), max_image_bytes)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": engine.model}
        if call.stream:
            return StreamingResponse(_stream(call, head), media_type="text/event-stream")
        if call.stop:  # each sample stops at its own stop string
            call.req.on_token = [_stopper(engine, call.stop) for _ in range(call.n)]
        call.req.cancelled = gone = threading.Event()

        async def watch() -> None:  # a client that hangs up frees its place in the batch
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            res = await engine.submit(call.req, call.frames)
        finally:
            watcher.cancel()
        if res.error:
            return _error(500, res.error, "server_error")
        choices = []
        for i, sample in enumerate(res.samples or [res]):
            text, stopped = _cut(engine.decode(sample.tokens), call.stop)
            choices.append(_choice(chat, i, text, "stop" if stopped else sample.finish_reason))
        return JSONResponse({**head, "choices": choices, "usage": _usage(res)})

    async def _stream(call: _Call, head: dict):
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()  # (choice, token id)
        gone = threading.Event()  # the client went away: drop its rows, waiting or decoding
        call.req.cancelled = gone

        def on_token_of(i: int):
            stopper = _stopper(engine, call.stop) if call.stop else None

            def on_token(t: int) -> bool:  # on the engine's thread
                loop.call_soon_threadsafe(tokens.put_nowait, (i, t))
                return stopper(t) if stopper else False

            return on_token

        call.req.on_token = [on_token_of(i) for i in range(call.n)]
        task = asyncio.ensure_future(engine.submit(call.req, call.frames))
        task.add_done_callback(lambda _: tokens.put_nowait(None))
        head = {**head, "object": "chat.completion.chunk" if call.chat else "text_completion"}

        def chunk(i: int, delta: str | None, finish: str | None = None) -> str:
            if call.chat:
                d = {} if delta is None else {"content": delta}
                choice = {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        def error(message: str) -> str:
            body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"

        try:
            if call.chat:
                for i in range(call.n):
                    first = {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
            ids: list[list[int]] = [[] for _ in range(call.n)]
            sent = [""] * call.n
            hold = max((len(s) for s in call.stop), default=1) - 1
            while (item := await tokens.get()) is not None:
                i, t = item
                ids[i].append(t)
                text, stopped = _cut(engine.decode(ids[i]), call.stop)
                if not stopped:  # hold back what could still become a stop string or a UTF-8 char
                    text = text[: len(text) - hold] if hold else text
                    text = text.rstrip("\ufffd")
                if len(text) > len(sent[i]) and text.startswith(sent[i]):
                    yield chunk(i, text[len(sent[i]) :])
                    sent[i] = text
            res = task.result()
            if res.error:
                yield error(res.error)
                return
            for i, sample in enumerate(res.samples or [res]):
                text, stopped = _cut(engine.decode(sample.tokens), call.stop)
                if len(text) > len(sent[i]) and text.startswith(sent[i]):
                    yield chunk(i, text[len(sent[i]) :])
                yield chunk(i, None, "stop" if stopped else sample.finish_reason)
            if call.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(res)})}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # the 200 is out: a failure can only be an event now
            log.exception("serve-model: a streamed request failed")
            yield error(f"{type(e).__name__}: {e}")
        finally:  # also when the client disconnects mid-stream
            gone.set()

    async def chat(request: HttpRequest):
        return await generate(request, True)

    async def completions(request: HttpRequest):
        return await generate(request, False)

    routes = [Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]), Route("/metrics", prometheus),
              Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


def _stopper(engine: JaxEngine, stop: list[str]):
    """on_token callback (engine thread) that ends the row once a stop string appears."""
    ids: list[int] = []

    def on_token(t: int) -> bool:
        ids.append(t)
        return _cut(engine.decode(ids), stop)[1]

    return on_token


# --- running it ---------------------------------------------------------------------------------


class ModelServer:
    """uvicorn serving `create_app(engine)` on a background thread (tests, embedding).

        with ModelServer(JaxEngine(path)) as srv:
            OpenAI(base_url=srv.url, api_key="-")
    """

    def __init__(self, engine: JaxEngine, host: str = "127.0.0.1", port: int = 0, *,
                 max_wait_ms: float = 5.0, api_keys: Sequence[str] = (),
                 max_image_bytes: int = DEFAULT_IMAGE_BYTES) -> None:
        self.engine, self.host, self.port, self.max_wait_ms = engine, host, port, max_wait_ms
        self.api_keys, self.max_image_bytes = api_keys, max_image_bytes
        self._server = self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> ModelServer:
        import uvicorn

        assert self._thread is None, "Did you call `start` twice?"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        app = create_app(self.engine, max_wait_ms=self.max_wait_ms, api_keys=self.api_keys,
                         max_image_bytes=self.max_image_bytes)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="ponder-serve-model", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                msg = f"serve-model did not start within {timeout_s}s on {self.host}:{self.port}"
                raise RuntimeError(msg)
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
            self._thread = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(path: str, *, host: str = "127.0.0.1", port: int = 8000, max_wait_ms: float = 5.0,
          api_keys: Sequence[str] = (), max_image_bytes: int = DEFAULT_IMAGE_BYTES, **engine_kw: Any) -> None:
    """Serve the checkpoint at `path` until interrupted (blocking). With `api_keys`, callers
    need one of them; without, the server is open and one namespace per `cache_salt`.
    `engine_kw` go to JaxEngine (e.g. near_identical, frame_cache_bytes)."""
    import uvicorn

    engine = JaxEngine(path, **engine_kw)
    # bad keys or options: before loading
    app = create_app(engine, max_wait_ms=max_wait_ms, api_keys=api_keys, max_image_bytes=max_image_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning")

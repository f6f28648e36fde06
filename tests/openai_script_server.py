"""A scripted OpenAI-compatible HTTP server for tests: NOT ponder's edge server (`serve-model`).

It listens on loopback, records every request (path, headers, JSON body, arrival time), counts
requests in flight, and answers from a script: a list of Replies served in order (the last one
repeats) or a function of the recorded call. A request with `stream: true` gets a 200 reply as
server-sent events in OpenAI's chunk format (one content event per word, then `usage` if
`stream_options.include_usage` asked for it, then `[DONE]`), paced by `Reply.delay_s` spread
over the events when `Reply.pace` is set. `GET /v1/models` lists `models` (501 if None).
Stdlib only (http.server in a thread), so the engine under test talks real HTTP/1.1 over a real
socket.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["Reply", "Call", "ScriptedOpenAIServer", "chat_reply", "completion_reply"]


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    pace: bool = False  # streamed: spread delay_s over the events instead of before the first
    stall_after: int | None = None  # streamed: send this many events, then wait delay_s once
    cut_after: int | None = None  # streamed: send this many events, then [DONE] (no finish reason)


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes
    t: float


def chat_reply(text: str, *, prompt_tokens: int = 100, completion_tokens: int = 20,
               cached: int | None = None, model: str = "scripted-model", **extra: Any) -> Reply:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return Reply(body={"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": usage, **extra})


def completion_reply(text: str, *, prompt_tokens: int = 50, completion_tokens: int = 10,
                     cached: int | None = None, model: str = "scripted-model") -> Reply:
    r = chat_reply(text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   cached=cached, model=model)
    r.body["object"] = "text_completion"
    r.body["choices"] = [{"index": 0, "text": text, "finish_reason": "stop"}]
    return r


class ScriptedOpenAIServer:
    """`with ScriptedOpenAIServer(script) as srv:` then point an engine at `srv.url`."""

    def __init__(self, script: list[Reply] | Callable[[Call], Reply] | None = None, *,
                 models: list[dict[str, Any]] | None = None) -> None:
        self.script = script if script is not None else [chat_reply("{}")]
        self.models = models
        self.gone = 0  # streams whose client hung up before the end
        self.calls: list[Call] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._next = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ScriptedOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        return [c.body for c in self.calls]

    def _reply(self, call: Call) -> Reply:
        if callable(self.script):
            return self.script(call)
        with self._lock:
            r = self.script[min(self._next, len(self.script) - 1)]
            self._next += 1
        return r

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the engine's pool expects
            wbufsize = -1  # buffered: headers and body leave in one write, flushed per request

            def log_message(self, *args: object) -> None:
                pass

            def finish(self) -> None:
                try:
                    super().finish()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: a cancelled stream

            def do_GET(self) -> None:  # noqa: N802
                if srv.models is None or self.path != "/v1/models":
                    self._send(501 if srv.models is None else 404, "application/json", b'{"error": "no"}')
                    return
                self._send(200, "application/json", json.dumps({"object": "list", "data": srv.models}).encode())

            def _send(self, status: int, ctype: str, out: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(out)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(out)

            def _stream(self, call: Call, reply: Reply) -> None:
                body = reply.body
                chat = "message" in body["choices"][0]
                choice = body["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                words = [w for w in (text or "").split(" ")]
                pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words) if w or i < len(words) - 1]
                head = {k: body[k] for k in ("id", "created", "model") if k in body}
                head["object"] = "chat.completion.chunk" if chat else "text_completion"
                events = []
                if chat:
                    events.append({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]})
                for p in pieces:
                    delta = {"delta": {"content": p}} if chat else {"text": p}
                    events.append({**head, "choices": [{"index": 0, **delta, "finish_reason": None}]})
                end = {"delta": {}} if chat else {"text": ""}
                extra = {k: v for k, v in body.items() if k not in ("id", "object", "created", "model", "choices", "usage")}
                # fields beyond OpenAI's (llama.cpp's `timings`) ride on the last choice event
                events.append({**head, **extra, "choices": [{"index": 0, **end, "finish_reason": choice.get("finish_reason")}]})
                if (call.body.get("stream_options") or {}).get("include_usage") and "usage" in body:
                    events.append({**head, "choices": [], "usage": body["usage"]})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                step = reply.delay_s / max(len(events), 1) if reply.pace else 0.0
                sent = 0
                if reply.cut_after is not None:
                    events = events[: reply.cut_after]
                try:
                    for e in [*events, "[DONE]"]:
                        if e == "[DONE]":
                            self._done()  # before the last bytes: the client may send its next request at once
                        data = e if isinstance(e, str) else json.dumps(e)
                        chunk = f"data: {data}\n\n".encode()
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.flush()
                        sent += 1
                        if sent == reply.stall_after:
                            time.sleep(reply.delay_s)
                        if step:
                            time.sleep(step)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with srv._lock:
                        srv.gone += 1
                    raise

            def _done(self) -> None:
                if not self._finished:
                    self._finished = True
                    with srv._lock:
                        srv.inflight -= 1

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self._finished = False
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                call = Call(self.path, {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw or b"{}"), raw, time.monotonic())
                with srv._lock:
                    srv.calls.append(call)
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                try:
                    reply = srv._reply(call)
                    if reply.delay_s and not reply.pace and reply.stall_after is None:
                        time.sleep(reply.delay_s)
                    if call.body.get("stream") and reply.status == 200 and isinstance(reply.body, dict) \
                            and reply.body.get("choices"):
                        self._stream(call, reply)
                        return
                    data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                    self._send(reply.status, "application/json", data.encode(), reply.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    self._done()

        return Handler

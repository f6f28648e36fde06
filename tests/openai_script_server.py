"""A scripted OpenAI-compatible HTTP server for tests: NOT ponder's edge server (`serve-model`).

It listens on loopback, records every request (path, headers, JSON body, arrival time), counts
requests in flight, and answers from a script: a list of Replies served in order (the last one
repeats) or a function of the recorded call. Stdlib only (http.server in a thread), so the
engine under test talks real HTTP/1.1 over a real socket.
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

    def __init__(self, script: list[Reply] | Callable[[Call], Reply] | None = None) -> None:
        self.script = script if script is not None else [chat_reply("{}")]
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

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                call = Call(self.path, {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw or b"{}"), raw, time.monotonic())
                with srv._lock:
                    srv.calls.append(call)
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                try:
                    reply = srv._reply(call)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                    out = data.encode()
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(out)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with srv._lock:
                        srv.inflight -= 1

        return Handler

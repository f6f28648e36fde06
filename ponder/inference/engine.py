"""The Engine protocol: batched generation over per-key sessions.

Every tier speaks it: the reflex rules, the in-process JAX model and any OpenAI-compatible
server. A request names its `session` (the stream key) so an engine that caches per key can
reuse the key's prefix; a completion reports how much of the prompt came from that cache.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import msgspec

from ponder.types import Finding, Usage

__all__ = ["Request", "Completion", "Engine", "EngineError"]


class Request(msgspec.Struct, frozen=True):
    """One reasoning call. `prefix` is stable between the key's compactions; `tail` is new."""

    session: str
    prefix: str
    tail: str
    max_tokens: int
    actions: tuple[str, ...]
    schema: dict[str, Any]
    findings: tuple[Finding, ...] = ()
    gate_score: float = 0.0
    request_id: str = ""

    @property
    def prompt(self) -> str:
        return self.prefix + self.tail


class Completion(msgspec.Struct, frozen=True):
    """An engine's answer. `error` set means this request failed (the rest of the batch may
    not have); `text` should then be ignored."""

    text: str
    usage: Usage
    model: str
    finish_reason: str = "stop"
    error: str | None = None


class EngineError(RuntimeError):
    """A backend failed as a whole (unreachable, timed out, crashed)."""


@runtime_checkable
class Engine(Protocol):
    """Batched generation. `generate` returns one Completion per request, in order."""

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def generate(self, requests: Sequence[Request]) -> list[Completion]: ...

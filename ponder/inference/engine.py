"""The Engine protocol: batched generation over per-key sessions.

Every tier speaks it: the reflex rules, the in-process JAX model and any OpenAI-compatible
server. A request names its `session` (the stream key) so an engine that caches per key can
reuse the key's prefix; a completion reports how much of the prompt came from that cache.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import msgspec

from ponder.images import Image
from ponder.types import Finding, Usage

__all__ = ["Request", "Completion", "Engine", "EngineError", "answer_token_bound"]


class Request(msgspec.Struct, frozen=True):
    """One reasoning call. `prefix` is stable between the key's compactions; `tail` is new.
    `max_tokens` 0 means "whatever a valid answer needs": each engine derives it from `schema`
    (`answer_token_bound`) or knows better (the JAX engine closes an answer within any budget)."""

    session: str
    prefix: str
    tail: str
    max_tokens: int
    actions: tuple[str, ...]
    schema: dict[str, Any]
    findings: tuple[Finding, ...] = ()
    gate_score: float = 0.0
    request_id: str = ""
    tenant: str = ""  # whose request: a saturated tier's queue is shared fairly by tenant
    # test-time compute: `n` samples of this one prompt (a vote), each at `temperature` (None:
    # the engine's own setting), sample i seeded with `seed + i` when `seed` is set; an engine
    # that caches per session prefills the prompt once for all of them
    n: int = 1
    temperature: float | None = None
    seed: int | None = None
    # residency: this key's context holds data that must not leave the premises; only a local
    # engine may take it (inference/egress.py refuses it at every remote one)
    local_only: bool = False
    # a server's prefix-cache namespace (vLLM `cache_salt`): set per tenant at the egress, so
    # one tenant can never hit, time or evict another's cached prefixes
    salt: str = ""
    # the triggering event's images (ponder/images.py) this tier may see, in field order:
    # only that event's, never another key's. A remote engine sends them as image parts of the
    # user message (inference/openai.py); JaxEngine on a vision checkpoint encodes them, and on
    # a text-only one answers with an error (not blind); the reflex tier reads none
    images: tuple[Image, ...] = ()

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
    # the server constrained `text` to the request's schema; when it did not, a reasoner asks
    # once more with the validation error as a hint before giving up on the tier
    enforced: bool = True
    # a request with n > 1: every sample's text, in order (`text` is the first); `usage` covers
    # them all, the prompt counted once
    samples: tuple[str, ...] = ()
    # where the call's time went, in seconds on a monotonic clock. An engine may give its own
    # phases, back to back from the start of its `generate` and in order (an in-process model:
    # `queue`, `prefill`, `decode`; a server: `first token`, `decode`); the runtime adds
    # `batch wait` (submitted until the engine started on the batch) and `engine` (the whole
    # `generate`), which a decision's trace lays the engine's phases inside
    timings: dict[str, float] | None = None


class EngineError(RuntimeError):
    """A backend failed as a whole (unreachable, timed out, crashed)."""


@runtime_checkable
class Engine(Protocol):
    """Batched generation. `generate` returns one Completion per request, in order."""

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def generate(self, requests: Sequence[Request]) -> list[Completion]: ...


# the widest JSON number a server's grammar allows (llama.cpp: 16 integral digits, 16
# decimals, an exponent of 16 digits, a sign each)
_NUMBER_CHARS = 56


def answer_token_bound(schema: dict[str, Any]) -> int:
    """Tokens that any valid answer to `schema` fits in, so `max_tokens` never cuts one off.

    Counted in characters of the longest compact answer (every property, the longest enum
    value, strings at `maxLength`, numbers at their grammar's widest), plus room for the
    whitespace grammars allow between tokens. A byte-level BPE spends at most one token per
    ASCII character; characters outside ASCII may take more, and an answer cut off by them
    fails validation like any other invalid answer.
    """
    props = schema.get("properties") or {}
    chars = 2 + max(len(props) - 1, 0)  # braces and commas
    for name, p in props.items():
        chars += len(name) + 3  # "name":
        if "enum" in p:
            chars += max((len(str(v)) + 2 for v in p["enum"]), default=2)
        elif p.get("type") == "string":
            chars += int(p.get("maxLength", 1024)) + 2
        elif p.get("type") in ("number", "integer"):
            chars += _NUMBER_CHARS
        elif p.get("type") == "boolean":
            chars += 5
        else:
            chars += 256  # nested values: a generous allowance
    return chars + 8 * (len(props) + 1)  # a space or newline around each token of structure

"""Wire formats: the one definition of every record ponder reads or writes.

Schema evolution follows msgspec's rules: a new field always gets a default, and a field's type
never changes, so older records keep decoding.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ponder.images import Image

__all__ = [
    "SourcePos",
    "Event",
    "Usage",
    "Finding",
    "Span",
    "Trace",
    "Decision",
    "DeadLetter",
    "decision_id",
    "answer_type",
    "answer_schema",
    "SEVERITIES",
]

SEVERITIES = ("info", "low", "medium", "high", "critical")
Severity = Literal["info", "low", "medium", "high", "critical"]
REASON_MAX = 400  # characters of a decision's reason: in the schema, and enforced after generation


class SourcePos(msgspec.Struct, frozen=True, array_like=True):
    """Where a record came from: enough to replay it and to commit past it."""

    topic: str
    partition: int
    offset: int
    # bumped each time the partition's log is found to have started again (a re-created topic,
    # a broker that lost its data): offsets of a new epoch never count as replays of an old one
    epoch: int = 0

    def __str__(self) -> str:
        at = f"{self.topic}[{self.partition}]@{self.offset}"
        return f"{at}#{self.epoch}" if self.epoch else at


TENANT_SEP = "\x1f"  # between tenant and key in a tenant-scoped stream key (never in a tenant)
DEFAULT_TENANT = "default"


class Event(msgspec.Struct, frozen=True):
    """One decoded input record of one key.

    With tenants (`Pipeline(tenant=…)`), `key` is tenant-scoped, `tenant + TENANT_SEP + key`,
    so one tenant's key never shares state, context or decision ids with another's that has
    the same name; `tenant` is then set ("" when the pipeline has no tenants).
    """

    key: str
    ts: float
    payload: dict[str, Any]
    source: SourcePos
    headers: dict[str, str] = {}
    tenant: str = ""
    # the event's decoded images (ponder/images.py), one per image field it carried; in
    # `payload` each such field holds the image's reference (`Image.ref`), never its bytes
    images: tuple[Image, ...] = ()

    @property
    def stream_key(self) -> str:
        """The key as the event carried it (without its tenant)."""
        return self.key[len(self.tenant) + 1 :] if self.tenant else self.key


class Usage(msgspec.Struct, frozen=True):
    """What one model call cost. `cached_prompt_tokens` is the part of the prompt served from a
    session/prefix cache, so it is always <= `prompt_tokens`."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # a figure here is the client's estimate, not the server's report: a server that reports
    # no cached tokens, or a stream that ends without usage (inference/openai.py)
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        """Two calls' usage together (a decision's attempts, a forecast's calls)."""
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.cached_prompt_tokens + other.cached_prompt_tokens,
                     self.completion_tokens + other.completion_tokens, self.cost_usd + other.cost_usd,
                     self.estimated or other.estimated)


class Finding(msgspec.Struct, frozen=True):
    """One reason the gate found an event surprising."""

    kind: str  # spike, rate, level_shift, drift, stuck, dropout, new_value, gap, rule
    field: str
    score: float
    value: Any = None
    expected: Any = None
    detail: str = ""


class Span(msgspec.Struct, frozen=True, omit_defaults=True):
    """One timed stage of a decision on a monotonic clock: it began `start_ms` after the
    decision did and lasted `ms`. `parts` are the stages inside it (a call's batch wait and
    engine time, the engine's own phases); `attrs` say what it worked on or chose."""

    name: str
    ms: float
    start_ms: float = 0.0
    parts: list[Span] = []
    attrs: dict[str, str | int | float | bool | list[str]] = {}


class Trace(msgspec.Struct, frozen=True):
    """How a decision was reached: gate verdict, route, attempts and their timings."""

    gate_score: float
    findings: list[Finding]
    route: list[str]  # tiers tried, in order
    spans: list[Span] = []  # one per model call, named by its tier
    errors: list[str] = []
    skipped: list[str] = []  # tiers passed over without a call, and why: "edge: breaker open"
    # the usage and cost forecast before the model calls were made (operators/forecast.py),
    # summed over the calls; beside `Decision.usage` it shows how good the forecast was
    predicted: Usage | None = None
    # a tier's vote (operators/vote.py): samples per action, "(invalid)" for abstentions
    vote: dict[str, int] | None = None
    # the privacy policy's changes to the triggering event (field -> action), never values
    privacy: dict[str, str] | None = None
    # the reasoner's own work between the calls in `spans`: context render, each route
    # step (with why), each answer's validation (decide)
    stages: list[Span] = []
    # what became of the triggering event's images at each tier called: "edge: sent frame
    # (image sha256:…)" or "cloud: withheld frame (…): tier not in images.tiers"
    images: list[str] = []


class Decision(msgspec.Struct, frozen=True):
    decision_id: str
    key: str
    action: str
    severity: Severity
    reason: str
    confidence: float
    tier: str
    model: str
    usage: Usage
    latency_ms: float
    degraded: bool
    evidence: dict[str, Any]
    ts: float = 0.0  # event time of the triggering event
    source: SourcePos | None = None
    trace: Trace | None = None
    headers: dict[str, str] = {}
    tenant: str = DEFAULT_TENANT


class DeadLetter(msgspec.Struct, frozen=True):
    """An input that could not become an Event, with why and where it came from."""

    reason: str
    source: SourcePos
    raw: str
    stage: str = "decode"


def decision_id(key: str, source: SourcePos) -> str:
    """Derive a decision id from the key and the triggering source position, so a replay of the
    same record produces the same id and a sink can drop the duplicate."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(key)}:{key}|{source.topic}|{source.partition}|{source.offset}".encode())
    if source.epoch:  # epoch 0 keeps the ids decisions had before epochs existed
        h.update(f"#{source.epoch}".encode())
    return h.hexdigest()


_answer_types: dict[tuple[str, ...], type] = {}


def answer_type(actions: tuple[str, ...]) -> type:
    """The Struct a model's answer must decode into: `action` restricted to `actions`.

    Decoding through it is how allowed actions are enforced after generation, whatever the
    engine: an answer naming any other action fails validation.
    """
    actions = tuple(actions)
    if not actions:
        msg = "a pipeline needs at least one allowed action"
        raise ValueError(msg)
    t = _answer_types.get(actions)
    if t is None:
        t = msgspec.defstruct(
            "Answer",
            [
                ("action", Literal.__getitem__(actions)),
                ("severity", Severity),
                ("reason", Annotated[str, Meta(max_length=REASON_MAX)]),
                ("confidence", Annotated[float, Meta(ge=0.0, le=1.0)]),
            ],
            forbid_unknown_fields=True,
        )
        _answer_types[actions] = t
    return t


def answer_schema(actions: tuple[str, ...]) -> dict[str, Any]:
    """JSON Schema of the answer a model must produce (allowed actions as an enum)."""
    schema = msgspec.json.schema(answer_type(actions))
    # msgspec puts the struct under $defs; engines with guided decoding want it inline.
    defs = schema.pop("$defs", {})
    body = defs.get("Answer", schema)
    body["additionalProperties"] = False
    return body


json_encoder = msgspec.json.Encoder()
msgpack_encoder = msgspec.msgpack.Encoder()
decision_json = msgspec.json.Decoder(Decision)
decision_msgpack = msgspec.msgpack.Decoder(Decision)
dead_letter_json = msgspec.json.Decoder(DeadLetter)
event_msgpack = msgspec.msgpack.Decoder(Event)

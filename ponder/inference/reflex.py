"""Reflex tier: rules that turn gate findings into decisions. No model, zero cost, always up.

It is the lowest tier and every other tier's fallback, so it answers every request. It speaks
the Engine protocol and answers in the same JSON as a model, so the decide step validates all
tiers alike.

>>> import asyncio
>>> from ponder.types import Finding
>>> eng = ReflexEngine((ReflexRule("spike", "alert", "high"),), default_action="none")
>>> req = Request("dev-1", "", "", 64, ("none", "alert"), {}, (Finding("spike", "temp", 0.9),))
>>> asyncio.run(eng.generate([req]))[0].text
'{"action":"alert","severity":"high","reason":"spike on temp","confidence":0.9}'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import msgspec

from ponder.inference.engine import Completion, Request
from ponder.types import SEVERITIES, Usage

__all__ = ["ReflexRule", "ReflexEngine"]

_enc = msgspec.json.Encoder()
_FREE = Usage()


@dataclass(frozen=True)
class ReflexRule:
    """If a finding of `kind` (on `field`, `*` for any) scores at least `min_score`, answer
    `action` with `severity`. Rules are tried in order; the first match wins."""

    kind: str
    action: str
    severity: str = "medium"
    field: str = "*"
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            msg = f"ReflexRule({self.kind!r}): severity must be one of {SEVERITIES}, got {self.severity!r}"
            raise ValueError(msg)


class _Answer(msgspec.Struct):
    action: str
    severity: str
    reason: str
    confidence: float


class ReflexEngine:
    """Rule-based engine: first matching rule over the request's findings."""

    name = "reflex"

    def __init__(self, rules: Sequence[ReflexRule] = (), *, default_action: str = "none",
                 default_severity: str = "info") -> None:
        self.rules = tuple(rules)
        self.default_action = default_action
        self.default_severity = default_severity

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def answer(self, req: Request) -> str:
        for rule in self.rules:
            for f in req.findings:
                if (f.kind == rule.kind or rule.kind == "*") and (rule.field in ("*", f.field)) \
                        and f.score >= rule.min_score:
                    reason = f"{f.kind} on {f.field}" + (f": {f.detail}" if f.detail else "")
                    if f.kind == "rule":
                        reason = f"rule {f.detail}"
                    return _enc.encode(_Answer(rule.action, rule.severity, reason[:400],
                                               round(min(1.0, max(0.0, f.score)), 3))).decode()
        why = "no rule matched" if req.findings else "no findings"
        return _enc.encode(_Answer(self.default_action, self.default_severity, why, 0.5)).decode()

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        return [Completion(self.answer(r), _FREE, "reflex") for r in requests]

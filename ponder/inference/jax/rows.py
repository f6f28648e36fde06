"""Request rows: what a caller asks the generator for, what it gets back, and the row each
request (or each sample of one) occupies while it is scheduled, prefilled and decoded.

A row's `keyed` list is what its session is matched and recorded by: the prompt's token ids,
except that positions taking embeddings (`GenRequest.embeds`, image features) carry negative
ids derived from the embeddings' digest, so two different images never share cached K/V and
the same image at the same place does.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["Embeds", "GenRequest", "GenResult", "Row", "request_result"]

SEED_MASK = 0xFFFFFFFF  # seeds are uint32 on the device: sample i draws with (seed + i) mod 2**32


@dataclass(frozen=True, eq=False)
class Embeds:
    """Embeddings that replace the prompt's tokens at positions start .. start + n - 1
    (features [n, E], e.g. an image's projected vision features at its placeholder tokens).
    `digest` names their content (e.g. the image's hash): equal digests mean equal features."""

    start: int
    features: Any
    digest: str

    @property
    def ids(self) -> list[int]:
        """Negative stand-in ids for the session's record, one per position."""
        n = int(np.shape(self.features)[0])
        return [-1 - int.from_bytes(hashlib.blake2b(f"{self.digest}:{j}".encode(), digest_size=7).digest(),
                                    "little") for j in range(n)]

@dataclass
class GenRequest:
    """One prompt to continue. `session` None: no session (nothing kept afterwards).
    temperature 0 is greedy; `seed` None draws one. `constraint` is a constrain.Constraint.
    `n` > 1 draws n samples of the prompt, prefilled once: sample i is seeded `seed + i`, so
    it draws what a request of its own with that seed would. `on_token(id)` is called (from
    the generating thread) for each token as it is chosen (`on_token[i](id)` for sample i when
    it is a sequence of n callables); a truthy return ends the row there (finish_reason
    "stop"), e.g. on a stop string; an exception it raises ends only this row, with an error.
    Setting `cancelled` (the caller gave up) drops the request if it is still waiting and ends
    its rows at the next step if not."""

    session: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    constraint: Any = None
    on_token: Callable[[int], Any] | Sequence[Callable[[int], Any]] | None = None
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    cancelled: threading.Event | None = None
    n: int = 1
    embeds: Sequence[Embeds] = ()  # prompt positions that take embeddings, not their tokens'


@dataclass
class GenResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token; closers get 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = None
    # n > 1: every sample's own result, in order; the fields above are then sample 0's, with
    # the prompt's counts (once), and an error of any sample
    samples: list[GenResult] = field(default_factory=list)
    # seconds in each phase: waiting for a slot (queue), prefill to the first token, decode
    phases: dict[str, float] | None = None


@dataclass(eq=False)
class Row:
    tag: Any  # the caller's handle for this request
    key: str
    req: GenRequest
    cached: int = 0
    seed: int = 0
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sampled: int = 0  # tokens of `out` the model chose (the rest closed a constrained answer)
    state: Any = None  # constraint state
    finish: str | None = None
    error: str | None = None
    deferred: bool = False  # found no pages last time: rows behind it wait
    index: int = 0  # which sample of its request this row draws
    forks: list[str] = field(default_factory=list)  # n > 1, until forked: the other samples' sessions
    group: list[Row] | None = None  # n > 1, once forked: every sample's row, in order (shared)
    born: float = field(default_factory=time.perf_counter)  # phases (perf_counter s): arrived,
    admitted: float = 0.0  # its prefill began,
    first: float = 0.0  # its first token was chosen
    spec_rate: float | None = None  # speculation: EMA of its drafts' acceptance (None: none yet)
    spec_idle: int = 0  # speculation: steps in a row it drafted nothing for a low rate

    @property
    def cap(self) -> int:
        """Tokens the row may hold: its prompt and every token it may generate."""
        return len(self.req.prompt) + self.req.max_tokens

    @cached_property
    def keyed(self) -> list[int]:
        """The prompt as its session records it (see the module docstring)."""
        if not self.req.embeds:
            return self.req.prompt
        out = list(self.req.prompt)
        for e in self.req.embeds:
            ids = e.ids
            out[e.start : e.start + len(ids)] = ids
        return out

    @property
    def cancelled(self) -> bool:
        return self.req.cancelled is not None and self.req.cancelled.is_set()

    @property
    def keeps(self) -> bool:
        """Its K/V go back to the request's session (a further sample's never do)."""
        return self.req.session is not None and self.index == 0

    @property
    def on_token(self) -> Callable[[int], Any] | None:
        f = self.req.on_token
        return f[self.index] if isinstance(f, (list, tuple)) else f

    def result(self) -> GenResult:
        phases = None
        if self.admitted:
            first, done = self.first or time.perf_counter(), time.perf_counter()
            phases = {"queue": self.admitted - self.born, "prefill": first - self.admitted, "decode": done - first}
        return GenResult(self.out, self.logprobs, len(self.req.prompt), self.cached,
                         self.finish or "stop", self.error, phases=phases)


def request_result(rows: list[Row]) -> GenResult:
    """The answer to a request with n > 1 from its samples' rows: sample 0's tokens, the
    prompt counted once, every sample in `samples`, and the first sample's error if any."""
    res = rows[0].result()
    res.samples = [r.result() for r in rows]
    if res.phases:  # the request decodes until its last sample is done
        res.phases["decode"] = max(s.phases["decode"] for s in res.samples if s.phases)
    bad = next((r for r in rows if r.error), None)
    if bad is not None:
        res.finish_reason, res.error = "error", f"sample {bad.index}: {bad.error}"
    return res

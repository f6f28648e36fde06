"""Vote: test-time compute for the events that matter most.

A tier configured with a `Vote` answers a high-stakes event with several samples and takes the
majority action, its confidence the share of samples that agree. What counts as high stakes is
per tier: a gate score at or above `min_score` votes from the first call; otherwise a first
answer at or above `severity` is checked by a vote it takes part in.

Samples are drawn in rounds and the vote stops as soon as its outcome cannot change: the first
round draws a majority of `n` (3 of 5); when they all agree, the remaining two cannot outvote
them. Each later round draws the fewest samples that could settle it. An engine that caches per
key prefills the prompt once for all samples of a round (Request.n), and later rounds reuse the
key's cached prefix, so a vote costs mostly decode steps.

An invalid sample is an abstention: it counts toward `n` and agrees with nobody.

>>> t = Tally(5)
>>> t.next_draw()
3
>>> t.add([_A("alert", 0.6), _A("alert", 0.9), _A("none", 0.8)])
>>> t.decided(), t.next_draw()
(False, 1)
>>> t.add([_A("alert", 0.7)])
>>> t.decided(), t.winner().action, t.winner().confidence, t.counts()
(True, 'alert', 0.75, {'alert': 3, 'none': 1})
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec

from ponder.types import SEVERITIES

__all__ = ["Vote", "Tally"]


@dataclass(frozen=True)
class Vote:
    """Test-time compute at one tier.

    :param n: samples at most (odd, so a full vote has no tie).
    :param min_score: a gate score at or above this votes from the first call (>1: never).
    :param severity: a first answer at least this severe is checked by a vote (None: never).
    :param temperature: sampling temperature of the samples (the tier's first answer stays as
        the engine samples it, greedy by default).
    """

    n: int = 5
    min_score: float = 2.0
    severity: str | None = "high"
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.n < 3 or self.n % 2 == 0 or self.n > 15:
            msg = f"Vote.n must be odd, 3 to 15 (a majority without ties), got {self.n}"
            raise ValueError(msg)
        if self.severity is not None and self.severity not in SEVERITIES:
            msg = f"Vote.severity must be one of {SEVERITIES} or None, got {self.severity!r}"
            raise ValueError(msg)
        if not 0.0 < self.temperature <= 2.0:
            msg = f"Vote.temperature must be in (0, 2]: identical greedy samples are no vote, got {self.temperature}"
            raise ValueError(msg)

    def at_once(self, score: float) -> bool:
        """Whether an event with this gate score votes from its first call."""
        return score >= self.min_score

    def checks(self, answer: Any) -> bool:
        """Whether a first answer is severe enough to be checked by a vote."""
        return self.severity is not None and SEVERITIES.index(answer.severity) >= SEVERITIES.index(self.severity)


class Tally:
    """The samples of one vote so far. `None` entries are invalid samples (abstentions)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.samples: list[Any | None] = []

    @property
    def drawn(self) -> int:
        return len(self.samples)

    def add(self, answers: list[Any | None]) -> None:
        self.samples.extend(answers[: self.n - self.drawn])

    def _top(self) -> tuple[int, int]:
        c = Counter(a.action for a in self.samples if a is not None).most_common(2)
        return (c[0][1] if c else 0), (c[1][1] if len(c) > 1 else 0)

    def decided(self) -> bool:
        """No samples left to draw, or the leader cannot be caught by those left."""
        first, second = self._top()
        left = self.n - self.drawn
        return left == 0 or first > second + left

    def next_draw(self) -> int:
        """The fewest samples that could settle the vote: all agreeing with the leader."""
        first, second = self._top()
        left = self.n - self.drawn
        return min(left, (second + left - first) // 2 + 1)

    def counts(self) -> dict[str, int]:
        out = dict(Counter(a.action for a in self.samples if a is not None).most_common())
        invalid = sum(a is None for a in self.samples)
        if invalid:
            out["(invalid)"] = invalid
        return out

    def winner(self) -> Any | None:
        """The majority action's most confident sample, its confidence replaced by the share of
        samples drawn that agree; None when no sample was valid. A tie goes to the action
        whose samples were more confident in sum, then to the one sampled first."""
        valid = [a for a in self.samples if a is not None]
        if not valid:
            return None
        count = Counter(a.action for a in valid)
        weight = Counter()
        for a in valid:
            weight[a.action] += a.confidence
        order = {a.action: -i for i, a in reversed(list(enumerate(valid)))}
        action = max(count, key=lambda k: (count[k], weight[k], order[k]))
        best = max((a for a in valid if a.action == action), key=lambda a: a.confidence)
        return msgspec.structs.replace(best, confidence=round(count[action] / self.drawn, 4))


class _A(msgspec.Struct, frozen=True):  # the doctest's stand-in for an Answer
    action: str
    confidence: float
    severity: str = "high"

"""Route: pick the tier for an escalated event, and move between tiers when one falls short.

The router is the one piece of pipeline-wide (not per-key) logic among the operators: it owns
each tier's token budget and circuit breaker. Clocks are injected so tests control time.

* start at the highest tier whose `min_score` the gate score reaches;
* skip a tier whose budget cannot pay for the prompt, or whose breaker is open (downgrade);
* after an invalid or low-confidence answer, go up a tier if there is one not yet tried;
* after a backend failure, go down a tier. The reflex tier always answers.

>>> r = Router((TierSpec("reflex"), TierSpec("edge", min_score=0.6)), clock=lambda: 0.0)
>>> r.first(0.9), r.first(0.5)
('edge', 'reflex')
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["TierSpec", "Router", "TIER_ORDER"]

TIER_ORDER = ("reflex", "edge", "cloud")


@dataclass(frozen=True)
class TierSpec:
    """One tier of a pipeline.

    :param name: reflex, edge or cloud.
    :param engine: engine spec (`reflex`, `jax:PATH`, `http://host:port/v1`), resolved by the
        pipeline when it starts.
    :param min_score: lowest gate score that starts at this tier.
    :param min_confidence: an answer below this escalates to the next tier up, if any.
    :param tokens_per_minute: prompt+completion budget; 0 means unlimited.
    :param max_batch: / max_wait_ms: micro-batching of requests across keys.
    :param failures: consecutive failures that open the breaker for `cooloff_s` seconds.
    """

    name: str
    engine: str = "reflex"
    model: str = ""
    min_score: float = 0.0
    min_confidence: float = 0.0
    max_tokens: int = 128
    tokens_per_minute: int = 0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_concurrency: int = 4
    timeout_s: float = 30.0
    failures: int = 3
    cooloff_s: float = 30.0
    cost_per_1k_tokens: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in TIER_ORDER:
            msg = f"tier name must be one of {TIER_ORDER}, got {self.name!r}"
            raise ValueError(msg)
        if self.max_batch < 1 or self.max_wait_ms < 0:
            msg = f"tier {self.name!r}: max_batch must be >= 1 and max_wait_ms >= 0"
            raise ValueError(msg)


@dataclass
class _TierState:
    tokens: float
    stamp: float
    failures: int = 0
    open_until: float = 0.0
    calls: int = 0
    degraded_skips: int = 0


class Router:
    """Tier choice with budgets and breakers. Tiers are ordered reflex < edge < cloud."""

    def __init__(self, tiers: tuple[TierSpec, ...], *, clock: Callable[[], float] = time.monotonic) -> None:
        names = [t.name for t in tiers]
        if "reflex" not in names:
            msg = "a pipeline needs a reflex tier: it is every other tier's fallback"
            raise ValueError(msg)
        if len(set(names)) != len(names):
            msg = f"tier names must be unique, got {names}"
            raise ValueError(msg)
        self.tiers = tuple(sorted(tiers, key=lambda t: TIER_ORDER.index(t.name)))
        self.by_name = {t.name: t for t in self.tiers}
        self._clock = clock
        now = clock()
        self._state = {t.name: _TierState(float(t.tokens_per_minute), now) for t in self.tiers}

    def _available(self, spec: TierSpec, need: int) -> bool:
        if spec.name == "reflex":
            return True
        st = self._state[spec.name]
        now = self._clock()
        if st.open_until > now:
            return False
        if spec.tokens_per_minute:
            st.tokens = min(float(spec.tokens_per_minute),
                            st.tokens + (now - st.stamp) * spec.tokens_per_minute / 60.0)
            st.stamp = now
            if st.tokens < need:
                return False
        return True

    def first(self, score: float, need: int = 0) -> str:
        """The tier to start at: the highest one the score reaches and that is available."""
        for spec in reversed(self.tiers):
            if score >= spec.min_score and self._available(spec, need):
                return spec.name
        return "reflex"

    def wanted(self, score: float) -> str:
        """The tier the score asks for, ignoring budgets and breakers (to tell degraded runs)."""
        for spec in reversed(self.tiers):
            if score >= spec.min_score:
                return spec.name
        return "reflex"

    def up(self, tier: str, tried: set[str], need: int = 0) -> str | None:
        """Next tier above `tier` that is available and not yet tried."""
        i = TIER_ORDER.index(tier)
        for spec in self.tiers:
            if TIER_ORDER.index(spec.name) > i and spec.name not in tried and self._available(spec, need):
                return spec.name
        return None

    def down(self, tier: str, tried: set[str], need: int = 0) -> str:
        """Next tier below `tier` that is available and not yet tried; reflex at the bottom."""
        i = TIER_ORDER.index(tier)
        for spec in reversed(self.tiers):
            if TIER_ORDER.index(spec.name) < i and spec.name not in tried and self._available(spec, need):
                return spec.name
        return "reflex"

    def succeeded(self, tier: str, tokens: int) -> None:
        st = self._state[tier]
        st.failures = 0
        st.calls += 1
        if self.by_name[tier].tokens_per_minute:
            st.tokens -= tokens

    def failed(self, tier: str) -> None:
        st = self._state[tier]
        spec = self.by_name[tier]
        st.failures += 1
        if st.failures >= spec.failures:
            st.open_until = self._clock() + spec.cooloff_s
            st.failures = 0

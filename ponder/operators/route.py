"""Route: pick the tier for an escalated event, and move between tiers when one falls short.

The router is the one piece of pipeline-wide (not per-key) logic among the operators: it owns
each tier's token budget and circuit breaker. Clocks are injected so tests control time.

* start at the highest tier whose `min_score` the gate score reaches;
* skip a tier whose budget cannot pay for the prompt, or whose breaker is open (downgrade);
* after an invalid or low-confidence answer, go up a tier if there is one not yet tried;
* after a backend failure, go down a tier. The reflex tier always answers.

Each non-reflex tier has a circuit breaker. Closed: calls go through, and `failures`
consecutive failures open it. Open: the tier is skipped for `cooloff_s`. Then it is half-open:
the next call that would use the tier is its one probe, and while the probe is out every other
event skips the tier (downgraded at once, not queued behind the probe). The probe's success
closes the breaker, its failure opens it for another cool-off. Handing out the tier and taking
the probe slot happen in one synchronous step, so on one event loop many keys escalating at
the same moment cannot all pass. A probe whose outcome never comes (its task was cancelled)
frees the slot after the tier's `timeout_s`. Outcomes of calls sent before the breaker opened
do not move it: only the probe decides. (Outcomes carry no call identity, so a call that
outlives the whole cool-off and ends while the probe is out is taken for the probe; the tier's
`timeout_s` bounds a call, so a `cooloff_s` above it rules that out.)

Every skip can be written to a `skipped` list as `"tier: why"`, for the decision's trace.

>>> r = Router((TierSpec("reflex"), TierSpec("edge", min_score=0.6)), clock=lambda: 0.0)
>>> r.first(0.9), r.first(0.5)
('edge', 'reflex')
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ponder.inference.servers import ServerProfile
from ponder.operators.price import Price
from ponder.operators.vote import Vote

__all__ = ["TierSpec", "Router", "TIER_ORDER", "SKIP_OPEN", "SKIP_PROBING", "SKIP_BUDGET", "SKIP_RESIDENCY"]

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
    :param failures: consecutive failures that open the breaker for `cooloff_s` seconds, after
        which one probe call is let through (see the module docstring).
    :param max_tokens: completion budget; 0 derives it from the decision schema, so that any
        valid answer fits (inference/engine.py `answer_token_bound`).
    :param timeout_s: one deadline for a call at this tier, every attempt included.
    :param server: for an http(s) engine, what its server supports: `auto` (asked at start),
        a profile name (`vllm`, `llama.cpp`, `ponder`, `openai`) or a `ServerProfile`
        (inference/servers.py), e.g. a built-in one with `max_requests` or `extra_body` replaced.
    :param extra_body: fields added to every request body of an http(s) engine.
    :param stall_s: for a streamed http(s) answer, the longest silence once it has started.
    :param price: what its tokens cost (operators/price.py); a decision's `usage.cost_usd` is
        computed from it exactly, cached prompt tokens at the cached price. Without one, the
        flat `cost_per_1k_tokens` applies to every token.
    :param local: whether data sent to this tier stays on the premises. None: reflex, `jax:`
        and Engine instances are local, http(s) servers remote; True marks a server as a
        trusted edge box; False an Engine instance that ships data elsewhere.
    :param vote: test-time compute for high-stakes events: several samples and a majority vote
        on the action (operators/vote.py).
    """

    name: str
    engine: str = "reflex"
    model: str = ""
    min_score: float = 0.0
    min_confidence: float = 0.0
    max_tokens: int = 0
    tokens_per_minute: int = 0
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_concurrency: int = 4
    timeout_s: float = 30.0
    failures: int = 3
    cooloff_s: float = 30.0
    cost_per_1k_tokens: float = 0.0
    price: Price | None = None
    server: str | ServerProfile = "auto"
    extra_body: Mapping[str, Any] | None = None
    stall_s: float | None = None
    retries: int = 2  # an http(s) engine's retries of a transient failure, within `timeout_s`
    vote: Vote | None = None
    local: bool | None = None

    @property
    def is_local(self) -> bool:
        if self.local is not None:
            return self.local
        return not (isinstance(self.engine, str) and self.engine.startswith(("http://", "https://")))

    def __post_init__(self) -> None:
        if self.name not in TIER_ORDER:
            msg = f"tier name must be one of {TIER_ORDER}, got {self.name!r}"
            raise ValueError(msg)
        if self.max_batch < 1 or self.max_wait_ms < 0:
            msg = f"tier {self.name!r}: max_batch must be >= 1 and max_wait_ms >= 0"
            raise ValueError(msg)
        if self.failures < 1 or self.cooloff_s < 0:
            msg = f"tier {self.name!r}: failures must be >= 1 and cooloff_s >= 0"
            raise ValueError(msg)


# asked last before a tier is handed out: None to take it (its cost now reserved), else why not
Claim = Callable[["TierSpec"], "str | None"]

# why a tier was skipped, as written to a decision's trace
SKIP_OPEN = "breaker open"
SKIP_PROBING = "half-open probe in flight"
SKIP_BUDGET = "token budget"
SKIP_RESIDENCY = "residency: local-only data, remote tier"


@dataclass
class _TierState:
    tokens: float
    stamp: float
    failures: int = 0  # consecutive, while closed
    open_until: float | None = None  # set while open or half-open
    probe_since: float | None = None  # set while the half-open probe is out
    calls: int = 0
    opened: int = 0
    probes: int = 0


class Router:
    """Tier choice with budgets and breakers. Tiers are ordered reflex < edge < cloud.

    Not thread-safe: one router serves the tasks of one event loop.
    """

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

    def breaker(self, tier: str) -> str:
        """`closed`, `open` or `half-open` (probe out or not), for metrics and tests."""
        st = self._state[tier]
        if st.open_until is None:
            return "closed"
        return "open" if st.probe_since is None and self._clock() < st.open_until else "half-open"

    def stats(self, tier: str) -> dict[str, int]:
        """Successful calls, times the breaker opened (or reopened), probes let through."""
        st = self._state[tier]
        return {"calls": st.calls, "opened": st.opened, "probes": st.probes}

    def _blocked(self, spec: TierSpec, st: _TierState, now: float) -> str | None:
        if st.open_until is None:
            return None
        if now < st.open_until:
            return SKIP_OPEN
        # a probe lost without an outcome (its task cancelled) must not block the tier forever
        if st.probe_since is not None and now - st.probe_since < spec.timeout_s + spec.max_wait_ms / 1000.0:
            return SKIP_PROBING
        return None

    def _available(self, spec: TierSpec, need: int, skipped: list[str] | None, claim: Claim | None = None) -> bool:
        """Whether the tier can take a call now; if so the caller must make it (and report its
        outcome): in half-open state this claims the one probe slot. `claim` is asked last
        (it reserves the call's cost against the budgets, or says why it cannot)."""
        if spec.name == "reflex":
            return True
        st = self._state[spec.name]
        now = self._clock()
        why = self._blocked(spec, st, now)
        if why is None and spec.tokens_per_minute:
            st.tokens = min(float(spec.tokens_per_minute),
                            st.tokens + (now - st.stamp) * spec.tokens_per_minute / 60.0)
            st.stamp = now
            if st.tokens < need:
                why = SKIP_BUDGET
        if why is None and claim is not None:
            why = claim(spec)
        if why is not None:
            entry = f"{spec.name}: {why}"
            if skipped is not None and entry not in skipped:
                skipped.append(entry)
            return False
        if st.open_until is not None:
            st.probe_since = now
            st.probes += 1
        return True

    def first(self, score: float, need: int = 0, skipped: list[str] | None = None, claim: Claim | None = None) -> str:
        """The tier to start at: the highest one the score reaches and that is available."""
        for spec in reversed(self.tiers):
            if score >= spec.min_score and self._available(spec, need, skipped, claim):
                return spec.name
        return "reflex"

    def wanted(self, score: float) -> str:
        """The tier the score asks for, ignoring budgets and breakers (to tell degraded runs)."""
        for spec in reversed(self.tiers):
            if score >= spec.min_score:
                return spec.name
        return "reflex"

    def up(self, tier: str, tried: set[str], need: int = 0, skipped: list[str] | None = None,
           claim: Claim | None = None) -> str | None:
        """Next tier above `tier` that is available and not yet tried."""
        i = TIER_ORDER.index(tier)
        for spec in self.tiers:
            if TIER_ORDER.index(spec.name) > i and spec.name not in tried \
                    and self._available(spec, need, skipped, claim):
                return spec.name
        return None

    def down(self, tier: str, tried: set[str], need: int = 0, skipped: list[str] | None = None,
             claim: Claim | None = None) -> str:
        """Next tier below `tier` that is available and not yet tried; reflex at the bottom."""
        i = TIER_ORDER.index(tier)
        for spec in reversed(self.tiers):
            if TIER_ORDER.index(spec.name) < i and spec.name not in tried \
                    and self._available(spec, need, skipped, claim):
                return spec.name
        return "reflex"

    def succeeded(self, tier: str, tokens: int) -> None:
        st = self._state[tier]
        st.calls += 1
        if self.by_name[tier].tokens_per_minute:
            st.tokens -= tokens
        if st.open_until is not None and st.probe_since is None:
            return  # sent before the breaker opened: only the probe may close it
        st.failures = 0
        st.open_until = st.probe_since = None

    def failed(self, tier: str) -> None:
        st = self._state[tier]
        spec = self.by_name[tier]
        if st.open_until is None:
            st.failures += 1
            if st.failures < spec.failures:
                return
        elif st.probe_since is None:
            return  # sent before the breaker opened: the cool-off already running stands
        st.failures = 0
        st.open_until = self._clock() + spec.cooloff_s
        st.probe_since = None
        st.opened += 1

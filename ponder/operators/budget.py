"""Budgets: caps on what reasoning may spend, per tenant and tier, per minute, hour or day.

A call is let through only after its cost is *reserved* against every budget that covers its
tenant and tier; the reservation is settled with the actual cost when the call ends and
released when it fails (a failed call's actual usage, if any, still counts). What is reserved
is the call's worst case, not its forecast: the prompt forecast plus a margin with no cache
credit, and the whole completion budget. So a cap is exceeded only if the prompt forecast is
off by more than the margin, and a storm of concurrent escalations cannot overrun it: each
reservation is taken in one synchronous step on the event loop, before the call is sent.

Past `soft` of a cap, spending is paced: if the budget is being used faster than its window
passes, only events whose gate score is high enough keep the tier, the bar rising from the
tier's `min_score` at `soft` to 1.0 at the cap, so the budget lasts its window. A refused tier
is skipped (the router downgrades, and the decision's trace says which budget and why).

Windows are aligned to the wall clock (each minute, hour or day starts at a multiple of its
length since the epoch), so every worker of a group agrees on them. Each input partition owns
an equal share of every cap and keeps its own account, which travels with the partition in
the checkpoint bookkeeping (see `Budgets`): the caps hold for a whole consumer group. What a
partition spent after its last checkpoint is not in the account its next owner restores when
it was lost rather than handed back (a crash, an expired session): each such move can overrun
by up to one checkpoint interval's spend of that partition.

>>> b = Budgets((Budget(tier="cloud", usd=1.0, per="1h"),), clock=lambda: 0.0)
>>> hold, why = b.reserve("acme", "cloud", tokens=1_000, usd=0.6, score=0.9, min_score=0.5)
>>> b.reserve("acme", "cloud", tokens=1_000, usd=0.6, score=0.9, min_score=0.5)[1]
'budget tier=cloud: $0.6 more would pass its cap of $1 per 1h ($0 spent, $0.6 reserved)'
>>> b.settle(hold, usd=0.25, tokens=800); b.state()[0]["spent_usd"]
0.25
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import msgspec

__all__ = ["Budget", "Budgets", "Hold"]

_PERIOD_S = {"1m": 60.0, "1h": 3600.0, "1d": 86400.0}


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A cap on USD and/or tokens for the calls of `tenant` ("*": all) at `tier` ("*": all),
    per window of `per`."""

    tenant: str = "*"
    tier: str = "*"
    usd: float | None = None
    tokens: int | None = None
    per: Literal["1m", "1h", "1d"] = "1h"
    soft: float = 0.8

    def __post_init__(self) -> None:
        if self.usd is None and self.tokens is None:
            raise ValueError("Budget needs a cap: usd= and/or tokens=")
        if (self.usd is not None and not self.usd >= 0) or (self.tokens is not None and self.tokens < 0):
            raise ValueError(f"Budget caps must be >= 0, got usd={self.usd!r} tokens={self.tokens!r}")
        if self.per not in _PERIOD_S:
            raise ValueError(f"Budget.per must be one of {sorted(_PERIOD_S)}, got {self.per!r}")
        if not 0.0 < self.soft <= 1.0:
            raise ValueError(f"Budget.soft must be in (0, 1], got {self.soft!r}")

    def covers(self, tenant: str, tier: str) -> bool:
        return self.tenant in ("*", tenant) and self.tier in ("*", tier)

    @property
    def name(self) -> str:
        parts = [f"tenant={self.tenant}" if self.tenant != "*" else "", f"tier={self.tier}" if self.tier != "*" else ""]
        return "budget " + (" ".join(p for p in parts if p) or "*")


@dataclass
class _Window:
    start: float = 0.0
    spent_usd: float = 0.0
    spent_tokens: int = 0
    reserved_usd: float = 0.0
    reserved_tokens: int = 0


@dataclass
class Hold:
    """One call's reservation: settle it exactly once."""

    windows: list[_Window]
    usd: float
    tokens: int
    settled: bool = field(default=False)


class Budgets:
    """The budgets of one pipeline, with each partition's account of its current windows.

    `slices`: how many partitions the input has. Each partition owns an equal share of every
    cap, and its spend travels with it: a worker's checkpoint stores each partition's account
    (`meta`), and the worker that takes the partition over restores it (`restore`), so the
    caps hold for the whole consumer group however partitions move. (A share is the most a
    partition may spend: a skewed input may leave part of a cap unused.)
    """

    def __init__(self, budgets: tuple[Budget, ...] = (), *, clock: Callable[[], float] = time.time,
                 slices: int = 1) -> None:
        if slices < 1:
            raise ValueError(f"Budgets: slices must be >= 1, got {slices}")
        self.budgets = tuple(budgets)
        self.slices = slices
        self._clock = clock
        self._accounts: dict[int, list[_Window]] = {}
        self._ids = [hashlib.blake2b(repr((b.tenant, b.tier, b.usd, b.tokens, b.per)).encode(),
                                     digest_size=4).hexdigest() for b in self.budgets]

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def _start(self, b: Budget, now: float) -> float:
        return math.floor(now / _PERIOD_S[b.per]) * _PERIOD_S[b.per]

    def _slot(self, partition: int) -> int:
        """The account a partition's calls go to: its own, or the one account of an unsliced cap."""
        return partition if self.slices > 1 else 0

    def _account(self, partition: int) -> list[_Window]:
        acc = self._accounts.get(partition)
        if acc is None:
            now = self._clock()
            acc = self._accounts[partition] = [_Window(self._start(b, now)) for b in self.budgets]
        return acc

    def _roll(self) -> float:
        now = self._clock()
        for acc in self._accounts.values():
            for b, w in zip(self.budgets, acc):
                start = self._start(b, now)
                if start != w.start:
                    # a new window: nothing spent yet; calls in flight keep their reservations
                    w.start, w.spent_usd, w.spent_tokens = start, 0.0, 0
        return now

    def reserve(self, tenant: str, tier: str, *, tokens: int, usd: float, score: float,
                min_score: float, partition: int = 0) -> tuple[Hold | None, str | None]:
        """Reserve a call's worst case against every budget covering it, in the account of the
        event's partition: (hold, None), or (None, why) when one would pass its cap (its share
        of it) or is pacing this event out."""
        now = self._roll()
        acc = self._account(self._slot(partition))
        covering = [(b, w) for b, w in zip(self.budgets, acc) if b.covers(tenant, tier)]
        for b, w in covering:
            why = self._refusal(b, w, tokens, usd, score, min_score, now)
            if why is not None:
                return None, why
        for _, w in covering:
            w.reserved_usd += usd
            w.reserved_tokens += tokens
        return Hold([w for _, w in covering], usd, tokens), None

    def _refusal(self, b: Budget, w: _Window, tokens: int, usd: float, score: float, min_score: float,
                 now: float) -> str | None:
        share = "" if self.slices == 1 else f" (a partition's share: 1/{self.slices})"
        used = 0.0
        if b.usd is not None:
            cap = b.usd / self.slices
            if w.spent_usd + w.reserved_usd + usd > cap:
                return (f"{b.name}: ${usd:.4g} more would pass its cap of ${b.usd:g} per {b.per}{share} "
                        f"(${w.spent_usd:.4g} spent, ${w.reserved_usd:.4g} reserved)")
            used = max(used, (w.spent_usd + w.reserved_usd) / cap if cap else 1.0)
        if b.tokens is not None:
            cap_t = b.tokens / self.slices
            if w.spent_tokens + w.reserved_tokens + tokens > cap_t:
                return (f"{b.name}: {tokens} more tokens would pass its cap of {b.tokens} per {b.per}{share} "
                        f"({w.spent_tokens} spent, {w.reserved_tokens} reserved)")
            used = max(used, (w.spent_tokens + w.reserved_tokens) / cap_t if cap_t else 1.0)
        elapsed = (now - w.start) / _PERIOD_S[b.per]
        if used >= b.soft and used > elapsed and b.soft < 1.0:
            bar = min_score + (1.0 - min_score) * (used - b.soft) / (1.0 - b.soft)
            if score < bar:
                return (f"{b.name}: pacing, {used:.0%} used {elapsed:.0%} into its {b.per}: "
                        f"score {score:.2f} < {bar:.2f}")
        return None

    def settle(self, hold: Hold, *, usd: float, tokens: int) -> None:
        """Replace a hold's reservation by what the call actually cost (0 if it used nothing)."""
        if hold.settled:
            return
        hold.settled = True
        self._roll()
        for w in hold.windows:
            w.reserved_usd = max(0.0, w.reserved_usd - hold.usd)
            w.reserved_tokens = max(0, w.reserved_tokens - hold.tokens)
            w.spent_usd += usd
            w.spent_tokens += tokens

    # -- accounts that move with their partitions ------------------------------------------

    def meta(self, partition: int) -> dict[str, int]:
        """A partition's account as checkpoint bookkeeping (integers: nano-USD)."""
        self._roll()
        acc = self._accounts.get(self._slot(partition))
        if acc is None:
            return {}
        out: dict[str, int] = {}
        for bid, w in zip(self._ids, acc):
            out[f"budget.{bid}.window"] = int(w.start)
            out[f"budget.{bid}.nano_usd"] = round(w.spent_usd * 1e9)
            out[f"budget.{bid}.tokens"] = w.spent_tokens
        return out

    def restore(self, partition: int, meta: dict[str, int]) -> None:
        """Take a partition's account over from its last checkpoint (a window since ended
        starts empty)."""
        acc = self._account(self._slot(partition))
        self._roll()
        for bid, w in zip(self._ids, acc):
            if meta.get(f"budget.{bid}.window") == int(w.start):
                w.spent_usd = meta.get(f"budget.{bid}.nano_usd", 0) / 1e9
                w.spent_tokens = meta.get(f"budget.{bid}.tokens", 0)

    def forget(self, partition: int) -> None:
        """A partition handed on: its account is its new owner's now."""
        self._accounts.pop(self._slot(partition), None)

    def state(self) -> list[dict]:
        """Each budget's cap and this process's accounts summed, for ledgers and metrics."""
        now = self._roll()
        out = []
        for i, b in enumerate(self.budgets):
            ws = [acc[i] for acc in self._accounts.values()]
            spent, reserved = sum(w.spent_usd for w in ws), sum(w.reserved_usd for w in ws)
            owned = max(len(ws), 1) / self.slices
            out.append({"tenant": b.tenant, "tier": b.tier, "per": b.per, "cap_usd": b.usd, "cap_tokens": b.tokens,
                        "share": owned, "window_start": self._start(b, now), "spent_usd": round(spent, 10),
                        "spent_tokens": sum(w.spent_tokens for w in ws), "reserved_usd": round(reserved, 10),
                        "reserved_tokens": sum(w.reserved_tokens for w in ws),
                        "remaining_usd": None if b.usd is None else round(b.usd * owned - spent - reserved, 10)})
        return out

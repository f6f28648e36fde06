"""Forecast: a call's usage, and so its cost, predicted before the call is made.

What a budget must reserve before it lets a call through (issue: budgets that hold), and what
a decision's trace records beside the actual usage, so the error can be measured:

* prompt tokens: the prompt's characters over a characters-per-token ratio learnt per tier from
  the usage its engine reported (a tokenizer-exact count where the engine reports one);
* cached prompt tokens: what the tier last saw for this key. The renderer keeps a key's prefix
  append-only between compactions, so a new prefix that extends the last one reuses all of it;
  after a compaction only the pipeline's header (the part before the data block, the same for
  every key) is still cached. Kept per key as the last prefix's length and hash, not its text,
  so the memory per key is a few dozen bytes; bounded to `max_keys` keys (least recently used
  out);
* completion tokens: a running mean per tier.

>>> f = Forecast()
>>> f.predict("edge", "H" * 38 + "<data>", "tail").prompt_tokens  # 48 chars, 4 per token to start
12
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from ponder.types import Usage

__all__ = ["Forecast"]

_ALPHA = 0.1  # weight of the newest observation in the running means
_DATA = "<data"  # where a prompt's per-key part starts (context.render); before it: the header


@dataclass
class _Tier:
    chars_per_token: float = 4.0
    completion: float = 0.0
    calls: int = 0
    last: OrderedDict[str, tuple[int, bytes]] = field(default_factory=OrderedDict)  # key -> prefix len, hash


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


class Forecast:
    """Per-tier running estimates; one per pipeline (every worker task shares it)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._tiers: dict[str, _Tier] = {}

    def _tier(self, tier: str) -> _Tier:
        t = self._tiers.get(tier)
        if t is None:
            t = self._tiers[tier] = _Tier()
        return t

    def predict(self, tier: str, prefix: str, tail: str, key: str = "") -> Usage:
        """Tokens a call at `tier` with this prompt will likely use (cost left to the price)."""
        t = self._tier(tier)
        prompt = max(1, round((len(prefix) + len(tail)) / t.chars_per_token))
        cached_chars = 0
        last = t.last.get(key)
        if last is not None:
            n, digest = last
            if len(prefix) >= n and _digest(prefix[:n]) == digest:
                cached_chars = n  # the prefix grew: all of the last one is reused
            else:
                cached_chars = max(prefix.find(_DATA), 0)  # compacted: only the header survives
        cached = min(prompt, round(cached_chars / t.chars_per_token))
        return Usage(prompt, cached, round(t.completion) if t.calls else 0)

    def bound(self, tier: str, prefix: str, tail: str, max_tokens: int) -> Usage:
        """The most a call will likely use, for reservations: the prompt forecast with a 10%
        margin and no cache credit (one token per character until the tier's ratio is learnt:
        a byte-level BPE never spends more on ASCII), and the whole completion budget."""
        t = self._tier(tier)
        chars = len(prefix) + len(tail)
        prompt = chars if not t.calls else math.ceil(chars / t.chars_per_token * 1.1) + 8
        return Usage(prompt, 0, max_tokens)

    def observe(self, tier: str, prefix: str, tail: str, usage: Usage, key: str = "") -> None:
        """Learn from a call's actual usage (a failed call that used nothing teaches nothing)."""
        t = self._tier(tier)
        if usage.prompt_tokens:
            ratio = (len(prefix) + len(tail)) / usage.prompt_tokens
            t.chars_per_token = ratio if not t.calls else (1 - _ALPHA) * t.chars_per_token + _ALPHA * ratio
            t.completion = usage.completion_tokens if not t.calls else \
                (1 - _ALPHA) * t.completion + _ALPHA * usage.completion_tokens
            t.calls += 1
        t.last[key] = (len(prefix), _digest(prefix))
        t.last.move_to_end(key)
        if len(t.last) > self.max_keys:
            t.last.popitem(last=False)

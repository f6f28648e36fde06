"""Drafts for speculative decoding: tokens proposed without a second model, verified in one step.

A greedy row's next few tokens are guessed on the host, then `step.decode` feeds the row its
pending token and the guesses in one model call and keeps the longest prefix the model itself
would have chosen (`step.verify`), so the output is the same as decoding one token at a time.
Two sources of guesses:

* **prompt lookup** (`lookup`): the row's last n tokens (n = 3, 2, 1) are looked for earlier in
  its prompt + output, and the tokens that followed the most recent match are proposed (the idea
  behind transformers' `prompt_lookup_num_tokens`). A decision copies field names, values and
  phrases from the events in its prompt, so such runs repeat. Negative ids (embedding stand-ins,
  `rows.Row.keyed`) are never proposed.
* **grammar fast-forward**: for a constrained row, on a fork of its constraint state, wherever
  the grammar forces the next tokens (`compute_ff_tokens`: `","severity":"` after an action)
  those are the draft; elsewhere the lookup's token, only if the grammar allows it. The fork
  also gives each position's allowed-token mask for the verify step.

Adaptive lookahead: each row keeps an EMA of how many of its lookup drafts were accepted
(forced tokens do not count) and drafts k lookup tokens where `rate**k >= min_gain`, so a row
whose guesses keep failing drafts nothing (and probes with one token every `probe_every`
steps). Batch load decides how much of that is verified: a verify step of B rows and T
tokens each costs about 1 + B*(T-1)/`double_at` decode steps (memory-bound at batch 1, so
extra tokens are nearly free; compute-bound at batch 32, so they are not), and `verify_len`
picks the T (1: a plain step) with the most expected tokens per cost, counting a forced
token as sure and a lookup token as accepted at its row's rate. `spec_tokens` caps B*T
outright (it also bounds the shapes warm-up traces). Sampled rows (temperature > 0) never
draft: accepting a draft needs a deterministic choice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .rows import Row

__all__ = ["Draft", "SpecStats", "Speculation", "draft", "lookahead", "lookup", "observe", "plan", "rate",
           "verify_len"]


@dataclass(frozen=True)
class Speculation:
    """Settings of speculative decoding (`Generator(speculate=Speculation())`).

    `k_max`: most tokens drafted per row and step; `spec_tokens`: most B*T of one verify step;
    `double_at`: the extra tokens B*(T-1) that make a verify step cost about two decode steps
    (the cost model; measured ~64 for the `small` preset on CPU, higher on an accelerator);
    `buckets`: the verify T's (each traced once per batch and cache bucket); `ngram`: longest
    n-gram looked up; `adaptive` False drafts k_max lookup tokens whenever the lookup finds
    any and verifies them all (fixed lookahead, no cost model); `smoothing`: the EMA's weight of the newest step; `min_gain`: the
    k-th lookup token is drafted only if rate**k reaches it; `probe_every`: steps between
    one-token probes of a row drafting nothing; `prior`: a new row's rate."""

    k_max: int = 7
    spec_tokens: int = 256
    double_at: float = 64.0
    buckets: tuple[int, ...] = (2, 4, 8, 16)
    ngram: int = 3
    adaptive: bool = True
    smoothing: float = 0.3
    min_gain: float = 0.3
    probe_every: int = 16
    prior: float = 1.0

    def __post_init__(self):
        if not (self.k_max >= 1 and self.ngram >= 1 and self.buckets and min(self.buckets) >= 2
                and 0 < self.smoothing <= 1 and 0 < self.min_gain < 1 and self.probe_every >= 1
                and 0 <= self.prior <= 1 and self.double_at > 0):
            msg = (f"Speculation: need k_max >= 1, ngram >= 1, buckets >= 2, 0 < smoothing <= 1, "
                   f"0 < min_gain < 1, probe_every >= 1, 0 <= prior <= 1 and double_at > 0; got {self}")
            raise ValueError(msg)
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))

    def max_len(self, B: int) -> int:
        """The longest verify T allowed at batch B (B*T <= spec_tokens); 1: no speculation."""
        top = next((T for T in self.buckets if T > self.k_max), self.buckets[-1])  # k_max + 1 fits
        ok = [T for T in self.buckets if T <= top and B * T <= self.spec_tokens]
        return max(ok, default=1)


@dataclass
class SpecStats:
    """Counters over a generator's life. `steps`: verify steps; `plain`: plain decode steps
    taken while speculation was on; `row_steps`: rows decoded by verify steps; `tokens`:
    tokens those rows gained (accepted drafts + 1 each); `drafted` / `accepted`: lookup
    drafts proposed / accepted; `forced` / `forced_accepted`: the same for forced tokens."""

    steps: int = 0
    plain: int = 0
    row_steps: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    forced: int = 0
    forced_accepted: int = 0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["acceptance"] = self.accepted / self.drafted if self.drafted else 0.0
        out["forced_acceptance"] = self.forced_accepted / self.forced if self.forced else 0.0
        out["tokens_per_row_step"] = self.tokens / self.row_steps if self.row_steps else 0.0
        return out


@dataclass
class Draft:
    """A row's guesses: `tokens` d1..dk, `forced[i]` whether d_i came from the grammar, and for
    a constrained row `masks` [k+1] bool [V]: the allowed tokens after the pending token and
    after each draft (None for an unconstrained row)."""

    tokens: list[int]
    forced: list[bool]
    masks: list[np.ndarray] | None

    def cut(self, n: int) -> Draft:
        """The first n drafts (and their masks)."""
        return Draft(self.tokens[:n], self.forced[:n], None if self.masks is None else self.masks[: n + 1])


def verify_len(spec: Speculation, B: int, drafts: list[tuple[Draft, float]]) -> int:
    """The verify step's T for a batch of B slots whose live rows drafted `drafts` (each with
    its row's acceptance rate): the bucket, or 1 (a plain step), with the most expected tokens
    per cost (see the module docstring); without `adaptive`, the bucket that fits every draft."""
    n = max((len(d.tokens) for d, _ in drafts), default=0)
    if not n:
        return 1
    if not spec.adaptive:
        return next(T for T in spec.buckets if T > n)
    chances = []  # each row: the chance that its first i drafts are all accepted, i = 1..
    for d, rate in drafts:
        c, p = [], 1.0
        for forced in d.forced:
            p *= 1.0 if forced else rate
            c.append(p)
        chances.append(c)
    best, best_T = len(drafts), 1
    for T in spec.buckets:
        gain = sum(1 + sum(c[: T - 1]) for c in chances) / (1 + B * (T - 1) / spec.double_at)
        if gain > best:
            best, best_T = gain, T
        if T > n:  # every draft fits: longer is padding
            break
    return best_T


def lookup(ctx: np.ndarray, ngram: int) -> int | None:
    """The index in ctx of the token that followed the most recent earlier occurrence of ctx's
    last n tokens (n = ngram, ..., 1, longest first); None when there is none."""
    L = len(ctx)
    for n in range(min(ngram, L - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ctx[: L - 1], n)  # start j, follower j+n
        hits = np.flatnonzero((windows == ctx[L - n :]).all(axis=1))
        if hits.size:
            return int(hits[-1]) + n
    return None


def lookahead(spec: Speculation, rate: float) -> int:
    """Lookup tokens to draft at acceptance rate `rate`: the largest k <= k_max with
    rate**k >= min_gain (the k-th draft is reached and accepted that often)."""
    if not spec.adaptive:
        return spec.k_max
    k = 0
    while k < spec.k_max and rate ** (k + 1) >= spec.min_gain:
        k += 1
    return k


def plan(spec: Speculation, row: Row) -> int:
    """This step's lookup budget for a live row (0 for sampled rows); counts a row's idle steps
    and probes with one token every `probe_every` of them."""
    if row.req.temperature > 0:
        return 0
    k = lookahead(spec, rate(spec, row))
    if k:
        row.spec_idle = 0
        return k
    row.spec_idle += 1
    if row.spec_idle >= spec.probe_every:
        row.spec_idle = 0
        return 1
    return 0


def observe(spec: Speculation, row: Row, drafted: int, accepted: int) -> None:
    """Fold one verify step's lookup drafts (those the model judged) into the row's EMA."""
    if drafted:
        r = rate(spec, row)
        row.spec_rate = r + spec.smoothing * (accepted / drafted - r)


def rate(spec: Speculation, row: Row) -> float:
    """The row's acceptance EMA (`prior` until it has drafted)."""
    return spec.prior if row.spec_rate is None else row.spec_rate


def draft(spec: Speculation, row: Row, limit: int, k_lookup: int, eos_ids: frozenset[int]) -> Draft:
    """Up to `limit` draft tokens for a live row whose pending token was just accepted, at most
    `k_lookup` of them from the lookup (see the module docstring)."""
    c = row.req.constraint
    state = c.fork(row.state) if c is not None and row.state is not None else None
    masks = [c.mask(state)] if state is not None else None
    ctx = list(row.keyed) + row.out
    tokens: list[int] = []
    forced: list[bool] = []
    follow: int | None = None  # where in ctx the lookup's continuation goes on
    used = 0
    while len(tokens) < limit:
        ff = state.matcher.compute_ff_tokens() if state is not None else []
        if ff:
            t, is_forced = int(ff[0]), True
            if not masks[-1][t]:  # the tokenizer's spelling of forced bytes is not allowed as is
                break
        else:
            if used >= k_lookup:
                break
            if follow is None:
                follow = lookup(np.asarray(ctx, np.int64), spec.ngram)
            if follow is None or ctx[follow] < 0 or (masks is not None and not masks[-1][ctx[follow]]):
                break
            t, is_forced = int(ctx[follow]), False
            used += 1
        if t in eos_ids:  # the row may end here: the verify step's own choice decides, under the
            break  # last position's mask (a drafted EOS would leave the position after it unmasked)
        follow = follow + 1 if follow is not None and ctx[follow] == t else None
        tokens.append(t)
        forced.append(is_forced)
        ctx.append(t)
        if state is not None:
            c.advance(state, t)
            masks.append(c.mask(state))
            if c.is_done(state):
                break
    return Draft(tokens, forced, masks)

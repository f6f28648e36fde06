"""Slot bookkeeping: the batch of rows decoding together, the rows joining it, and the
shape buckets both are rounded up to (so a warmed-up generator never traces again).

A `Batch` holds contiguous caches (`kvcache` layouts), one slot per row, and each slot's page
table row, pending token and sampling settings; a `Join` holds the rows being prefilled in a
batch of their own before they are inserted into free slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from .rows import Row

__all__ = ["Batch", "Join", "bucket", "held", "length_buckets"]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    msg = f"{n} is larger than the largest bucket {buckets[-1]}"
    raise ValueError(msg)


def length_buckets(max_len: int, page_size: int = 64) -> tuple[int, ...]:
    """Cache lengths: page_size times 1, 1.5, 2, 3, 4, 6, 8, ... (padding waste under 50%),
    capped by and including max_len rounded down to a page."""
    top = max_len // page_size * page_size
    out = {top}
    for k in itertools.count():
        for f in (2, 3):
            n = page_size * f * 2**k // 2
            if n >= page_size and n % page_size == 0 and n < top:
                out.add(n)
        if page_size * 2**k >= top:
            break
    return tuple(sorted(out))



@dataclass(eq=False)
class Batch:
    """The rows decoding together. Slot b of the caches holds rows[b]; None is a free slot
    (its cache row is junk, its table row the scratch page). Per-slot sampling settings live
    on the host (numpy) with device copies in `dev`."""

    rows: list[Row | None]
    S: int
    table: np.ndarray  # [B, S/P] the pages of each slot's session
    k: Any = None
    v: Any = None
    tok: Any = None  # [B] each slot's latest sampled token, not yet taken by its row
    logprob: Any = None  # [B] its log-probability
    pos: Any = None  # [B] its position (where its K/V go when it is fed back)
    seeds: np.ndarray = None  # type: ignore[assignment]
    temps: np.ndarray = None  # type: ignore[assignment]
    top_ps: np.ndarray = None  # type: ignore[assignment]
    dev: tuple = ()
    greedy_only: bool = True
    slack: int = 0  # consecutive steps the live rows would have fit a smaller layout

    @classmethod
    def empty(cls, B: int, S: int, page_size: int) -> Batch:
        return cls([None] * B, S, np.zeros((B, S // page_size), np.int32), tok=np.zeros(B, np.int32),
                   logprob=np.zeros(B, np.float32), pos=np.zeros(B, np.int32), seeds=np.zeros(B, np.uint32),
                   temps=np.zeros(B, np.float32), top_ps=np.ones(B, np.float32))

    @property
    def live(self) -> list[Row]:
        return [r for r in self.rows if r is not None and r.finish is None]

    @property
    def free(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is None]

    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Writable host copies of tok, logprob, pos."""
        return tuple(np.array(a) for a in (self.tok, self.logprob, self.pos))  # type: ignore[return-value]

    def sync(self) -> None:
        """After the host-side settings changed: device copies and the greedy-only flag.
        Copies, because on CPU a jitted call may read a numpy argument in place, later."""
        self.dev = tuple(jnp.asarray(a.copy()) for a in (self.seeds, self.temps, self.top_ps))
        self.greedy_only = not any(r is not None and r.finish is None and r.req.temperature > 0
                                   for r in self.rows)


@dataclass(eq=False)
class Join:
    """Rows joining the batch: prefilled in a batch of their own, a chunk per decode step of
    the running rows (so a long prompt does not stall them), then inserted into free slots."""

    rows: list[Row]
    S: int
    table: np.ndarray  # [Bn, S/P]
    k: Any
    v: Any
    pos: np.ndarray  # [Bn] where each row's next prompt token goes
    todo: list[list[int]]  # each row's prompt tokens not yet prefilled
    logits: Any = None


def held(batch: Batch | None, join: Join | None) -> list[Row]:
    """Every row with pinned pages: in the batch's slots or joining it."""
    return ([r for r in batch.rows if r is not None] if batch else []) + (join.rows if join else [])


"""KV sessions: one per stream key, kept in a paged pool on device, spilled to host, then dropped.

Layout. K and V live in two pool arrays, K [L, N+1, Hkv, D, P] and V [L, N+1, Hkv, P, D],
allocated once: N pages of P tokens (P = `page_size`, 64 by default) plus page 0, a scratch
page that padding reads and writes. A session is the list of token ids whose K/V are valid and the pages that hold them, in order.

Why pages rather than one array per session or one max-length slot per session: the pool is one
allocation whose size is the byte cap, a session costs its length rounded up to a page (not the
longest context), and moving rows between the pool and a batch is one gather and one scatter
whose shapes depend only on the batch's (B, S) bucket, so they compile once per bucket. The
decoder itself runs on contiguous batch caches (laid out by `kvcache`, which owns both layouts) gathered from the
pages at the start of a round and scattered back at its end (one copy each way per engine call, not per step).

Matching. A prompt reuses the longest common prefix of its tokens and the session's cached
tokens (at most all but its last token, whose logits the caller needs); from the first token
that differs on, it is recomputed.

Eviction is LRU over keys, fair between namespaces. A key `SPACE\x1fNAME` is session NAME of
namespace SPACE (`ponder serve-model` makes one per API key and `cache_salt`); a plain key is in
namespace ''. When pages run out, sessions not in the current round are copied to host memory
(numpy) and their pages freed, least recently used first, but one namespace never pushes out
another that holds no more than its share (the pool's pages over the namespaces holding pages,
the asking one included): a namespace that would pass its share spills its own sessions first,
then those of namespaces over their share, and its own again after that. Host memory, under its
own cap, is shared the same way: past the cap, host sessions are dropped by the same rule. A
host session is copied back to fresh pages when its key returns; a dropped one is recomputed from
scratch. With one namespace this is plain LRU.

Host form. `host_kv` says how a spilled session is kept (`kvcache.HOST_KV`): "int8" (the
default) or "int4" quantise its pages on the device before the copy and dequantise them on the
device when it returns (kvcache says how and bounds the error), "none" copies them exactly.
Host bytes (`host_used`, the cap, the fair share, `usage()`) count what is really stored: the
quantised values and their float32 scales. A float32 page of one head, P x D = 64 x 64, is
16384 bytes; int8 keeps 2 x 4096 + (64 + 64) x 4 = 8704 for K and V together of 32768 (0.266,
so a host cap holds 3.76x the sessions), int4 2 x 2048 + (128 + 128) x 4 = 5120 (0.156, 6.4x).
A restored session is then close, not bit-exact: tests/test_kv_quant.py bounds the next-token
logits it gives on the `tiny` model: measured max |Δ logit| 4.9e-4 for int8 (asserted <= 2e-3,
and greedy generations unchanged), 9.3e-3 for int4 (asserted <= 4e-2).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .compiles import TRACES, counted_jit  # noqa: F401 - re-exported
from .config import ModelConfig
from .kvcache import (
    HOST_KV,
    gather_k,
    gather_v,
    pack_pages,
    read_pages,
    scatter_k,
    scatter_row,
    scatter_v,
    unpack_pages,
    write_pages,
)

__all__ = ["SPACE_SEP", "TRACES", "PoolFull", "Session", "SessionPool", "common_prefix", "counted_jit",
           "space_of"]

SPACE_SEP = "\x1f"  # "SPACE\x1fNAME": session NAME of namespace SPACE

def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def space_of(key: str) -> str:
    """The namespace a session key names before SPACE_SEP ('' for a plain key)."""
    space, sep, _ = key.partition(SPACE_SEP)
    return space if sep else ""


class PoolFull(RuntimeError):
    """Not enough free pages, even after spilling every session outside the current round."""


@dataclass(eq=False)
class Session:
    key: str
    space: str = ""  # its namespace: space_of(key)
    tokens: list[int] = field(default_factory=list)  # ids whose K/V are valid, position order
    pages: list[int] = field(default_factory=list)  # device pages, when on device
    # when on host: K, V pages [L, n, ...] ("none"), or K q, K scales, V q, V scales
    host: tuple[np.ndarray, ...] | None = None

    @property
    def where(self) -> str:
        return "host" if self.host is not None else "device"

    @property
    def host_bytes(self) -> int:
        return sum(a.nbytes for a in self.host) if self.host is not None else 0


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class SessionPool:
    """Paged K/V for many sessions under a device byte cap, spilling to host under a host cap.

    A round of generation calls `acquire` for each of its sessions (which pins them), `gather`
    to build the batch cache, then `scatter` and `release` for each.
    """

    def __init__(self, cfg: ModelConfig, dtype, *, device_bytes: int, host_bytes: int,
                 page_size: int = 64, host_kv: str = "int8") -> None:
        if host_kv not in HOST_KV:
            msg = f"SessionPool: host_kv={host_kv!r} is not one of {', '.join(map(repr, HOST_KV))}"
            raise ValueError(msg)
        if host_kv == "int4" and page_size % 2:
            msg = f"SessionPool: host_kv='int4' packs pairs of tokens, so page_size={page_size} must be even"
            raise ValueError(msg)
        self.cfg, self.dtype, self.page_size = cfg, jnp.dtype(dtype), page_size
        self.host_kv = host_kv  # how spilled sessions are stored on the host
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.page_bytes = 2 * L * page_size * H * D * self.dtype.itemsize  # K and V
        self.num_pages = device_bytes // self.page_bytes
        if self.num_pages < 1:
            msg = f"SessionPool: device_bytes={device_bytes} holds no page of {self.page_bytes} bytes"
            raise ValueError(msg)
        self._k_shape = (L, self.num_pages + 1, H, D, page_size)
        self._v_shape = (L, self.num_pages + 1, H, page_size, D)
        self.k = self.v = None
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()
        self.host_used = 0
        self.stats = Counter()  # hits, spilled, restored, dropped
        self.reset()

    def reset(self) -> None:
        """Forget every session and zero the pool (also the way back from a failed scatter)."""
        self.k = jnp.zeros(self._k_shape, self.dtype)
        self.v = jnp.zeros(self._v_shape, self.dtype)
        self._free = list(range(self.num_pages, 0, -1))  # pop() hands out low pages first
        self._sessions.clear()
        self._pinned.clear()
        self.host_used = 0

    # -- queries ------------------------------------------------------------------------------

    def where(self, key: str) -> str | None:
        """'device', 'host', or None (no session: never seen, released empty, or dropped)."""
        s = self._sessions.get(key)
        return s.where if s else None

    def tokens(self, key: str) -> list[int]:
        s = self._sessions.get(key)
        return list(s.tokens) if s else []

    def keys(self) -> list[str]:
        """Session keys, least recently used first."""
        return list(self._sessions)

    def usage(self) -> dict[str, int]:
        on_device = sum(1 for s in self._sessions.values() if s.host is None)
        return {"device_sessions": on_device, "host_sessions": len(self._sessions) - on_device,
                "device_bytes": (self.num_pages - len(self._free)) * self.page_bytes,
                "host_bytes": self.host_used}

    # -- a round ------------------------------------------------------------------------------

    def acquire(self, key: str, prompt: list[int], capacity: int) -> int:
        """Pin `key`'s session for this round with room for `capacity` tokens, keeping the cached
        prefix `prompt` shares (all but its last token at most). Returns that prefix's length.
        Raises PoolFull, leaving the session unpinned, if the pages cannot be found."""
        need = -(-capacity // self.page_size)
        if need > self.num_pages:
            msg = (f"session {key!r} needs {need} pages of {self.page_size} tokens for {capacity} "
                   f"tokens, but the pool has {self.num_pages} (raise the session cap)")
            raise PoolFull(msg)
        s = self._sessions.get(key)
        if s is None:
            s = self._sessions[key] = Session(key, space_of(key))
        self._sessions.move_to_end(key)
        n = common_prefix(s.tokens, prompt[: max(len(prompt) - 1, 0)])
        s.tokens = s.tokens[:n]
        self.stats["hits"] += n > 0
        self._pinned.add(key)
        try:
            if s.host is None:
                if len(s.pages) > need:
                    self._free.extend(reversed(s.pages[need:]))
                    del s.pages[need:]
                s.pages += self._allocate(need - len(s.pages), s.space)
            else:
                self._restore(s, need)
        except PoolFull:
            self._pinned.discard(key)  # what it holds stays valid for a later round
            if not s.tokens and s.host is None:
                self.drop(key)
            raise
        return n

    def table(self, keys: list[str], B: int, S: int) -> np.ndarray:
        """int32 [B, S/P]: row b lists the pages of keys[b], padded with the scratch page."""
        t = np.zeros((B, S // self.page_size), np.int32)
        for b, key in enumerate(keys):
            pages = self._sessions[key].pages
            t[b, : len(pages)] = pages
        return t

    def gather(self, table: np.ndarray):
        """The batch caches K [L, B, Hkv, D, S], V [L, B, Hkv, S, D] for a table."""
        return gather_k(self.k, table), gather_v(self.v, table)

    def scatter(self, table: np.ndarray, k, v) -> None:
        """Write the batch caches back into the table's pages."""
        try:
            self.k = scatter_k(self.k, table, k)
            self.v = scatter_v(self.v, table, v)
        except Exception:
            self.reset()  # the donated pool is gone
            raise

    def scatter_row(self, pages: np.ndarray, k, v, slot: int) -> None:
        """Write one row of the batch caches (slot `slot`, pages `pages`) back into the pool."""
        try:
            self.k, self.v = scatter_row(self.k, self.v, pages, k, v, np.int32(slot))
        except Exception:
            self.reset()
            raise

    def release(self, key: str, tokens: list[int]) -> None:
        """Unpin `key`, recording the tokens whose K/V its pages now hold; trim unused pages."""
        self._pinned.discard(key)
        s = self._sessions.get(key)
        if s is None:
            return
        s.tokens = list(tokens)
        keep = -(-len(tokens) // self.page_size)
        self._free.extend(reversed(s.pages[keep:]))
        del s.pages[keep:]
        if not tokens:
            self.drop(key)

    def drop(self, key: str) -> None:
        """Forget a session, freeing its pages or host memory."""
        s = self._sessions.pop(key, None)
        self._pinned.discard(key)
        if s is None:
            return
        self._free.extend(reversed(s.pages))
        self.host_used -= s.host_bytes

    # -- spilling -----------------------------------------------------------------------------

    def _allocate(self, n: int, space: str) -> list[int]:
        """`n` free pages for a session of `space`, spilling what the fair share allows."""
        # decide before spilling anything: a request that cannot get its pages now must not
        # push idle sessions off the device (and others off the host) for nothing
        victims = self._victims(n, space)
        if victims is None:
            msg = (f"need {n} free pages, have {len(self._free)} of {self.num_pages}; the rest hold "
                   f"sessions in use by this round or within another namespace's share")
            raise PoolFull(msg)
        for victim in victims:
            self._spill(victim, space)
        return [self._free.pop() for _ in range(n)]

    def _victims(self, n: int, space: str) -> list[Session] | None:
        """The device sessions to spill, in order, so that `space` gets `n` free pages (None:
        not possible now). See Eviction in the module docstring."""
        free = len(self._free)
        if free >= n:
            return []
        held: Counter[str] = Counter()
        for s in self._sessions.values():
            if s.host is None:
                held[s.space] += len(s.pages)
        share = self.num_pages // len({sp for sp, h in held.items() if h} | {space})
        idle = [s for k, s in self._sessions.items() if s.host is None and s.pages and k not in self._pinned]
        out = []
        while free < n:
            own = next((s for s in idle if s.space == space), None)
            victim = own if held[space] + n > share else None
            if victim is None:  # another namespace's, only while it holds more than its share
                victim = next((s for s in idle if s.space != space and held[s.space] > share), own)
            if victim is None:
                return None
            idle.remove(victim)
            out.append(victim)
            free += len(victim.pages)
            held[victim.space] -= len(victim.pages)
        return out

    def _host_victim(self, space: str) -> Session | None:
        """The host session to drop when `space`'s spill passed the host cap (the same rule)."""
        held: Counter[str] = Counter()
        for s in self._sessions.values():
            if s.host is not None:
                held[s.space] += s.host_bytes
        share = self.host_bytes // len({sp for sp, h in held.items() if h} | {space})
        idle = [s for k, s in self._sessions.items() if s.host is not None and k not in self._pinned]
        own = next((s for s in idle if s.space == space), None)
        if own is not None and held[space] > share:
            return own
        return next((s for s in idle if s.space != space and held[s.space] > share), own)

    def _spill(self, s: Session, space: str) -> None:
        """Device -> host: copy the pages that hold valid tokens, free them all (for `space`)."""
        used = -(-len(s.tokens) // self.page_size)
        pages, s.pages = s.pages, []
        self._free.extend(reversed(pages))
        if used == 0:
            self.drop(s.key)
            return
        idx = np.zeros(_pow2(used), np.int32)
        idx[:used] = pages[:used]
        if self.host_kv == "none":
            parts = read_pages(self.k, idx), read_pages(self.v, idx)
        else:  # quantised on the device: only the small form is copied
            parts = pack_pages[self.host_kv](self.k, self.v, idx, np.int32(len(s.tokens)))
        # a copy of just the used pages: a view would keep the padded array alive, uncounted
        s.host = tuple(a[:, :used].copy() if len(idx) > used else a for a in map(np.asarray, parts))
        self.host_used += s.host_bytes
        self.stats["spilled"] += 1
        while self.host_used > self.host_bytes:
            victim = self._host_victim(space)
            if victim is None:  # only sessions being restored are left: they free their bytes soon
                break
            self.drop(victim.key)
            self.stats["dropped"] += 1

    def _restore(self, s: Session, need: int) -> None:
        """Host -> device: fresh pages, the first of them filled from host memory."""
        # its host bytes are about to be freed: a spill that allocating triggers must not drop
        # another host session to make room for them
        self.host_used -= s.host_bytes
        try:
            pages = self._allocate(need, s.space)  # PoolFull: the session stays on host
        except PoolFull:
            self.host_used += s.host_bytes
            raise
        parts = s.host
        used = -(-len(s.tokens) // self.page_size)  # tokens were already cut to the match
        s.host, s.pages = None, pages
        self.stats["restored"] += 1
        if used == 0:
            return
        n = _pow2(used)
        idx = np.zeros(n, np.int32)
        idx[:used] = s.pages[:used]
        pad = [(0, 0), (0, n - used)] + [(0, 0)] * 3
        parts = [np.pad(a[:, :used], pad[: a.ndim]) for a in parts]
        if self.host_kv == "none":
            self.k = write_pages(self.k, idx, parts[0])
            self.v = write_pages(self.v, idx, parts[1])
        else:
            self.k, self.v = unpack_pages(self.k, self.v, idx, *parts)

    def warm_moves(self) -> None:
        """Trace the spill and restore copies of `host_kv`'s form for every page count they
        use (powers of two up to the pool's pages), on the scratch page."""
        L = self.cfg.num_hidden_layers
        for e in range(math.ceil(math.log2(self.num_pages)) + 1):
            idx = np.zeros(2**e, np.int32)
            if self.host_kv == "none":
                for name in ("k", "v"):  # their page shapes differ
                    arr = getattr(self, name)
                    read_pages(arr, idx)
                    setattr(self, name, write_pages(arr, idx, np.zeros((L, 2**e, *arr.shape[2:]), self.dtype)))
            else:
                parts = pack_pages[self.host_kv](self.k, self.v, idx, np.int32(0))
                self.k, self.v = unpack_pages(self.k, self.v, idx, *(np.zeros(a.shape, a.dtype) for a in parts))
        jax.block_until_ready((self.k, self.v))


"""Per-key frame reuse: the vision features of the images each session key has sent.

A camera key sends the same frame again and again (a static scene); encoding it through the
vision tower every time is the image's whole cost. `FrameCache` keeps each key's encoded
frames, named by (session key, the file's sha256), bounded by `cap_bytes` of features and
dropped least recently used first:

* exact: a frame byte-identical to one the key already sent takes that frame's features (no
  tower call), and its digest names the prompt's image positions as before, so the key's KV
  session reuses the image's cached K/V too;
* near-identical (`near_identical` grey levels, None: exact only): a frame whose fingerprint
  (ponder/images.py) is within the threshold of the key's last encoded frame of that field takes
  that frame's features AND its digest, so the prompt is the one already cached. The last
  encoded frame stays the reference until a frame beyond the threshold is encoded: slow drift
  cannot creep past the threshold one small step at a time.

Never across keys: an entry is found only under the key that sent it (a session key already
holds its tenant and namespace), and a request without a session key caches nothing. Not
thread-safe: the engine calls it from its one worker thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ponder.images import Image

from .rows import Embeds

__all__ = ["FrameCache", "FrameJob", "FrameStats"]


@dataclass(frozen=True)
class FrameJob:
    """A request's images to turn into Embeds: image i at prompt position starts[i], cached
    under `key` (None: not cached)."""

    key: str | None
    images: Sequence[Image]
    starts: Sequence[int]


@dataclass
class FrameStats:
    encoder_calls: int = 0  # vision-tower calls (each encodes a batch of frames)
    frames_encoded: int = 0
    hits: int = 0  # byte-identical frames of the same key
    near_hits: int = 0  # near-identical frames of the same key
    encode_seconds: float = 0.0  # decoding, preprocessing and the tower, for frames encoded
    evicted: int = 0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    features: np.ndarray
    lasts: set = field(default_factory=set)  # the (key, field)s whose last frame this is


@dataclass
class _Last:
    digest: str
    fingerprint: bytes


class FrameCache:
    """See the module docstring. `embeds(jobs, prepare, encode)` is the one entry point."""

    def __init__(self, cap_bytes: int = 64 << 20, near_identical: int | None = None) -> None:
        if isinstance(cap_bytes, bool) or not isinstance(cap_bytes, int) or cap_bytes < 0:
            msg = f"frame_cache_bytes must be an int >= 0, got {cap_bytes!r}"
            raise ValueError(msg)
        t = near_identical
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 255):
            msg = f"near_identical must be None or an int of grey levels in [0, 255], got {t!r}"
            raise ValueError(msg)
        self.cap_bytes, self.near_identical = cap_bytes, near_identical
        self.entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # (key, digest), LRU first
        self.last: dict[tuple[str, str], _Last] = {}  # (key, field) -> its last encoded frame
        self.bytes = 0
        self.stats = FrameStats()

    def __len__(self) -> int:
        return len(self.entries)

    def embeds(self, jobs: Sequence[FrameJob], prepare: Callable[[Image], np.ndarray],
               encode: Callable[[np.ndarray], np.ndarray], max_frames: int = 16) -> list[list[Embeds] | str]:
        """Each job's Embeds, or why its images cannot be used. `prepare(image)` gives one
        image's pixels (ValueError for a bad one), `encode(pixels [N, ...])` the features
        [N, tokens, E] of the frames missing from the cache, at most `max_frames` a call (a
        burst of cameras must not become one tower batch of any size: memory, and a new
        compile)."""
        out: list[list[Embeds] | str | None] = [None] * len(jobs)
        found: list[list[tuple[np.ndarray, str] | None]] = []
        misses: dict[Any, int] = {}  # what to encode -> its row in the batch
        pixels, todo = [], []  # todo: (job index, image index, batch row)
        for j, job in enumerate(jobs):
            row: list[tuple[np.ndarray, str] | None] = []
            for k, img in enumerate(job.images):
                hit = self._lookup(job.key, img)
                row.append(hit)
                if hit is not None or out[j] is not None:
                    continue
                # a key's duplicate frames in one call are encoded once; no key, no sharing
                ident = (job.key, img.digest) if job.key is not None else (j, k)
                if ident not in misses:
                    t0 = time.perf_counter()
                    try:
                        pixels.append(prepare(img))
                    except (ValueError, OSError) as e:
                        out[j] = f"image {k} ({img.field}): {e}"
                        continue
                    finally:
                        self.stats.encode_seconds += time.perf_counter() - t0
                    misses[ident] = len(pixels) - 1
                todo.append((j, k, misses[ident]))
            found.append(row)
        if pixels:
            t0 = time.perf_counter()
            try:
                feats = np.concatenate([np.asarray(encode(np.stack(pixels[i : i + max_frames])))
                                        for i in range(0, len(pixels), max_frames)])
            except Exception as e:  # noqa: BLE001 - the tower failed: every job that needed it fails
                why = f"the vision encoder failed: {type(e).__name__}: {e}"
                for j, _, _ in todo:
                    out[j] = out[j] or why
                feats = None
            finally:
                self.stats.encode_seconds += time.perf_counter() - t0
            if feats is not None:
                self.stats.encoder_calls += -(-len(pixels) // max_frames)
                self.stats.frames_encoded += len(pixels)
                for j, k, b in todo:
                    job, img = jobs[j], jobs[j].images[k]
                    found[j][k] = (feats[b], img.digest)
                    if job.key is not None:
                        self._put(job.key, img, feats[b].copy())  # not a view: the batch is freed
        for j, job in enumerate(jobs):
            if out[j] is None:
                out[j] = [Embeds(s, f, d) for s, (f, d) in zip(job.starts, found[j])]
        return out  # type: ignore[return-value]

    def _lookup(self, key: str | None, img: Image) -> tuple[np.ndarray, str] | None:
        if key is None:
            return None
        entry = self.entries.get((key, img.digest))
        if entry is not None:
            self.entries.move_to_end((key, img.digest))
            self.stats.hits += 1
            return entry.features, img.digest
        last = self.last.get((key, img.field))
        if self.near_identical is None or last is None or not img.near(last.fingerprint, self.near_identical):
            return None
        entry = self.entries.get((key, last.digest))  # present: an evicted entry takes its lasts along
        if entry is None:
            return None
        self.entries.move_to_end((key, last.digest))
        self.stats.near_hits += 1
        return entry.features, last.digest

    def _put(self, key: str, img: Image, features: np.ndarray) -> None:
        where = (key, img.field)
        old = self.last.get(where)
        if old is not None and (entry := self.entries.get((key, old.digest))) is not None:
            entry.lasts.discard(where)
        size = features.nbytes
        if size > self.cap_bytes:  # would push out everything and still not fit: keep nothing
            self.last.pop(where, None)
            return
        entry = self.entries.get((key, img.digest))
        if entry is None:
            entry = self.entries[(key, img.digest)] = _Entry(features)
            self.bytes += size
        self.entries.move_to_end((key, img.digest))
        entry.lasts.add(where)
        self.last[where] = _Last(img.digest, img.fingerprint)
        while self.bytes > self.cap_bytes:
            (_, _), dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.features.nbytes
            self.stats.evicted += 1
            for w in dropped.lasts:
                self.last.pop(w, None)

"""Egress: the one door through which requests reach a remote engine.

Every engine that is not local (an http(s) server not marked trusted, or an Engine instance its
tier marks remote) is wrapped in `Egress` where engines are built (inference/registry.py for
servers, the pipeline's build for given instances), so no code path reaches it another way
(tests/test_privacy.py checks both). At this door:

1. a request whose key's context holds local-only data is refused: it is answered with an
   error and never sent (the router already keeps such keys off remote tiers; this is the
   guarantee, not the routing);
2. the session (tenant-scoped stream key) becomes a keyed HMAC pseudonym: the server still sees
   one stable id per key, for its prefix cache and `user` field, but never the key;
3. the tenant's prefix-cache namespace (`salt`) is set, a keyed HMAC of the tenant, so one
   tenant's requests can never hit, time or evict another's cached prefixes (vLLM
   `cache_salt`, `ponder serve-model`);
4. the tenant itself and a vote's sampling seed (derived from the decision id, so from the key)
   are replaced by keyed HMACs too: nothing the engine is handed names the tenant or the key.

5. a request carrying images (ponder/images.py) to a tier the pipeline's image policy keeps
   them from is refused, unsent (`IMAGES_REFUSED`): the reasoner already leaves them out for
   such a tier and says so in the trace; this is the guarantee, as for residency. Otherwise
   images pass as text does: what the privacy policy lets reach a remote tier, it may see.

The HMAC key is the pipeline's privacy key; without one, a random key per process (pseudonyms
then change when the process restarts, which costs the server's cache, not privacy).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

import msgspec

from ponder.inference.engine import Completion, Engine, Request
from ponder.types import Usage

__all__ = ["Egress", "REFUSED", "IMAGES_REFUSED"]

REFUSED = "residency: this key's data is local-only and this tier is remote; not sent"
IMAGES_REFUSED = "images: this tier may not receive images (the pipeline's images.tiers); not sent"
_PROCESS_KEY = os.urandom(32)


class Egress:
    """A remote engine behind the privacy door (see the module docstring)."""

    local = False

    def __init__(self, inner: Engine, key: bytes | None = None, *, images: bool = True) -> None:
        if key is not None and not (isinstance(key, bytes) and key):
            msg = f"Egress key must be non-empty bytes or None, got {type(key).__name__}"
            raise TypeError(msg)
        self.inner, self.key = inner, key or _PROCESS_KEY
        self.name = inner.name
        self.refused = 0
        self.images = images  # whether requests may carry images through this door

    def pseudonym(self, text: str, purpose: str) -> str:
        return hmac.new(self.key, f"{purpose}\x1f{text}".encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()[:32]

    def _seed(self, seed: int | None) -> int | None:
        if seed is None:
            return None
        return int(self.pseudonym(str(seed), "seed")[:8], 16) >> 1  # 31 bits, like the reasoner's

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def generate(self, requests: Sequence[Request]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        sent, where = [], []
        for i, r in enumerate(requests):
            if r.local_only:
                self.refused += 1
                out[i] = Completion("", Usage(), "", "error", REFUSED)
                continue
            if r.images and not self.images:
                self.refused += 1
                out[i] = Completion("", Usage(), "", "error", IMAGES_REFUSED)
                continue
            sent.append(msgspec.structs.replace(
                r, session=self.pseudonym(r.session, "session"), salt=self.pseudonym(r.tenant, "salt"),
                tenant=self.pseudonym(r.tenant, "tenant"), seed=self._seed(r.seed),
                request_id=self.pseudonym(r.request_id, "request") if r.request_id else ""))
            where.append(i)
        if sent:
            for i, c in zip(where, await self.inner.generate(sent)):
                out[i] = c
        return out  # type: ignore[return-value]

    def __getattr__(self, name: str):
        # the wrapped engine's own surface (profile, stats) stays readable through the door
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

"""Privacy: what of an event may reach a model, decided once, where the event enters a context.

A key's context is what every tier's prompt is rendered from, so the policy is applied to each
event *before* it is folded into the context, and to the gate's findings before they reach a
prompt or a decision's evidence: what the policy withholds is never in a prompt, a trace or an
exported decision, whichever tier answers. (The gate itself reads the raw event, in process.)

Per pipeline, overridable per tenant (`Privacy(default=Policy(...), tenants={"acme": Policy(...)})`):

* `FieldRule(match, action)`: for each payload field whose name matches the glob (the first
  rule that matches wins; unmatched fields are kept):
  `keep`; `drop` (the field is withheld); `mask` (present, value hidden: `"[masked]"`);
  `hash` (a keyed HMAC of tenant, field and value: equal values stay equal, so the model still
  sees repetition, and nobody without the key can reverse a small value space like an SSN);
  `coarsen` with `step` (numbers floored to a multiple of `step`, a `[lat, lon]` pair or a
  `{"lat", "lon"}` object to a grid of `step` degrees, an ISO-8601 time to a bucket of `step`
  seconds). `local_only=True` on a rule marks the field's presence as keeping the key local.
* `Policy(pii=...)`: PII kinds found inside string values (and field names) replaced by typed
  placeholders stable within the key (operators/pii.py); `pii=ALL` for every kind.
* Residency: `Policy(local_only=True)` for a tenant, `Privacy(local_keys=("plant-7-*",))` for
  keys, or a field rule's `local_only`. A key that has carried local-only data keeps its
  context local from then on (its context holds that data), so its requests go only to local
  tiers; the engine boundary refuses them for any other (inference/egress.py).

The HMAC key comes from the environment (`$PONDER_PRIVACY_KEY`, or a file named by
`$PONDER_PRIVACY_KEY_FILE`), never from the pipeline module.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import msgspec

from ponder.operators import pii as _pii
from ponder.types import Finding

__all__ = ["FieldRule", "Policy", "Privacy", "Applied", "privacy_key", "KEY_ENV", "KEY_FILE_ENV"]

KEY_ENV, KEY_FILE_ENV = "PONDER_PRIVACY_KEY", "PONDER_PRIVACY_KEY_FILE"
MASK = "[masked]"
_PROCESS_KEY = os.urandom(32)  # pseudonyms without a configured key: stable for this process
Action = Literal["keep", "drop", "mask", "hash", "coarsen"]


class FieldRule(msgspec.Struct, frozen=True):
    match: str
    action: Action = "keep"
    step: float | None = None
    local_only: bool = False

    def __post_init__(self) -> None:
        if self.action not in ("keep", "drop", "mask", "hash", "coarsen"):
            msg = f"FieldRule({self.match!r}): action must be keep, drop, mask, hash or coarsen, not {self.action!r}"
            raise ValueError(msg)
        if self.action == "coarsen" and not (self.step and self.step > 0 and math.isfinite(self.step)):
            msg = f"FieldRule({self.match!r}): coarsen needs a step > 0"
            raise ValueError(msg)


class Policy(msgspec.Struct, frozen=True):
    fields: tuple[FieldRule, ...] = ()
    pii: frozenset[str] = frozenset()
    local_only: bool = False
    region: str = _pii.DEFAULT_REGION  # phone numbers without a country code are read here

    def __post_init__(self) -> None:
        unknown = set(self.pii) - _pii.ALL
        if unknown:
            msg = f"Policy.pii: unknown kinds {sorted(unknown)}; known: {list(_pii.KINDS)}"
            raise ValueError(msg)

    def rule(self, name: str) -> FieldRule | None:
        for r in self.fields:
            if fnmatch.fnmatchcase(name, r.match):
                return r
        return None

    @property
    def needs_key(self) -> bool:
        return bool(self.pii) or any(r.action == "hash" for r in self.fields)


@dataclass(frozen=True)
class Applied:
    """What the policy did to one event: field -> action (`drop`, `pii:EMAIL`, …), no values."""

    changes: dict[str, str]
    local: bool


def privacy_key(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The HMAC key from the environment, or None when none is configured."""
    if environ.get(KEY_ENV):
        return environ[KEY_ENV].encode()
    path = environ.get(KEY_FILE_ENV)
    if path:
        try:
            data = open(path, "rb").read().strip()  # noqa: SIM115,PTH123 - a small secret file
        except OSError as e:
            msg = f"${KEY_FILE_ENV}={path!r} cannot be read: {e}"
            raise ValueError(msg) from e
        if not data:
            msg = f"${KEY_FILE_ENV}={path!r} is empty"
            raise ValueError(msg)
        return data
    return None


@dataclass
class Privacy:
    """A pipeline's privacy: a default policy, per-tenant overrides, local-only keys."""

    default: Policy = field(default_factory=Policy)
    tenants: Mapping[str, Policy] = field(default_factory=dict)
    local_keys: tuple[str, ...] = ()
    key: bytes | None = None  # the HMAC key; None: read from the environment at build

    def __post_init__(self) -> None:
        if self.key is None and self.needs_key:
            self.key = privacy_key()
            if self.key is None:
                msg = (f"this pipeline's privacy policy hashes values or replaces PII, which needs a secret "
                       f"key: set ${KEY_ENV} or ${KEY_FILE_ENV} (never put the key in the pipeline module)")
                raise ValueError(msg)

    @property
    def needs_key(self) -> bool:
        return self.default.needs_key or any(p.needs_key for p in self.tenants.values())

    @property
    def active(self) -> bool:
        return self.default != Policy() or bool(self.tenants) or bool(self.local_keys)

    def policy(self, tenant: str) -> Policy:
        return self.tenants.get(tenant, self.default)

    def pseudonym(self, key: str) -> str:
        """How prompts name a key: a keyed HMAC of the tenant-scoped key."""
        return "k-" + hmac.new(self.key or _PROCESS_KEY, key.encode("utf-8", "surrogatepass"),
                               hashlib.sha256).hexdigest()[:16]

    def key_is_local(self, tenant: str, key: str) -> bool:
        return self.policy(tenant).local_only or any(fnmatch.fnmatchcase(key, g) for g in self.local_keys)

    # -- applying ------------------------------------------------------------------------------

    def payload(self, tenant: str, payload: dict[str, Any], placeholders: _pii.Placeholders
                ) -> tuple[dict[str, Any], Applied]:
        """The payload a context may hold, and what was done to it."""
        p = self.policy(tenant)
        changes: dict[str, str] = {}
        local = False
        out: dict[str, Any] | None = None
        if p.fields:
            out = {}
            for name, v in payload.items():
                r = p.rule(name)
                if r is None:
                    out[name] = v
                    continue
                local = local or (r.local_only and v is not None)
                if r.action == "keep":
                    out[name] = v
                elif r.action != "drop":
                    out[name] = self._transform(r, tenant, name, v)
                if r.action != "keep":
                    changes[name] = r.action
        src = payload if out is None else out
        if p.pii:
            counts: dict[str, int] = {}
            scrubbed = _pii.scrub_value(src, placeholders, self.key or b"", p.pii, p.region, counts)
            if scrubbed is not src:
                for name, v in scrubbed.items() if isinstance(scrubbed, dict) else ():
                    if name not in src or src.get(name) != v:
                        changes.setdefault(name, "pii")
                changes.update({f"pii:{k}": str(n) for k, n in sorted(counts.items())})
                src = scrubbed
        return src, Applied(changes, local)

    def findings(self, tenant: str, findings: list[Finding], placeholders: _pii.Placeholders) -> list[Finding]:
        """The gate's findings as a prompt or a decision may show them: a withheld field's
        values removed, a transformed field's transformed, PII in them replaced."""
        p = self.policy(tenant)
        out = []
        for f in findings:
            r = p.rule(f.field) if p.fields else None
            if r is not None and r.action != "keep":
                if r.action in ("drop", "mask"):
                    f = msgspec.structs.replace(f, value=None, expected=None, detail="")
                else:
                    f = msgspec.structs.replace(f, value=self._transform(r, tenant, f.field, f.value),
                                                expected=self._transform(r, tenant, f.field, f.expected))
            if p.pii and isinstance(f.value, str | dict | list) or p.pii and f.detail:
                f = msgspec.structs.replace(
                    f, value=_pii.scrub_value(f.value, placeholders, self.key or b"", p.pii, p.region),
                    detail=_pii.scrub(f.detail, placeholders, self.key or b"", p.pii, p.region)[0])
            out.append(f)
        return out

    def _transform(self, r: FieldRule, tenant: str, name: str, v: Any) -> Any:
        if v is None:
            return None
        if r.action == "mask":
            return MASK
        if r.action == "hash":
            raw = msgspec.json.encode([tenant, name, v])
            return "h:" + hmac.new(self.key or _PROCESS_KEY, raw, hashlib.sha256).hexdigest()[:16]
        return _coarsen(v, r.step or 1.0)


def _coarsen(v: Any, step: float) -> Any:
    """A number to a multiple of `step`; a [lat, lon] pair or {"lat", "lon"} object to a grid
    of `step` degrees; an ISO-8601 time to a bucket of `step` seconds; anything else masked."""
    if isinstance(v, bool):
        return MASK
    if isinstance(v, int | float):
        if not math.isfinite(v):
            return v
        q = math.floor(v / step) * step
        return int(q) if float(step).is_integer() and isinstance(v, int) else round(q, 9)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return [_coarsen(x, step) for x in v]
    if isinstance(v, dict) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v.values()):
        return {k: _coarsen(x, step) for k, x in v.items()}
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return MASK
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        bucket = math.floor(t.timestamp() / step) * step
        return dt.datetime.fromtimestamp(bucket, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    return MASK

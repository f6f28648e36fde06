"""Privacy: what of an event may reach a model, decided once, where the event enters a context.

A key's context is what every tier's prompt is rendered from, so the policy is applied to each
event *before* it is folded into the context, and to the gate's findings before they reach a
prompt or a decision's evidence: what the policy withholds is never in a prompt, a trace or an
exported decision, whichever tier answers. (The gate itself reads the raw event, in process.)

Per pipeline, overridable per tenant (`Privacy(default=Policy(...), tenants={"acme": Policy(...)})`):

* `FieldRule(match, action)`: for each payload field whose name matches the glob (the first
  rule that matches wins; unmatched fields are kept):
  `keep`; `drop` (the field is withheld: a gate finding on it shows `[withheld]` for its
  name); `mask` (present, value hidden: `"[masked]"`);
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import phonenumbers

from ponder.operators import pii as _pii
from ponder.types import Finding

__all__ = ["FieldRule", "Policy", "Privacy", "Applied", "privacy_key", "KEY_ENV", "KEY_FILE_ENV"]

KEY_ENV, KEY_FILE_ENV = "PONDER_PRIVACY_KEY", "PONDER_PRIVACY_KEY_FILE"
MASK = "[masked]"
WITHHELD = "[withheld]"  # a dropped field's name, where a finding would show it
_PROCESS_KEY = os.urandom(32)  # pseudonyms without a configured key: stable for this process
Action = Literal["keep", "drop", "mask", "hash", "coarsen"]


class FieldRule(msgspec.Struct, frozen=True):
    match: str
    action: Action = "keep"
    step: float | None = None
    local_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            msg = f"FieldRule: match must be a non-empty field name or glob, got {self.match!r}"
            raise ValueError(msg)
        if self.action not in ("keep", "drop", "mask", "hash", "coarsen"):
            msg = f"FieldRule({self.match!r}): action must be keep, drop, mask, hash or coarsen, not {self.action!r}"
            raise ValueError(msg)
        if self.action == "coarsen" and not (self.step and self.step > 0 and math.isfinite(self.step)):
            msg = f"FieldRule({self.match!r}): coarsen needs a step > 0"
            raise ValueError(msg)
        if self.step is not None and self.action != "coarsen":
            msg = f"FieldRule({self.match!r}): step is for coarsen only, not {self.action!r}"
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
        if _pii.PHONE in self.pii and self.region not in phonenumbers.SUPPORTED_REGIONS:
            msg = f"Policy.region: unknown phone region {self.region!r}: use an ISO 3166 code such as 'US' or 'DE'"
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
            with open(path, "rb") as fh:  # a small secret file
                data = fh.read().strip()
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
    """A pipeline's privacy: a default policy, per-tenant overrides, local-only keys.

    A tenant's policy replaces the default whole (rules are not merged). Any Privacy, even one
    with no rules, makes prompts name keys by pseudonym."""

    default: Policy = field(default_factory=Policy)
    tenants: Mapping[str, Policy] = field(default_factory=dict)
    local_keys: tuple[str, ...] = ()
    key: bytes | None = None  # the HMAC key; None: read from the environment when constructed

    def __post_init__(self) -> None:
        if self.key is not None and not (isinstance(self.key, bytes) and self.key):
            msg = f"Privacy.key must be non-empty bytes, got {type(self.key).__name__}"
            raise ValueError(msg)
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
        # always: a Privacy given at all asks for pseudonyms in prompts, rules or not
        return True

    def policy(self, tenant: str) -> Policy:
        return self.tenants.get(tenant, self.default)

    def pseudonym(self, key: str) -> str:
        """How prompts name a key: a keyed HMAC of the tenant-scoped key (its own purpose, so
        it never equals another digest made with the same secret)."""
        data = f"key\x1f{key}".encode("utf-8", "surrogatepass")
        return "k-" + hmac.new(self.key or _PROCESS_KEY, data, hashlib.sha256).hexdigest()[:16]

    def key_is_local(self, tenant: str, key: str) -> bool:
        return self.policy(tenant).local_only or any(fnmatch.fnmatchcase(key, g) for g in self.local_keys)

    # -- applying ------------------------------------------------------------------------------

    def payload(self, tenant: str, payload: dict[str, Any], placeholders: _pii.Placeholders
                ) -> tuple[dict[str, Any], Applied]:
        """The payload a context may hold, and what was done to it (field names in `changes`
        are shown as a prompt would show them: PII in a name replaced too)."""
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
                    changes[self._name(p, name, placeholders)] = r.action
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
        """The gate's findings as a prompt or a decision may show them: a dropped field's
        name and values withheld, a masked field's values, a transformed field's values
        transformed; a changed field's `detail` (which quotes values: residuals, means) gone;
        PII in names, values and details replaced."""
        p = self.policy(tenant)
        if not p.fields and not p.pii:
            return findings
        key = self.key or b""
        out = []
        for f in findings:
            # `*` names no payload field: gaps, and rules that name none
            r = p.rule(f.field) if p.fields and f.field != "*" else None
            if r is not None and r.action != "keep":
                if r.action == "drop":
                    f = msgspec.structs.replace(f, field=WITHHELD, value=None, expected=None, detail="")
                elif r.action == "mask":
                    f = msgspec.structs.replace(f, value=None, expected=None, detail="")
                else:
                    f = msgspec.structs.replace(f, value=self._transform(r, tenant, f.field, f.value),
                                                expected=self._transform(r, tenant, f.field, f.expected),
                                                detail="")
            if p.pii:
                f = msgspec.structs.replace(
                    f, field=self._name(p, f.field, placeholders),
                    value=_pii.scrub_value(f.value, placeholders, key, p.pii, p.region),
                    expected=_pii.scrub_value(f.expected, placeholders, key, p.pii, p.region),
                    detail=_pii.scrub(f.detail, placeholders, key, p.pii, p.region)[0])
            out.append(f)
        return out

    def _name(self, p: Policy, name: str, placeholders: _pii.Placeholders) -> str:
        """A field name as prompts and traces may show it (its PII replaced)."""
        if not p.pii or not isinstance(name, str):
            return name
        return _pii.scrub(name, placeholders, self.key or b"", p.pii, p.region)[0]

    def _transform(self, r: FieldRule, tenant: str, name: str, v: Any) -> Any:
        if v is None:
            return None
        if r.action == "mask":
            return MASK
        if r.action == "hash":
            # 42 and 42.0 are one number (the gate reports values as floats): one digest
            if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
                v = int(v)
            raw = msgspec.json.encode([tenant, name, v], enc_hook=repr)
            return "h:" + hmac.new(self.key or _PROCESS_KEY, raw, hashlib.sha256).hexdigest()[:16]
        return _coarsen(v, r.step or 1.0)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _floor(v: float, step: float) -> float:
    # v / step rounded first: 0.3 / 0.1 is 2.9999999999999996, and 0.3 belongs to bucket 3
    return math.floor(round(v / step, 9)) * step


def _coarsen(v: Any, step: float) -> Any:
    """A number to a multiple of `step`; a [lat, lon] pair or {"lat", "lon"} object to a grid
    of `step` degrees; an ISO-8601 time to a bucket of `step` seconds; anything else masked."""
    if isinstance(v, bool):
        return MASK
    if isinstance(v, int | float):
        if not math.isfinite(v):
            return v
        q = _floor(v, step)
        return int(q) if float(step).is_integer() and isinstance(v, int) else round(q, 9)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return [_coarsen(x, step) for x in v]
    if isinstance(v, dict) and v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v.values()):
        return {k: _coarsen(x, step) for k, x in v.items()}
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v)  # `Z` included (Python 3.11)
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.UTC)
            bucket = _EPOCH + dt.timedelta(seconds=_floor((t - _EPOCH).total_seconds(), step))
        except (ValueError, OverflowError):  # not a time, or its bucket lies outside years 1-9999
            return MASK
        return bucket.isoformat().replace("+00:00", "Z")
    return MASK

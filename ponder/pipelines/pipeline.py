"""Pipeline: the user's definition of what to watch, when to think, and what may be done.

A pipeline is declared in a Python module and named on the command line as `module:attr`:

    pipeline = Pipeline(name="pumps", key="pump_id", actions=("none", "alert"), ...)

`validate()` runs when the pipeline is built, so a wrong definition fails before any event is
read, with an error that names the field at fault.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from ponder.images import ImagePolicy
from ponder.inference.engine import Engine
from ponder.inference.reflex import ReflexRule
from ponder.inference.egress import Egress
from ponder.inference.registry import build_engine
from ponder.operators.budget import Budget, Budgets
from ponder.operators.context import ContextPolicy
from ponder.operators.gate import GatePolicy
from ponder.operators.keyed import KeyLogic
from ponder.operators.privacy import Privacy
from ponder.operators.reason import Reasoner
from ponder.operators.route import Router, TierSpec
from ponder.runtime.decode import Decoder
from ponder.runtime.worker import RunStats, Worker
from ponder.types import answer_schema

__all__ = ["Pipeline", "load_pipeline"]


@dataclass(frozen=True)
class Pipeline:
    """What to watch, when to think, and what may be done.

    :param name: identifies the pipeline in topics, metrics and state.
    :param key: event field holding the stream key (device id, service name…).
    :param actions: the only actions a decision may carry; the first is the "do nothing" one.
    :param time: event field with event time; None uses ingestion time.
    :param schema: optional msgspec Struct the payload must validate against.
    :param context: / gate: per-key memory and surprise thresholds.
    :param tiers: reflex always; edge and cloud when configured.
    :param reflex: rules of the reflex tier (finding kind -> action).
    :param instructions: the task, as the model reads it at the top of every prompt.
    :param input_topic: / output_topic: / dead_letter_topic: for Kafka workers.
    :param max_inflight: events admitted and not finished before the source is paused.
    :param max_hot_keys: key states kept in memory; colder ones wait in the state store
        (a worker's RocksDB; for file runs a temporary RocksDB once the bound is passed).
    :param max_skew_s: how far past the clock an event time may lie before the event is a dead
        letter (None: only times before 1970 or from the year 10000 on are).
    :param tenant: event field holding the tenant (or `header:NAME`, a Kafka header); None:
        one tenant, "default". Keys are scoped by tenant: two tenants' keys of the same name
        never share state or context. Decisions carry `tenant`.
    :param budgets: caps on spend per tenant and tier (operators/budget.py): a call's worst
        case is reserved before it is sent, settled with its actual cost after.
    :param tenant_weights: shares of a saturated tier's queue (runtime/batcher.py); 1 each by
        default.
    :param privacy: field policies, PII replacement and residency (operators/privacy.py):
        applied where an event enters its key's context, so no prompt, trace or decision
        carries what it withholds; remote tiers are reached only through the egress
        (inference/egress.py).
    :param images: which event fields carry images (camera frames) and what an image may be
        (ponder/images.py): each is decoded and checked, replaced in the payload by a short
        reference, and sent only with its own event's request, to the tiers `images.tiers`
        allows; a bad one makes its record a dead letter.
    """

    name: str
    key: str
    actions: tuple[str, ...]
    time: str | None = "ts"
    schema: type | None = None
    context: ContextPolicy = field(default_factory=ContextPolicy)
    gate: GatePolicy = field(default_factory=GatePolicy)
    tiers: tuple[TierSpec, ...] = (TierSpec("reflex", max_batch=1),)
    reflex: tuple[ReflexRule, ...] = ()
    instructions: str = ""
    input_topic: str = ""
    output_topic: str = ""
    dead_letter_topic: str = ""
    max_inflight: int = 4096
    max_hot_keys: int = 100_000
    max_skew_s: float | None = 86_400.0
    tenant: str | None = None
    budgets: tuple[Budget, ...] = ()
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    privacy: Privacy | None = None
    images: ImagePolicy | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"pipeline {self.name!r}: {msg}")

        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            bad("name must be non-empty letters, digits, '-' or '_'")
        if not self.key:
            bad("key field must be named")
        if self.tenant is not None and (not self.tenant or self.tenant in (self.key, self.time, "header:")):
            bad(f"tenant must name an event field other than the key and time, or header:NAME; got {self.tenant!r}")
        if self.tenant is not None and not self.tenant.startswith("header:") and self.schema is not None \
                and self.tenant not in getattr(self.schema, "__struct_fields__", ()):
            # a schema'd payload keeps only the schema's fields: every event would lack its tenant
            bad(f"the schema {self.schema.__name__} must declare the tenant field {self.tenant!r}")
        if not self.actions or len(set(self.actions)) != len(self.actions):
            bad(f"actions must be non-empty and unique, got {self.actions!r}")
        for r in self.reflex:
            if r.action not in self.actions:
                bad(f"reflex rule for {r.kind!r} names action {r.action!r}, not one of {self.actions}")
        if any(not (isinstance(w, (int, float)) and 0 < w < math.inf) for w in self.tenant_weights.values()):
            bad(f"tenant_weights must be finite numbers > 0, got {dict(self.tenant_weights)!r}")
        Router(self.tiers)  # raises on a missing reflex tier or duplicate tiers
        names = {t.name for t in self.tiers}
        for b in self.budgets:
            if b.tier != "*" and b.tier not in names:
                bad(f"a budget names tier {b.tier!r}, not one of {sorted(names)}")
            if b.tenant != "*" and self.tenant is None:
                bad(f"a budget names tenant {b.tenant!r} but the pipeline has no tenants (tenant=)")
            for t in self.tiers:
                if b.usd is not None and t.name != "reflex" and b.covers(b.tenant, t.name) \
                        and t.price is None and not t.cost_per_1k_tokens:
                    bad(f"a USD budget covers tier {t.name!r}, which has no price (price= or cost_per_1k_tokens=)")
        if self.images is not None:
            self._validate_images(bad, names)
        answer_schema(self.actions)

    def _validate_images(self, bad: Callable[[str], None], tiers: set[str]) -> None:
        im = self.images
        if not isinstance(im, ImagePolicy):
            bad(f"images must be an ImagePolicy, got {type(im).__name__}")
        why = im.problem()
        if why is not None:
            bad(why)
        for f in im.fields:
            if f in (self.key, self.time, self.tenant):
                bad(f"images.fields names {f!r}, which is the pipeline's key, time or tenant field")
            if self.schema is not None and f not in getattr(self.schema, "__struct_fields__", ()):
                # a schema'd payload keeps only the schema's fields: the image would never arrive
                bad(f"images.fields names {f!r}, which the schema {self.schema.__name__} does not declare")
        for t in im.tiers or ():
            if t not in tiers:
                bad(f"images.tiers names tier {t!r}, not one of {sorted(tiers)}")

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.input_topic or f"{self.name}.events", self.output_topic or f"{self.name}.decisions",
                self.dead_letter_topic or f"{self.name}.dead-letters")

    def context_policy(self) -> ContextPolicy:
        policy = self.context
        if self.instructions and self.instructions != policy.instructions:
            policy = replace(policy, instructions=self.instructions)
        near = self.images.near_identical if self.images is not None else None
        if near != policy.near_identical and near is not None:
            policy = replace(policy, near_identical=near)
        return policy

    def build(self, *, engines: dict[str, Engine] | None = None, clock: Callable[[], float] | None = None,
              budget_slices: int = 1) -> tuple[KeyLogic, Decoder, dict[str, Engine]]:
        """The runnable parts: per-key logic, decoder and one engine per tier."""
        router = Router(self.tiers, clock=clock) if clock else Router(self.tiers)
        policy = self.context_policy()
        image_tiers = frozenset(self.images.tiers) if self.images is not None and self.images.tiers is not None \
            else None
        gate = self.gate
        if self.images is not None and self.images.near_identical != gate.near_identical:
            gate = replace(gate, near_identical=self.images.near_identical)
        logic = KeyLogic(policy, gate, Reasoner(self.actions, policy, router, self.actions[0],
                                                     budgets=Budgets(self.budgets, slices=budget_slices),
                                                     image_tiers=image_tiers),
                         self.privacy)
        key = self.privacy.key if self.privacy is not None else None
        built = dict(engines or {})
        for t in self.tiers:
            if t.name not in built:
                built[t.name] = build_engine(
                    t.engine, rules=self.reflex, default_action=self.actions[0], name=t.name, model=t.model,
                    max_batch=t.max_batch, max_concurrency=t.max_concurrency, timeout_s=t.timeout_s,
                    server=t.server, extra_body=t.extra_body, stall_s=t.stall_s, retries=t.retries,
                    trusted_local=t.is_local, privacy_key=key,
                    near_identical=self.images.near_identical if self.images is not None else None)
            if not t.is_local and not isinstance(built[t.name], Egress):
                built[t.name] = Egress(built[t.name], key)  # a given engine for a remote tier: the same door
            if isinstance(built[t.name], Egress):  # the door also keeps images from a tier not allowed them
                built[t.name].images = image_tiers is None or t.name in image_tiers
        # the router's clock is monotonic; event times are checked against the wall clock
        decoder = Decoder(self.key, self.time, self.schema, max_skew_s=self.max_skew_s, tenant=self.tenant,
                          images=self.images)
        return logic, decoder, built

    def worker(self, source, sink, *, engines: dict[str, Engine] | None = None, store=None,
               progress: Callable[[RunStats], None] | None = None, **kw) -> Worker:
        """A Worker running this pipeline from `source` to `sink`. `budget_slices`: the input's
        partition count, so each partition owns its share of the budgets (Kafka workers)."""
        logic, decoder, built = self.build(engines=engines, budget_slices=kw.pop("budget_slices", 1))
        return Worker(logic, decoder, source, sink, built, self.tiers, store=store, name=self.name,
                      tenant_weights=self.tenant_weights,
                      max_inflight=kw.pop("max_inflight", self.max_inflight),
                      max_hot_keys=kw.pop("max_hot_keys", self.max_hot_keys), progress=progress, **kw)


def load_pipeline(ref: str) -> Pipeline:
    """Import `module:attr` (attr defaults to `pipeline`) and check it is a Pipeline."""
    module, _, attr = ref.partition(":")
    attr = attr or "pipeline"
    # like uvicorn and celery: a module in the working directory is importable by name
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        msg = f"cannot import pipeline module {module!r}: {e}"
        raise ValueError(msg) from e
    obj = getattr(mod, attr, None)
    if obj is None:
        msg = f"module {module!r} has no attribute {attr!r}"
        raise ValueError(msg)
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()
    if not isinstance(obj, Pipeline):
        msg = f"{ref!r} is a {type(obj).__name__}, not a ponder Pipeline"
        raise TypeError(msg)
    return obj


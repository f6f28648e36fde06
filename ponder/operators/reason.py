"""Reason: render a key's context into a request, walk the tiers, and produce a Decision.

The runtime injects `call(tier, request) -> Completion` (it owns batching and engines), so this
operator stays free of runtime imports and can run inside another stream processor.

Every decision carries its timings (`Trace.spans`, `Trace.stages`), each stage measured around
the work it names on the reasoner's monotonic clock: the context render, each route step and
why it chose its tier, each call (split into its batch wait, the engine's time and the wait
for the event loop to resume the reasoner, as the runtime and the engine report them in
`Completion.timings`) and each answer's validation (decide). A runtime may turn them into trace spans (runtime/tracing.py).

What the wire format leaves out (the prompt as sent, each call's raw output and why it failed
validation) goes to `Reasoner.explaining` when a runtime sets it (a local trace store,
runtime/tracestore.py): an `Explanation` per decision id, taken by the runtime once the
decision is out. Unset, nothing is kept and nothing is copied.

Images (ponder/images.py). A request carries its triggering event's images, and no other's, to
each tier that may see them: not the reflex tier (rules read no pixels), not a tier left out of
the pipeline's `images.tiers`, and no tier at all for a field the privacy policy changed (its
reference in the context is masked, hashed or gone, so its pixels are too). The decision's
`Trace.images` says, per tier called, which were sent and which withheld and why.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec

from ponder.inference.engine import Completion, Request, answer_token_bound
from ponder.operators import context as ctx
from ponder.operators.budget import Budgets, Hold
from ponder.operators.decide import parse_answer
from ponder.operators.forecast import Forecast
from ponder.operators.spend import Spend
from ponder.operators.gate import Verdict
from ponder.operators.route import SKIP_RESIDENCY, Router
from ponder.operators.vote import Tally
from ponder.images import Image
from ponder.types import DEFAULT_TENANT, Decision, Event, Span, Trace, Usage, answer_schema, decision_id

__all__ = ["Reasoner", "Call", "Explanation", "Attempt"]

Call = Callable[[str, Request], Awaitable[Completion]]
_FIELD_RULES = frozenset({"drop", "mask", "hash", "coarsen"})  # privacy field actions that withhold an image


class Attempt(msgspec.Struct, frozen=True, omit_defaults=True):
    """One model call of a decision: what it was sent beyond the decision's prompt (a repair
    note), what came back, and each answer's validation error ("" for a valid one)."""

    tier: str
    samples: int = 1
    repair: str = ""  # appended to the prompt's tail for this call
    texts: list[str] = []
    errors: list[str] = []
    failure: str = ""  # the call itself failed (no answer)
    model: str = ""
    usage: Usage = Usage()


class Explanation(msgspec.Struct, frozen=True):
    """The side record of one decision: the prompt every tier was sent (after the privacy
    policy: the context holds only what it lets through) and each call made."""

    prefix: str
    tail: str
    attempts: list[Attempt] = []


@dataclass
class Reasoner:
    """Pipeline-wide reasoning settings plus the router."""

    actions: tuple[str, ...]
    policy: ctx.ContextPolicy
    router: Router
    fallback_action: str
    clock: Callable[[], float] = time.perf_counter
    forecast: Forecast = field(default_factory=Forecast)
    budgets: Budgets = field(default_factory=Budgets)
    spend: Spend = field(default_factory=Spend)
    # decision id -> its Explanation, kept only when a runtime sets a dict here (a trace store)
    explaining: dict[str, Explanation] | None = None
    # tiers a decision's images may go to (the pipeline's `images.tiers`); None: every tier
    image_tiers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        self.schema = answer_schema(self.actions)
        self.head = ctx.header(self.policy, self.actions, self.schema)

    def request(self, st: ctx.ContextState, event: Event, verdict: Verdict, tier: str,
                prompt: ctx.Prompt | None = None, local: bool = False) -> Request:
        """The request for `tier`; `prompt`, if given, is the key's context already rendered
        (the same for every tier of one decision)."""
        p = prompt or ctx.render(self.policy, st, self.head, verdict.findings)
        spec = self.router.by_name[tier]
        return Request(event.key, p.prefix, p.tail, spec.max_tokens, self.actions, self.schema,
                       tuple(verdict.findings), verdict.score,
                       decision_id(event.key, event.source), event.tenant or DEFAULT_TENANT, local_only=local,
                       images=self.images_for(event, verdict, tier)[0])

    def images_for(self, event: Event, verdict: Verdict, tier: str) -> tuple[tuple[Image, ...], list[str]]:
        """The event's images `tier` may see, and a note per image of what became of it."""
        if not event.images or tier == "reflex":
            return (), []
        sent: list[Image] = []
        notes: list[str] = []
        changed = verdict.privacy or {}
        for img in event.images:
            # a field rule that changes the field keeps its pixels too (PII found in the
            # reference's text, "pii", is no rule about the image); the note names neither the
            # field nor the reference, as the policy changed them
            if changed.get(img.field) in _FIELD_RULES:
                notes.append(f"{tier}: withheld an image: the privacy policy applies {changed[img.field]} to its field")
            elif self.image_tiers is not None and tier not in self.image_tiers:
                notes.append(f"{tier}: withheld {img.field} ({img.ref}): tier not in images.tiers")
            else:
                sent.append(img)
                notes.append(f"{tier}: sent {img.field} ({img.ref})")
        return tuple(sent), notes

    @staticmethod
    def _cost(spec, u: Usage) -> float:
        """USD for a usage at a tier: its price, else the flat per-1k rate."""
        if spec.price:
            return spec.price.cost(u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens)
        return (u.prompt_tokens + u.completion_tokens) * spec.cost_per_1k_tokens / 1000.0

    async def decide(self, st: ctx.ContextState, event: Event, verdict: Verdict, call: Call,
                     local: bool = False) -> Decision:
        """Walk the tiers until one gives a valid, confident enough answer. `local`: the key's
        context holds local-only data, so remote tiers are skipped (and refused at the egress)."""
        t0 = self.clock()
        router = self.router
        need = self.policy.token_budget
        skipped: list[str] = []  # tiers passed over without a call, and why
        holds: dict[str, Hold] = {}  # a budget reservation per tier handed out, until its call ends
        tenant = event.tenant or DEFAULT_TENANT
        did = decision_id(event.key, event.source)
        # the vote's samples are seeded from the decision, so a replayed event draws the same ones
        seed = int.from_bytes(hashlib.blake2b(did.encode(), digest_size=4).digest(), "big") >> 1

        stages: list[Span] = []  # the reasoner's own work, timed

        def stage(name: str, began: float, attrs: dict[str, Any]) -> None:
            stages.append(Span(name, _ms(self.clock() - began), _ms(began - t0), attrs=attrs))

        # rendered before routing (the budgets' claims need the prompt), once for every tier
        began = self.clock()
        prompt = ctx.render(self.policy, st, self.head, verdict.findings)
        stage("context render", began, {"prefix_chars": len(prompt.prefix), "tail_chars": len(prompt.tail)})

        def request(tier: str) -> Request:
            return self.request(st, event, verdict, tier, prompt, local)

        def samples_at(spec) -> int:
            """Samples the first call at a tier draws: a vote's first round, or one."""
            v = spec.vote
            return Tally(v.n).next_draw() if v is not None and v.at_once(verdict.surprise) else 1

        def claim(spec, n: int = 0) -> str | None:
            if local and not spec.is_local:
                return SKIP_RESIDENCY
            if spec.name == "reflex" or not self.budgets:
                return None
            n = n or samples_at(spec)
            req = request(spec.name)
            worst = self.forecast.bound(spec.name, req.prefix, req.tail,
                                        req.max_tokens or answer_token_bound(self.schema))
            worst = Usage(worst.prompt_tokens, 0, worst.completion_tokens * n)
            if isinstance(spec.engine, str) and spec.engine.startswith(("http://", "https://")):
                # the engine may retry a transient failure, and every attempt is paid for; a
                # server without `n` is sent n requests, each prompt paid for
                worst = Usage(worst.prompt_tokens * n * (1 + spec.retries), 0,
                              worst.completion_tokens * (1 + spec.retries))
            hold, why = self.budgets.reserve(
                tenant, spec.name, tokens=worst.prompt_tokens + worst.completion_tokens,
                usd=self._cost(spec, worst), score=verdict.surprise, min_score=spec.min_score,
                partition=event.source.partition)
            if hold is not None:
                holds[spec.name] = hold
                self.spend.reserve(tenant, spec.name, hold.usd)
            return why

        route: list[str] = []
        errors: list[str] = []
        image_notes: list[str] = []  # per tier called, what became of the event's images
        spans: list[Span] = []
        used = Usage()  # every call's, failed ones too
        predicted = Usage()  # the forecast before each call
        explain = self.explaining is not None
        attempts: list[dict[str, Any]] = []  # each call, for the Explanation (only if explaining)

        async def attempt(tier: str, spec, req: Request) -> Completion | None:
            """One call at `tier`: forecast, call, pay, learn, settle its reservation. None if
            it failed (the error recorded)."""
            nonlocal used, predicted
            if tier != "reflex":
                p = self.forecast.predict(tier, req.prefix, req.tail, event.key)
                p = Usage(p.prompt_tokens, p.cached_prompt_tokens, p.completion_tokens * req.n)
                predicted += msgspec.structs.replace(p, cost_usd=self._cost(spec, p))
            s0 = self.clock()
            failure = ""
            try:
                comp = await call(tier, req)
            except Exception as e:  # noqa: BLE001 - any backend failure downgrades
                comp = None
                failure = f"{type(e).__name__}: {e}"[:300]
                errors.append(f"{tier}: {failure}")
            spans.append(_call_span(tier, _ms(s0 - t0), _ms(self.clock() - s0), req, comp, failure))
            u = comp.usage if comp is not None else Usage()
            usd = u.cost_usd or self._cost(spec, u)
            if comp is not None:
                # every attempt is paid for, failed ones too
                used += msgspec.structs.replace(u, cost_usd=usd)
                self.spend.call(tenant, tier, u, usd)
                if tier != "reflex":  # the forecast learns what one sample costs
                    one = msgspec.structs.replace(u, completion_tokens=u.completion_tokens // max(req.n, 1))
                    self.forecast.observe(tier, req.prefix, req.tail, one, event.key)
            if tier in holds:  # settled with what the call cost, nothing if it failed unused
                hold = holds.pop(tier)
                self.spend.reserve(tenant, tier, -hold.usd)
                self.budgets.settle(hold, usd=usd, tokens=u.prompt_tokens + u.completion_tokens)
            if explain:
                attempts.append({"tier": tier, "samples": req.n, "repair": req.tail[len(prompt.tail):],
                                  "texts": list(comp.samples or (comp.text,)) if comp is not None else [],
                                  "failure": failure or (comp.error if comp is not None else ""),
                                  "model": comp.model if comp is not None else "",
                                  "usage": msgspec.structs.replace(u, cost_usd=usd)})
            if comp is not None and comp.error:
                errors.append(f"{tier}: {comp.error}"[:300])
                comp = None
            return comp

        async def vote(tier: str, spec, req: Request, tally: Tally) -> Any | None:
            """Draw rounds of samples until the vote is decided (or the budget or the engine
            stops it); the winning answer, None if no sample was valid."""
            while not tally.decided():
                n = tally.next_draw()
                why = claim(spec, n)
                if why is not None:
                    skipped.append(f"{tier}: vote stopped after {tally.drawn} samples: {why}")
                    break
                comp = await attempt(tier, spec, msgspec.structs.replace(
                    req, n=n, temperature=spec.vote.temperature, seed=seed + tally.drawn))
                if comp is None:
                    break
                tally.add([a for a, _ in judge(tier, (comp.samples or (comp.text,))[:n])])
            votes.append(tally.counts())
            return tally.winner()

        def judge(tier: str, texts) -> list[tuple[Any, str | None]]:
            """Each text parsed and validated: (answer or None, error)."""
            began = self.clock()
            out = [parse_answer(t, self.actions) for t in texts]
            if explain and attempts:  # judged right after the call that produced them
                attempts[-1]["errors"] = [e or "" for _, e in out]
            stage("decide", began, {"tier": tier, "answers": len(out),
                                    "valid": sum(a is not None for a, _ in out)})
            return out

        def move(step: str, why: str, pick: Callable[..., str | None], *args: Any, **kw: Any) -> str | None:
            """A route step `pick(*args, **kw)`, timed, with why it moved and the tiers it
            passed over (and why)."""
            began, passed = self.clock(), len(skipped)
            chosen = pick(*args, **kw)
            stage("route", began, {"step": step, "why": why, "score": round(verdict.surprise, 4),
                                   "tier": chosen or "", "skipped": skipped[passed:]})
            return chosen

        # tiers are chosen by the verdict's surprise (gate.Verdict): an escalation's score
        wanted = router.wanted(verdict.surprise)
        tier = move("first", f"score {verdict.surprise:.2f} asks for {wanted}",
                    router.first, verdict.surprise, need, skipped, claim)
        degraded = tier != wanted
        tried: set[str] = set()
        votes: list[dict[str, int]] = []
        best = None  # (answer, tier, model): a valid but unconfident answer, kept in case
        repair = ""  # set to ask the same tier again after an answer its server did not constrain
        try:
            while True:
                if event.images and tier not in tried:
                    image_notes.extend(self.images_for(event, verdict, tier)[1])
                tried.add(tier)
                route.append(tier)
                spec = router.by_name[tier]
                req = request(tier)
                if repair:
                    req = msgspec.structs.replace(req, tail=req.tail + repair)
                first = 1 if repair else samples_at(spec)
                if first > 1:  # a vote from the first call
                    req = msgspec.structs.replace(req, n=first, temperature=spec.vote.temperature, seed=seed)
                comp = await attempt(tier, spec, req)
                if comp is None:
                    if tier == "reflex":
                        answer = None
                        break
                    router.failed(tier)
                    degraded = True
                    if best is not None:
                        break  # a lower tier's valid answer stands: better than falling to reflex
                    tier = move("down", f"{tier} failed", router.down, tier, tried, skipped=skipped, claim=claim)
                    repair = ""
                    continue
                router.succeeded(tier, comp.usage.prompt_tokens + comp.usage.completion_tokens)
                if first > 1:
                    tally = Tally(spec.vote.n)
                    tally.add([a for a, _ in judge(tier, (comp.samples or (comp.text,))[:first])])
                    answer = await vote(tier, spec, request(tier), tally)
                    err = None if answer is not None else f"no valid answer among {tally.drawn} samples"
                else:
                    ((answer, err),) = judge(tier, (comp.text,))
                    if answer is not None and spec.vote is not None and spec.vote.checks(answer):
                        tally = Tally(spec.vote.n)
                        tally.add([answer])  # the first answer takes part in the vote it called
                        answer = await vote(tier, spec, request(tier), tally)
                if answer is None:
                    errors.append(f"{tier}: {err}"[:300])
                    if not comp.enforced and not repair and first == 1 and claim(spec, 1) is None:
                        repair = ctx.repair_note(err or "")  # once per tier, if the budget allows
                        continue
                    repair = ""
                    nxt = move("up", f"no valid answer at {tier}", router.up, tier, tried, need, skipped, claim)
                    if nxt is None and best is not None:
                        degraded = True  # the climb for a confident answer failed
                        break  # climbed from a valid, unconfident answer to garbage: keep the answer
                    if nxt is None:
                        degraded = True
                        nxt = move("down", f"no valid answer at {tier} and none above", router.down, tier,
                                   tried, skipped=skipped, claim=claim) if tier != "reflex" else None
                    if nxt is None or nxt in tried:
                        break
                    tier = nxt
                    continue
                repair = ""
                # the most confident valid answer so far (the higher tier's on a tie)
                if best is None or answer.confidence >= best[0].confidence:
                    best = (answer, tier, comp.model)
                if answer.confidence < spec.min_confidence:
                    nxt = move("up", f"confidence {answer.confidence:.2f} < {spec.min_confidence:.2f} at {tier}",
                               router.up, tier, tried, need, skipped, claim)
                    if nxt is not None:
                        tier = nxt
                        continue
                break
        finally:
            for held_tier, hold in holds.items():  # cancelled mid-call: release what it reserved
                self.spend.reserve(tenant, held_tier, -hold.usd)
                self.budgets.settle(hold, usd=0.0, tokens=0)
        if best is None:
            # every tier failed or answered garbage: a fixed, schema-valid fallback
            action, severity, reason, confidence, tier_used, model = (
                self.fallback_action, "info", "no valid answer from any tier", 0.0, "reflex", "fallback")
            degraded = True
        else:
            a, tier_used, model = best
            action, severity, reason, confidence = a.action, a.severity, a.reason, a.confidence
        evidence = {f.field: f.value for f in verdict.findings[:8] if f.value is not None}
        if explain:
            self.explaining[did] = Explanation(prompt.prefix, prompt.tail, [Attempt(**a) for a in attempts])
        return Decision(
            decision_id=did,
            key=event.stream_key,
            tenant=tenant,
            action=action,
            severity=severity,
            reason=reason,
            confidence=confidence,
            tier=tier_used,
            model=model,
            usage=msgspec.structs.replace(used, cost_usd=round(used.cost_usd, 8)),
            latency_ms=round((self.clock() - t0) * 1000.0, 3),
            degraded=degraded,
            evidence=evidence,
            ts=event.ts,
            source=event.source,
            trace=Trace(round(verdict.score, 4), verdict.findings[:8], route, spans, errors, skipped,
                        msgspec.structs.replace(predicted, cost_usd=round(predicted.cost_usd, 8))
                        if predicted.prompt_tokens else None,
                        votes[-1] if votes else None, verdict.privacy or None, stages, image_notes),
            headers=event.headers,
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _call_span(tier: str, start_ms: float, ms: float, req: Request, comp: Completion | None,
               failure: str) -> Span:
    """A call's span: its usage and model, and its time split as `comp.timings` tells (batch
    wait, then the engine, the engine's own phases back to back inside it, then the wait until
    the event loop resumed the reasoner with the answer), kept within it."""
    attrs: dict[str, Any] = {"samples": req.n}
    if comp is None:
        return Span(tier, ms, start_ms, attrs={**attrs, "error": failure})
    u = comp.usage
    attrs.update(model=comp.model, prompt_tokens=u.prompt_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                 completion_tokens=u.completion_tokens, finish=comp.finish_reason)
    if comp.error:
        attrs["error"] = comp.error[:300]
    t = comp.timings
    if not t:
        return Span(tier, ms, start_ms, attrs=attrs)
    phases = [(name, secs * 1000.0) for name, secs in t.items() if name not in ("batch wait", "engine")]
    end, at, parts = start_ms + ms, start_ms, []
    if "batch wait" in t:
        d = max(0.0, min(t["batch wait"] * 1000.0, end - at))
        parts.append(Span("batch wait", round(d, 3), round(at, 3)))
        at += d
    took = max(0.0, min(t["engine"] * 1000.0 if "engine" in t else sum(d for _, d in phases), end - at))
    inside, p = [], at
    for name, d in phases:
        d = max(0.0, min(d, at + took - p))
        inside.append(Span(name, round(d, 3), round(p, 3)))
        p += d
    parts.append(Span("engine", round(took, 3), round(at, 3), inside))
    if "engine" in t:  # the engine was done, the reasoner not yet resumed with its answer
        parts.append(Span("return wait", round(max(0.0, end - at - took), 3), round(at + took, 3)))
    return Span(tier, ms, start_ms, parts, attrs)

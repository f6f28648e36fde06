"""The whole per-key logic of a pipeline over `(state, event)`: gate, context, reasoning.

`observe` is synchronous and cheap: most events end there. Only an escalated event reaches
`decide`, which awaits engines through the injected `call`. Nothing here knows about Kafka,
lanes or batching, so the same logic can run inside another stream processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ponder.operators import context as ctx
from ponder.operators import gate as gt
from ponder.operators.pii import Placeholders
from ponder.operators.privacy import Privacy
from ponder.operators.reason import Call, Reasoner
from ponder.types import DEFAULT_TENANT, Decision, Event

__all__ = ["KeyState", "KeyLogic"]


class KeyState(msgspec.Struct):
    """Everything kept for one key; what the state store persists."""

    context: ctx.ContextState
    gate: gt.GateState
    # the last input position folded in: a replayed event at or before it is skipped
    partition: int = -1
    offset: int = -1
    epoch: int = 0  # the partition's epoch at that position (a log that started again)
    # privacy (operators/privacy.py): the key's PII placeholders, and whether its context has
    # ever held local-only data (then it stays local: the context still holds it)
    placeholders: Placeholders | None = None
    local: bool = False


@dataclass
class KeyLogic:
    context: ctx.ContextPolicy
    gate: gt.GatePolicy
    reasoner: Reasoner
    privacy: Privacy | None = None

    def new_state(self, key: str) -> KeyState:
        # with a privacy policy, prompts name the key by a keyed pseudonym, never the key
        shown = key if self.privacy is None else self.privacy.pseudonym(key)
        return KeyState(ctx.new_state(shown), gt.new_state())

    def observe(self, st: KeyState, event: Event) -> gt.Verdict:
        """Score the event against the key's past, then fold it into the context.

        All or nothing: the gate runs the user rules and checks the time before it changes any
        state, and past that neither gate nor context raises on a decoded event (see
        tests/test_fuzz.py), so an event that fails here leaves the state as it was."""
        verdict = gt.observe(self.gate, st.gate, event)
        flag = ",".join(sorted({f.kind for f in verdict.findings if f.score >= self.gate.open})) \
            if verdict.escalate else ""
        if self.privacy is not None:  # the context, and so every prompt, holds only what the policy lets through
            event, verdict = self._private(st, event, verdict)
        ctx.update(self.context, st.context, event, flag)
        st.partition, st.offset, st.epoch = event.source.partition, event.source.offset, event.source.epoch
        return verdict

    def _private(self, st: KeyState, event: Event, verdict: gt.Verdict) -> tuple[Event, gt.Verdict]:
        tenant = event.tenant or DEFAULT_TENANT
        ph = st.placeholders if st.placeholders is not None else Placeholders()
        payload, applied = self.privacy.payload(tenant, event.payload, ph)
        findings = self.privacy.findings(tenant, verdict.findings, ph)
        st.placeholders = ph
        shown = self.privacy.pseudonym(event.key)
        if st.context.key != shown:  # a state from before the policy: prompts name it by pseudonym from now on
            st.context.key = shown
        st.local = st.local or applied.local or self.privacy.key_is_local(tenant, event.stream_key)
        return (msgspec.structs.replace(event, payload=payload),
                msgspec.structs.replace(verdict, findings=findings, privacy=applied.changes))

    @staticmethod
    def seen(st: KeyState, event: Event) -> bool:
        """Whether the state already reflects this event (a replay after a crash). An event of a
        newer epoch never is: its partition's log started again, offsets and all."""
        src = event.source
        return st.partition == src.partition and st.epoch == src.epoch and src.offset <= st.offset

    async def decide(self, st: KeyState, event: Event, verdict: gt.Verdict, call: Call) -> Decision:
        return await self.reasoner.decide(st.context, event, verdict, call, local=st.local)

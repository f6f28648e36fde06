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
from ponder.operators.reason import Call, Reasoner
from ponder.types import Decision, Event

__all__ = ["KeyState", "KeyLogic"]


class KeyState(msgspec.Struct):
    """Everything kept for one key; what the state store persists."""

    context: ctx.ContextState
    gate: gt.GateState
    # the last input position folded in: a replayed event at or before it is skipped
    partition: int = -1
    offset: int = -1
    epoch: int = 0  # the partition's epoch at that position (a log that started again)


@dataclass
class KeyLogic:
    context: ctx.ContextPolicy
    gate: gt.GatePolicy
    reasoner: Reasoner

    def new_state(self, key: str) -> KeyState:
        return KeyState(ctx.new_state(key), gt.new_state())

    def observe(self, st: KeyState, event: Event) -> gt.Verdict:
        """Score the event against the key's past, then fold it into the context.

        All or nothing: the gate runs the user rules and checks the time before it changes any
        state, and past that neither gate nor context raises on a decoded event (see
        tests/test_fuzz.py), so an event that fails here leaves the state as it was."""
        verdict = gt.observe(self.gate, st.gate, event)
        flag = ",".join(sorted({f.kind for f in verdict.findings if f.score >= self.gate.open})) \
            if verdict.escalate else ""
        ctx.update(self.context, st.context, event, flag)
        st.partition, st.offset, st.epoch = event.source.partition, event.source.offset, event.source.epoch
        return verdict

    @staticmethod
    def seen(st: KeyState, event: Event) -> bool:
        """Whether the state already reflects this event (a replay after a crash). An event of a
        newer epoch never is: its partition's log started again, offsets and all."""
        src = event.source
        return st.partition == src.partition and st.epoch == src.epoch and src.offset <= st.offset

    async def decide(self, st: KeyState, event: Event, verdict: gt.Verdict, call: Call) -> Decision:
        return await self.reasoner.decide(st.context, event, verdict, call)

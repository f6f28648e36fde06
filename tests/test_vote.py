"""Test-time compute: a tier's vote draws samples in rounds, stops once the outcome cannot
change, takes the majority action with confidence = agreement, and pays for every sample."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Completion, Request, answer_token_bound
from ponder.operators.budget import Budget
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.operators.vote import Tally, Vote
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.worker import Worker
from ponder.types import Usage, answer_schema, decision_id

ACTIONS = ("none", "alert", "stop")
PROMPT, PER_SAMPLE = 1_000, 40


def answer(action: str, severity: str = "high", confidence: float = 0.8) -> str:
    return json.dumps({"action": action, "severity": severity, "reason": f"r-{action}", "confidence": confidence})


class Scripted:
    """An engine answering each key's samples from a script, in the order they are drawn; it
    records every request's (n, temperature, seed). The prompt is paid once per request, as an
    engine that prefills once for all samples reports it."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[str]], per_sample: int = PER_SAMPLE) -> None:
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.per_sample = per_sample
        self.calls: list[tuple[str, int, float | None, int | None]] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests: list[Request]) -> list[Completion]:
        out = []
        for r in requests:
            self.calls.append((r.session, r.n, r.temperature, r.seed))
            texts = tuple(self.scripts[r.session].pop(0) for _ in range(r.n))
            usage = Usage(PROMPT, 0, self.per_sample * r.n)
            out.append(Completion(texts[0], usage, "m", samples=texts if r.n > 1 else ()))
        return out


def pipeline(vote: Vote, budgets=(), price: Price | None = None) -> Pipeline:
    return Pipeline(name="v", key="k", time="ts", actions=ACTIONS, budgets=budgets,
                    gate=GatePolicy(fields=(), gap=(1e9, 2e9), rules=(Rule("flag", lambda e: True),)),
                    tiers=(TierSpec("reflex", max_batch=1),
                           TierSpec("edge", engine="reflex", min_score=0.5, max_batch=4, max_wait_ms=1.0,
                                    vote=vote, price=price)))


async def run(pipe: Pipeline, keys: list[str], edge: Scripted) -> dict[str, object]:
    logic, decoder, engines = pipe.build(engines={"edge": edge})
    sink = MemorySink()
    await Worker(logic, decoder, MemorySource([{"k": k, "ts": 1.0} for k in keys]), sink, engines, pipe.tiers).run()
    return {d.key: d for d in sink.decisions}


def seed_of(key: str) -> int:
    from ponder.types import SourcePos

    did = decision_id(key, SourcePos("memory", 0, 0))
    return int.from_bytes(hashlib.blake2b(did.encode(), digest_size=4).digest(), "big") >> 1


async def test_an_agreeing_first_round_decides_the_vote_in_one_call():
    edge = Scripted({"sure": [answer("alert", confidence=c) for c in (0.5, 0.9, 0.7)]})
    d = (await run(pipeline(Vote(n=5, min_score=0.5)), ["sure"], edge))["sure"]
    # 3 of 5 agree: the other 2 cannot change the outcome, so they are never drawn
    assert [c[1:3] for c in edge.calls] == [(3, 0.7)]
    assert (d.action, d.confidence, d.reason, d.tier) == ("alert", 1.0, "r-alert", "edge")
    assert d.trace.vote == {"alert": 3}
    assert (d.usage.prompt_tokens, d.usage.completion_tokens) == (PROMPT, 3 * PER_SAMPLE)


async def test_a_split_vote_draws_the_fewest_samples_that_could_settle_it():
    script = [answer("alert"), answer("none"), answer("alert"), answer("none", confidence=0.6),
              answer("none", confidence=0.7)]
    edge = Scripted({"split": script})
    d = (await run(pipeline(Vote(n=5, min_score=0.5)), ["split"], edge))["split"]
    s = seed_of("split")
    # 2:1 after the first round, 2 left: one more could settle it (3:1); it does not (2:2),
    # so one more again: the last sample decides
    assert edge.calls == [("split", 3, 0.7, s), ("split", 1, 0.7, s + 3), ("split", 1, 0.7, s + 4)]
    assert (d.action, d.confidence, d.reason) == ("none", 0.6, "r-none")  # 3 of 5 agree
    assert d.trace.vote == {"none": 3, "alert": 2}
    assert d.usage.prompt_tokens == 3 * PROMPT and d.usage.completion_tokens == 5 * PER_SAMPLE
    assert [sp.name for sp in d.trace.spans] == ["edge", "edge", "edge"]


async def test_a_severe_first_answer_is_checked_by_a_vote_it_takes_part_in():
    edge = Scripted({"hot": [answer("stop", "critical"), answer("stop"), answer("alert"), answer("stop")],
                     "calm": [answer("none", "low")]})
    got = await run(pipeline(Vote(n=5, min_score=2.0, severity="high")), ["hot", "calm"], edge)
    hot, calm = got["hot"], got["calm"]
    s = seed_of("hot")
    # the greedy first answer is one vote; then the fewest samples that could make 3 of 5
    assert [c for c in edge.calls if c[0] == "hot"] == [("hot", 1, None, None), ("hot", 2, 0.7, s + 1),
                                                        ("hot", 1, 0.7, s + 3)]
    assert (hot.action, hot.confidence, hot.trace.vote) == ("stop", 0.75, {"stop": 3, "alert": 1})
    # a low-severity answer calls no vote
    assert [c for c in edge.calls if c[0] == "calm"] == [("calm", 1, None, None)]
    assert (calm.action, calm.confidence, calm.trace.vote) == ("none", 0.8, None)


async def test_invalid_samples_abstain_and_a_vote_with_no_valid_sample_is_no_answer():
    edge = Scripted({"noisy": ["{oops", answer("alert"), answer("alert"), answer("alert")],
                     "garbage": ["not json"] * 5})
    got = await run(pipeline(Vote(n=5, min_score=0.5)), ["noisy", "garbage"], edge)
    noisy, garbage = got["noisy"], got["garbage"]
    assert (noisy.action, noisy.confidence, noisy.trace.vote) == ("alert", 0.75, {"alert": 3, "(invalid)": 1})
    # nothing valid among all five: like an invalid answer, the reflex tier decides, flagged
    assert garbage.trace.vote == {"(invalid)": 5} and garbage.tier == "reflex" and garbage.degraded
    assert "edge: no valid answer among 5 samples" in garbage.trace.errors


async def test_a_budget_stops_a_vote_between_rounds_and_the_samples_drawn_decide():
    bound = answer_token_bound(answer_schema(ACTIONS))
    # completions priced, prompts free: the first round's worst case is 3 full answers, which is
    # the whole cap; the samples then use all of it, so the next round cannot be reserved
    price = Price(prompt=0.0, cached_prompt=0.0, completion=1.0)
    cap = Budget(tier="edge", usd=3 * bound / 1e6, per="1d", soft=1.0)
    edge = Scripted({"k1": [answer("alert"), answer("none"), answer("alert")]}, per_sample=bound)
    d = (await run(pipeline(Vote(n=5, min_score=0.5), (cap,), price), ["k1"], edge))["k1"]
    assert [c[1] for c in edge.calls] == [3]
    assert any(s.startswith("edge: vote stopped after 3 samples: budget tier=edge") for s in d.trace.skipped)
    assert (d.action, d.confidence, d.trace.vote) == ("alert", pytest.approx(2 / 3, abs=1e-4), {"alert": 2, "none": 1})
    assert d.usage.cost_usd == pytest.approx(3 * bound / 1e6)


async def test_a_replayed_event_draws_the_same_samples():
    runs = []
    for _ in range(2):
        edge = Scripted({"k": [answer("alert"), answer("none"), answer("none"), answer("none")]})
        await run(pipeline(Vote(n=5, min_score=0.5)), ["k"], edge)
        runs.append(edge.calls)
    assert runs[0] == runs[1] and runs[0][0][3] == seed_of("k")


def test_the_tally_stops_exactly_when_the_outcome_cannot_change():
    class A(msgspec.Struct, frozen=True):
        action: str
        confidence: float = 0.5

    # every sequence of 7 samples over 3 actions (and abstentions): drawing by next_draw never
    # stops while the leader could still be caught, and the winner equals the full vote's
    import itertools
    for seq in itertools.product("abn", repeat=7):
        t = Tally(7)
        i = 0
        while not t.decided():
            k = t.next_draw()
            t.add([None if c == "n" else A(c) for c in seq[i : i + k]])
            i += k
        full = [c for c in seq if c != "n"]
        votes = {c: full.count(c) for c in "ab"}
        w = t.winner()
        if w is not None and votes["a"] != votes["b"]:
            assert w.action == max(votes, key=votes.get), (seq, t.counts())


@pytest.mark.parametrize(("kw", "message"), [
    ({"n": 4}, "Vote.n must be odd, 3 to 15"),
    ({"severity": "urgent"}, "Vote.severity must be one of"),
    ({"temperature": 0.0}, "Vote.temperature must be in (0, 2]"),
])
def test_bad_vote_settings_are_refused_clearly(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Vote(**kw)

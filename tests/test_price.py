"""Prices: exact cost from usage, cached prompt tokens at the cached price; a hosted model's
list price from genai-prices (checked against its own calculator); a self-hosted engine's
price from $/hour and throughput; and a decision's usage.cost_usd computed with the tier's."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from genai_prices import Usage as GPUsage
from genai_prices import calc_price
from openai_script_server import ScriptedOpenAIServer, chat_reply

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline

GOOD = json.dumps({"action": "alert", "severity": "high", "reason": "r", "confidence": 0.9})


def test_cost_bills_cached_prompt_tokens_at_the_cached_price():
    p = Price(prompt=3.0, cached_prompt=0.3, completion=15.0)
    assert p.cost(2_000, 1_500, 200) == pytest.approx((500 * 3.0 + 1_500 * 0.3 + 200 * 15.0) / 1e6, abs=1e-15)
    assert Price(prompt=3.0, completion=15.0).cost(2_000, 1_500, 200) == pytest.approx((2_000 * 3 + 200 * 15) / 1e6)
    assert p.cost(100, 400, 0) == pytest.approx(100 * 0.3 / 1e6)  # cached never exceeds the prompt


@pytest.mark.parametrize(("model", "provider"), [("gpt-4o", "openai"), ("claude-3-5-haiku-latest", "anthropic")])
@pytest.mark.parametrize(("prompt", "cached", "completion"), [(1_000, 0, 100), (12_345, 10_000, 321), (7, 7, 0)])
def test_hosted_prices_agree_with_genai_prices_own_calculation(model, provider, prompt, cached, completion):
    p = Price.hosted(model, provider)
    theirs = calc_price(GPUsage(input_tokens=prompt, cache_read_tokens=cached, output_tokens=completion),
                        model, provider_id=provider).total_price
    assert Decimal(str(round(p.cost(prompt, cached, completion), 12))) == pytest.approx(theirs, abs=Decimal("1e-12"))
    assert p.cached_prompt < p.prompt < p.completion and p.source.startswith("genai-prices ")


def test_unknown_hosted_model_and_bad_prices_are_clear_errors():
    with pytest.raises(ValueError, match=r"^no price for model 'my-own-llm' in genai-prices' data .*state it with "
                                         r"Price\(prompt=, cached_prompt=, completion=\)$"):
        Price.hosted("my-own-llm")
    with pytest.raises(ValueError, match=r"Price.prompt must be a number >= 0 \(USD per million tokens\), got -1"):
        Price(prompt=-1)
    with pytest.raises(ValueError, match="Price.completion must be a number >= 0"):
        Price(completion=float("nan"))
    with pytest.raises(ValueError, match="needs usd_per_hour >= 0"):
        Price.self_hosted(usd_per_hour=2.0, prompt_tokens_per_s=0, completion_tokens_per_s=10)


def test_self_hosted_price_from_dollars_per_hour_and_throughput():
    # $3.60/h = $0.001/s; 10,000 prompt tokens/s -> $0.1/MTok; 100 completion tokens/s -> $10/MTok
    p = Price.self_hosted(usd_per_hour=3.6, prompt_tokens_per_s=10_000, completion_tokens_per_s=100)
    assert (p.prompt, p.cached_prompt, p.completion) == pytest.approx((0.1, 0.0, 10.0))


async def test_a_decisions_cost_is_exact_from_its_usage_and_the_tiers_price():
    price = Price(prompt=2.0, cached_prompt=0.5, completion=8.0)
    with ScriptedOpenAIServer([chat_reply(GOOD, prompt_tokens=1_000, completion_tokens=40, cached=800)]) as srv:
        pipe = Pipeline(name="p", key="k", time="ts", actions=("none", "alert"),
                        gate=GatePolicy(rules=(Rule("always", lambda e: True),)),
                        tiers=(TierSpec("reflex", max_batch=1),
                               TierSpec("edge", engine=srv.url, model="m", price=price)))
        sink = MemorySink()
        await pipe.worker(MemorySource([{"k": "a", "ts": 1.0}]), sink).run()
    (d,) = sink.decisions
    assert d.tier == "edge" and (d.usage.prompt_tokens, d.usage.cached_prompt_tokens) == (1_000, 800)
    assert d.usage.cost_usd == round((200 * 2.0 + 800 * 0.5 + 40 * 8.0) / 1e6, 8)

"""Prices: what a tier's tokens cost, in USD per million tokens.

A decision's `usage.cost_usd` is exact from its usage: prompt tokens served from a cache are
billed at the cached price, the rest of the prompt at the prompt price, completion tokens at
the completion price.

* `Price(prompt=, cached_prompt=, completion=)`: stated outright (a contract price);
* `Price.hosted("gpt-4o", provider="openai")`: a hosted model's list price, from the price
  data `genai-prices` maintains and ships (its bundled snapshot: nothing is fetched at run time);
* `Price.self_hosted(usd_per_hour=, prompt_tokens_per_s=, completion_tokens_per_s=)`: a
  self-hosted engine (vLLM, the JAX edge model) priced by what its machine costs per hour
  over the tokens per second measured on it; a prompt token served from cache costs no
  compute, so it is free.

>>> p = Price(prompt=2.5, cached_prompt=1.25, completion=10.0)
>>> round(p.cost(prompt_tokens=1_000, cached_prompt_tokens=600, completion_tokens=100), 8)
0.00275
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["Price"]

_PER = 1_000_000
USDPerMTok = Annotated[float, Meta(ge=0.0)]


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """USD per million tokens. `cached_prompt` None means cached tokens cost the prompt price."""

    prompt: USDPerMTok = 0.0
    cached_prompt: USDPerMTok | None = None
    completion: USDPerMTok = 0.0
    source: str = ""  # where the figures came from, for ledgers and explain

    def __post_init__(self) -> None:
        for name in ("prompt", "cached_prompt", "completion"):
            v = getattr(self, name)
            if v is not None and not v >= 0.0:  # also refuses NaN
                msg = f"Price.{name} must be a number >= 0 (USD per million tokens), got {v!r}"
                raise ValueError(msg)

    def cost(self, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call's usage (cached tokens are part of the prompt tokens)."""
        cached = min(cached_prompt_tokens, prompt_tokens)
        cached_price = self.prompt if self.cached_prompt is None else self.cached_prompt
        return ((prompt_tokens - cached) * self.prompt + cached * cached_price
                + completion_tokens * self.completion) / _PER

    @classmethod
    def hosted(cls, model: str, provider: str | None = None) -> Price:
        """A hosted model's list price from genai-prices' bundled data; a clear error for a
        model it does not know (then state the price with `Price(...)`)."""
        from genai_prices import Usage, calc_price

        def usd(**tokens: int) -> float:
            return float(calc_price(Usage(**tokens), model, provider_id=provider).total_price)

        try:
            prompt = usd(input_tokens=_PER)
            cached = usd(input_tokens=_PER, cache_read_tokens=_PER)
            completion = usd(output_tokens=_PER)
        except LookupError as e:
            where = f" from provider {provider!r}" if provider else ""
            msg = (f"no price for model {model!r}{where} in genai-prices' data ({e}); "
                   "state it with Price(prompt=, cached_prompt=, completion=)")
            raise ValueError(msg) from None
        from genai_prices import __version__

        return cls(prompt=prompt, cached_prompt=cached, completion=completion,
                   source=f"genai-prices {__version__}: {model}" + (f" ({provider})" if provider else ""))

    @classmethod
    def self_hosted(cls, *, usd_per_hour: float, prompt_tokens_per_s: float,
                    completion_tokens_per_s: float) -> Price:
        """Price a self-hosted engine by its machine's cost over its measured throughput."""
        if not (usd_per_hour >= 0 and prompt_tokens_per_s > 0 and completion_tokens_per_s > 0):
            msg = ("Price.self_hosted needs usd_per_hour >= 0 and measured prompt_tokens_per_s and "
                   "completion_tokens_per_s > 0")
            raise ValueError(msg)
        per_s = usd_per_hour / 3600.0
        return cls(prompt=per_s / prompt_tokens_per_s * _PER, cached_prompt=0.0,
                   completion=per_s / completion_tokens_per_s * _PER,
                   source=f"self-hosted: ${usd_per_hour}/h at {prompt_tokens_per_s:g} prompt and "
                          f"{completion_tokens_per_s:g} completion tokens/s")

"""Spend: what each tenant's calls at each tier used and cost, and what is reserved for calls
in flight. The reasoner adds every call (failed ones too) as it ends; ledgers and metrics
read it. One row per (tenant, tier): bounded by tenants × tiers, never by keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ponder.types import Usage

__all__ = ["Spend"]


@dataclass
class _Row:
    calls: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    reserved_usd: float = 0.0


class Spend:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], _Row] = {}

    def _row(self, tenant: str, tier: str) -> _Row:
        row = self._rows.get((tenant, tier))
        if row is None:
            row = self._rows[(tenant, tier)] = _Row()
        return row

    def call(self, tenant: str, tier: str, usage: Usage, usd: float) -> None:
        r = self._row(tenant, tier)
        r.calls += 1
        r.prompt_tokens += usage.prompt_tokens
        r.cached_prompt_tokens += usage.cached_prompt_tokens
        r.completion_tokens += usage.completion_tokens
        r.usd += usd

    def reserve(self, tenant: str, tier: str, usd: float) -> None:
        """Add (or, negative, take back) a reservation."""
        r = self._row(tenant, tier)
        r.reserved_usd = max(0.0, r.reserved_usd + usd)

    def rows(self) -> list[dict]:
        return [{"tenant": t, "tier": tier, **{k: round(v, 10) if isinstance(v, float) else v
                                                for k, v in asdict(r).items()}}
                for (t, tier), r in sorted(self._rows.items())]

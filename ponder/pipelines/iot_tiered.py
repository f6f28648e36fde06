"""Built-in tiered pipeline: `iot_monitor`'s telemetry, gate and reflex rules, with an edge model
and a cloud model above the reflex tier, two tenants and their budgets.

The engines come from the environment, so one module serves `ponder demo`, `ponder run` and
`ponder worker` alike:

* `PONDER_EDGE_ENGINE`: the edge tier, `jax:CHECKPOINT_DIR` (in process; `ponder init-model`
  writes one) or the URL of an OpenAI-compatible server;
* `PONDER_CLOUD_URL`: the cloud tier, an OpenAI-compatible server (vLLM; `ponder serve-model`
  stands in for it), e.g. `http://vllm:8000/v1`;
* `PONDER_CLOUD_MODEL`: the model the cloud server serves (optional when it serves one).

Events name their tenant in the `tenant` field (`ponder simulate --tenants 2`). Routing: gate
scores below `EDGE_SCORE` stay at the reflex tier, scores from `CLOUD_SCORE` go to the cloud
(to the edge when a budget refuses it), the rest to the edge.

Prices. The edge is self-hosted, priced by an illustrative edge box's hourly cost over its
throughput. The cloud tier is priced at gpt-4o's list price (genai-prices' bundled data): a
stand-in for what a hosted model would charge, whatever model the cloud URL really serves.

    PONDER_EDGE_ENGINE=jax:models/edge PONDER_CLOUD_URL=http://localhost:8000/v1 \\
        ponder run ponder.pipelines.iot_tiered:pipeline --input events.jsonl
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Mapping

import msgspec

from ponder.operators.budget import Budget
from ponder.operators.context import ContextPolicy
from ponder.operators.price import Price
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import Telemetry
from ponder.pipelines.iot_monitor import pipeline as monitor
from ponder.pipelines.pipeline import Pipeline

__all__ = ["BUDGETS", "CLOUD_PRICE", "EDGE_PRICE", "TenantTelemetry", "build", "pipeline"]

EDGE_ENV, CLOUD_ENV, CLOUD_MODEL_ENV = "PONDER_EDGE_ENGINE", "PONDER_CLOUD_URL", "PONDER_CLOUD_MODEL"
# Surprise (gate.Verdict): 0.5 at a finding's bar; 0.6 a tenth past it; 0.8 about half past it,
# or a key's first incident in a while that is clearly past its bar
EDGE_SCORE, CLOUD_SCORE = 0.6, 0.8
# An edge answer less confident than this goes up to the cloud. 0: random weights answer with
# confidence 0, which would send every edge call on up; a trained edge model would set ~0.6.
EDGE_CONFIDENCE = 0.0
# A shorter history than iot_monitor's (8 recent readings, 2 folded segments): prompts of
# ~2,000 characters, which a small model on a CPU prefills in a second or two.
CONTEXT = ContextPolicy(window=8, summary_segments=2)

# An illustrative edge box: $0.05 an hour for a CPU/NPU that prefills 2,000 and decodes 50 tokens/s.
EDGE_PRICE = Price.self_hosted(usd_per_hour=0.05, prompt_tokens_per_s=2_000.0, completion_tokens_per_s=50.0)
_HOSTED = Price.hosted("gpt-4o", "openai")
CLOUD_PRICE = msgspec.structs.replace(_HOSTED, source=f"stand-in for a hosted model: {_HOSTED.source}")

# USD per hour: each tenant's cloud spend (acme and globex: `ponder simulate --tenants 2`), and
# everything the pipeline spends at model tiers. Illustrative, and small: a cloud call here costs
# about half a cent but first reserves its worst case, about $0.025 (three attempts, the whole
# answer budget), so both tenants run into their caps within `ponder demo`, globex (the smaller
# plan) first, and their later cloud-bound events are answered at the edge instead. A cap below
# one call's worst case would shut its tenant out of the tier altogether.
BUDGETS = (
    Budget(tenant="acme", tier="cloud", usd=0.06, per="1h"),
    Budget(tenant="globex", tier="cloud", usd=0.04, per="1h"),
    Budget(tier="*", usd=0.25, per="1h"),
)
TENANT_WEIGHTS: Mapping[str, float] = {"acme": 2.0, "globex": 1.0}


class TenantTelemetry(Telemetry):
    """A reading that names its tenant. The schema must declare the field: a decoder with a
    schema keeps only the schema's fields, and would find no tenant otherwise."""

    tenant: str | None = None


def build(edge: str, cloud: str, *, cloud_model: str = "", cloud_timeout_s: float = 120.0) -> Pipeline:
    """The tiered pipeline with these engine specs (`jax:PATH` or an http(s) URL each).
    `cloud_timeout_s`: one cloud call's deadline, retries included (a cold CPU server compiling
    its first shapes needs minutes; vLLM on a GPU, seconds)."""
    tiers = (
        TierSpec("reflex", max_batch=1),
        TierSpec("edge", engine=edge, min_score=EDGE_SCORE, min_confidence=EDGE_CONFIDENCE, max_batch=8,
                 timeout_s=120.0, price=EDGE_PRICE),
        TierSpec("cloud", engine=cloud, model=cloud_model, min_score=CLOUD_SCORE, max_batch=8,
                 timeout_s=cloud_timeout_s, price=CLOUD_PRICE),
    )
    return replace(monitor, name="iot_tiered", schema=TenantTelemetry, context=CONTEXT, tenant="tenant",
                   tiers=tiers, budgets=BUDGETS, tenant_weights=TENANT_WEIGHTS)


def _required(name: str, example: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        msg = f"ponder.pipelines.iot_tiered needs ${name}: {example}"
        raise ValueError(msg)
    return value


def pipeline() -> Pipeline:
    """The tiered pipeline on the engines the environment names (see the module docstring)."""
    edge = _required(EDGE_ENV, "jax:CHECKPOINT_DIR (`ponder init-model DIR` writes one) or an "
                               "OpenAI-compatible server's URL, e.g. http://localhost:8001/v1")
    cloud = _required(CLOUD_ENV, "the URL of an OpenAI-compatible server (vLLM, `ponder serve-model`), "
                                 "e.g. http://localhost:8000/v1")
    if not cloud.startswith(("http://", "https://")):
        msg = f"${CLOUD_ENV} must be an http(s):// URL of an OpenAI-compatible server, got {cloud!r}"
        raise ValueError(msg)
    return build(edge, cloud, cloud_model=os.environ.get(CLOUD_MODEL_ENV, "").strip())

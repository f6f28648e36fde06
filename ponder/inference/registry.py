"""Resolve a tier's engine spec into an Engine."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from ponder.inference.engine import Engine
from ponder.inference.reflex import ReflexEngine, ReflexRule

if TYPE_CHECKING:
    from ponder.operators.route import TierSpec

__all__ = ["build_engine"]

_RETRIES = 2
# the engine's deadline sits a little inside the batcher's, so that the engine is the one that
# gives up: it cancels its streams and reports what the attempts used
_DEADLINE_SHARE = 0.95


def build_engine(spec: str | Engine, *, tier: TierSpec | None = None, rules: Sequence[ReflexRule] = (),
                 default_action: str = "none") -> Engine:
    """Build the engine a spec names.

    * `reflex`: the rule engine;
    * `jax:PATH`: the checkpoint directory PATH run in process (JaxEngine, chat layout);
    * `http://…` / `https://…`: any OpenAI-compatible server (vLLM, llama.cpp, `ponder
      serve-model`), with the tier's `server` profile and `extra_body`; the API key, if any,
      comes from $PONDER_API_KEY;
    * an Engine instance is used as is.
    """
    if not isinstance(spec, str):
        if not hasattr(spec, "generate"):
            msg = f"engine must be a spec string or an Engine, got {type(spec).__name__}"
            raise TypeError(msg)
        return spec
    if spec == "reflex":
        return ReflexEngine(rules, default_action=default_action)
    if spec.startswith("jax:"):
        from ponder.inference.jax.engine import JaxEngine

        path = spec[len("jax:") :]
        if not path:
            raise ValueError("engine spec 'jax:' needs a checkpoint directory: jax:PATH")
        return JaxEngine(path, max_batch=tier.max_batch if tier else 8,
                         model_name=(tier.model if tier else "") or None)
    if spec.startswith(("http://", "https://")):
        from ponder.inference.openai import OpenAIEngine

        if tier is None:
            return OpenAIEngine(spec, api_key=os.environ.get("PONDER_API_KEY"), retries=_RETRIES)
        return OpenAIEngine(spec, tier.model, server=tier.server, extra_body=dict(tier.extra_body or {}),
                            max_concurrency=tier.max_batch * tier.max_concurrency,
                            timeout_s=tier.timeout_s * _DEADLINE_SHARE, stall_s=tier.stall_s,
                            retries=_RETRIES, tier=tier.name, api_key=os.environ.get("PONDER_API_KEY"))
    msg = (f"unknown engine spec {spec!r}: expected 'reflex', 'jax:PATH', an http(s):// URL of an "
           "OpenAI-compatible server, or an Engine instance")
    raise ValueError(msg)

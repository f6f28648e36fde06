"""Resolve a tier's engine spec into an Engine.

Engines know requests, not pipelines: the pipeline hands `build_engine` plain arguments taken
from its tier, so nothing here imports the operators' configuration.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ponder.inference.egress import Egress
from ponder.inference.engine import Engine
from ponder.inference.reflex import ReflexEngine, ReflexRule
from ponder.inference.servers import ServerProfile

__all__ = ["build_engine"]

# the engine's deadline sits a little inside the batcher's, so that the engine is the one that
# gives up: it cancels its streams and reports what the attempts used
_DEADLINE_SHARE = 0.95


def build_engine(spec: str | Engine, *, rules: Sequence[ReflexRule] = (), default_action: str = "none",
                 name: str = "", model: str = "", max_batch: int = 8, max_concurrency: int = 4,
                 timeout_s: float = 30.0, server: str | ServerProfile = "auto",
                 extra_body: Mapping[str, Any] | None = None, stall_s: float | None = None,
                 retries: int = 2, trusted_local: bool = False, privacy_key: bytes | None = None,
                 near_identical: int | None = None) -> Engine:
    """Build the engine a spec names (the keyword arguments are a tier's settings).

    * `reflex`: the rule engine;
    * `jax:PATH`: the checkpoint directory PATH run in process (JaxEngine, chat layout; a
      frame within `near_identical` grey levels of its key's last reuses its features);
    * `http://…` / `https://…`: any OpenAI-compatible server (vLLM, llama.cpp, `ponder
      serve-model`), with the tier's `server` profile and `extra_body`; the API key, if any,
      comes from $PONDER_API_KEY. Behind the privacy door (inference/egress.py, keyed by
      `privacy_key`) unless `trusted_local` (a box on the premises);
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
        return JaxEngine(path, max_batch=max_batch, model_name=model or None, near_identical=near_identical)
    if spec.startswith(("http://", "https://")):
        from ponder.inference.openai import OpenAIEngine

        engine = OpenAIEngine(spec, model, server=server, extra_body=dict(extra_body or {}),
                              max_concurrency=max_batch * max_concurrency, timeout_s=timeout_s * _DEADLINE_SHARE,
                              stall_s=stall_s, retries=retries, tier=name, api_key=os.environ.get("PONDER_API_KEY"))
        return engine if trusted_local else Egress(engine, privacy_key)
    msg = (f"unknown engine spec {spec!r}: expected 'reflex', 'jax:PATH', an http(s):// URL of an "
           "OpenAI-compatible server, or an Engine instance")
    raise ValueError(msg)

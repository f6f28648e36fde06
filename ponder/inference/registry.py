"""Resolve a tier's engine spec into an Engine."""

from __future__ import annotations

from typing import Sequence

from ponder.inference.engine import Engine
from ponder.inference.reflex import ReflexEngine, ReflexRule

__all__ = ["build_engine"]


def build_engine(spec: str | Engine, *, rules: Sequence[ReflexRule] = (), default_action: str = "none") -> Engine:
    """`reflex` builds the rule engine; an Engine instance is used as is.

    Model-backed specs (`jax:PATH`, `http(s)://…`) are resolved by their engine modules; an
    unknown spec is an error that names what is accepted.
    """
    if not isinstance(spec, str):
        if not hasattr(spec, "generate"):
            msg = f"engine must be a spec string or an Engine, got {type(spec).__name__}"
            raise TypeError(msg)
        return spec
    if spec == "reflex":
        return ReflexEngine(rules, default_action=default_action)
    msg = f"unknown engine spec {spec!r}: this build accepts 'reflex' or an Engine instance"
    raise ValueError(msg)

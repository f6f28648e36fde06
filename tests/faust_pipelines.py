"""Pipelines for tests/test_faust_runtime.py: the fault tests' `reflex_probe` (iot_monitor with a
gate that flags about one reading in ten), with every escalation sent to an edge tier: a tiny random
JAX checkpoint served by `ponder serve-model` on loopback, so the native reference run and the
faust workers share one warm model. Its URL comes from $PONDER_FAUST_EDGE, read when the worker
loads the pipeline (`faust_pipelines:edge_probe`, a callable)."""

from __future__ import annotations

import os
from dataclasses import replace

from fault_pipelines import reflex_probe

from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline

EDGE_ENV = "PONDER_FAUST_EDGE"


def edge_probe(url: str | None = None) -> Pipeline:
    """`reflex_probe` whose escalations all start at the served edge model at `url` (default: env)."""
    url = url or os.environ.get(EDGE_ENV)
    if not url:
        msg = f"edge_probe needs the model server's URL in ${EDGE_ENV}"
        raise ValueError(msg)
    # batches across keys; a breaker that never opens and a long deadline, so an answer is never
    # swapped for a reflex one (runs must agree)
    edge = TierSpec("edge", engine=url, model="edge", local=True, max_batch=8, max_wait_ms=5.0,
                    max_concurrency=2, timeout_s=300.0, failures=1_000_000, cooloff_s=0.0)
    return replace(reflex_probe, name="faust_edge", tiers=(*reflex_probe.tiers, edge))

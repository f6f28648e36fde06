"""Pipelines for the fault tests: iot_monitor with a gate that escalates often.

The fault tests need many decisions, and decisions in flight when a worker dies. The built-in
iot_monitor escalates about once per 2,000 readings of the simulated fleet; `probe` adds a rule
that flags about one reading in ten (a fixed digit of the temperature, so every run flags the
same readings), and `cooldown=quiet=1` so an open incident does not mute the next flags.

* `reflex_probe`: reflex tier only (decisions are immediate);
* `model_probe`: every escalation goes to an "edge" tier served over HTTP by an
  OpenAI-compatible server at $PONDER_FAULT_MODEL_URL (tests/fault_model_server.py), a callable
  so the URL is read when the worker loads it (`tests.fault_pipelines:model_probe`).
"""

from __future__ import annotations

import os
from dataclasses import replace

from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.iot_monitor import pipeline as iot_monitor
from ponder.pipelines.pipeline import Pipeline

MODEL_URL_ENV = "PONDER_FAULT_MODEL_URL"


def _probe(e) -> bool:
    t = e.payload.get("temperature")
    return t is not None and round(t * 100) % 10 == 0


reflex_probe = replace(
    iot_monitor, name="fault_probe",
    gate=GatePolicy(seasons=(), cooldown=1, quiet=1,
                    rules=(*iot_monitor.gate.rules, Rule("probe", _probe, field="temperature"))))


def model_probe(url: str | None = None) -> Pipeline:
    """`reflex_probe` whose escalations all go to the HTTP model at `url` (default: from env)."""
    url = url or os.environ.get(MODEL_URL_ENV)
    if not url:
        msg = f"model_probe needs the model server's URL in ${MODEL_URL_ENV}"
        raise ValueError(msg)
    # min_score 0: every escalation starts at the model; a breaker that never opens and a long
    # timeout, so a slow answer is never swapped for a reflex one (runs must agree)
    edge = TierSpec("edge", engine=url, model="fault-model", max_batch=8, max_wait_ms=2.0,
                    max_concurrency=8, timeout_s=30.0, failures=1_000_000, cooloff_s=0.0)
    return replace(reflex_probe, name="fault_model", tiers=(*reflex_probe.tiers, edge))

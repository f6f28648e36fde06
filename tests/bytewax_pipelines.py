"""Pipelines for tests/test_bytewax_runtime.py, loaded by name in worker subprocesses (native
and Bytewax alike). A `flag` rule escalates an event; every escalation goes to an edge tier:
the OpenAI-compatible model server at $PONDER_TEST_EDGE_URL (`ModelServer` on loopback with a
tiny random checkpoint, started by the test)."""

from __future__ import annotations

import os

from ponder.inference.reflex import ReflexRule
from ponder.operators.context import ContextPolicy
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline

EDGE_URL_ENV = "PONDER_TEST_EDGE_URL"
ACTIONS = ("none", "alert", "inspect")


def edge() -> Pipeline:
    return Pipeline(
        name="bw-edge", key="k", time="ts", actions=ACTIONS,
        # short prompts: a tiny model on two CPU cores prefills them quickly
        context=ContextPolicy(window=4, summary_segments=1),
        # no statistical findings: only the rule escalates, so which events reach the model is exact
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=(Rule("flag", lambda e: bool(e.payload.get("flag"))),)),
        tiers=(TierSpec("reflex", max_batch=1),
               TierSpec("edge", engine=os.environ[EDGE_URL_ENV], model="tiny", min_score=0.0, max_batch=4,
                        timeout_s=120.0)),
        reflex=(ReflexRule("rule", "alert", "high"),))

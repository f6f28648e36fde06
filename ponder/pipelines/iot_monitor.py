"""Built-in pipeline for the simulator's fleet telemetry (`ponder simulate`)."""

from __future__ import annotations

import msgspec

from ponder.inference.reflex import ReflexRule
from ponder.operators.context import ContextPolicy
from ponder.operators.gate import GatePolicy, Rule
from ponder.pipelines.pipeline import Pipeline


class Telemetry(msgspec.Struct):
    """One reading of one device. Unknown fields are tolerated (newer firmware)."""

    device_id: str
    ts: float
    site: str = ""
    temperature: float | None = None
    vibration: float | None = None
    pressure: float | None = None
    humidity: float | None = None
    status: str = "ok"


pipeline = Pipeline(
    name="iot_monitor",
    key="device_id",
    time="ts",
    schema=Telemetry,
    actions=("none", "notify", "inspect_sensor", "dispatch_technician", "emergency_shutdown"),
    instructions=(
        "You watch one industrial device's telemetry (temperature C, vibration g, pressure kPa,"
        " humidity %). Decide whether the latest reading needs action."
    ),
    context=ContextPolicy(window=32, summary_segments=6),
    # The fleet's readings follow slow drifts, not the clock: without seasonal profiles a key's
    # state stays ~5 KB instead of ~35 KB, which every checkpoint and restore pays for.
    gate=GatePolicy(seasons=(), rules=(Rule("overheat", lambda e: (e.payload.get("temperature") or 0.0) > 120.0,
                                            field="temperature"),)),
    reflex=(
        ReflexRule("rule", "emergency_shutdown", "critical"),
        ReflexRule("level_shift", "dispatch_technician", "high"),
        ReflexRule("drift", "dispatch_technician", "medium"),
        ReflexRule("stuck", "inspect_sensor", "medium"),
        ReflexRule("dropout", "inspect_sensor", "medium"),
        ReflexRule("new_value", "inspect_sensor", "medium"),
        ReflexRule("spike", "notify", "medium"),
        ReflexRule("rate", "notify", "low"),
        ReflexRule("gap", "notify", "low"),
    ),
)

"""Built-in pipeline for the simulator's fleet with cameras (`Fleet(..., camera=True)`).

The telemetry is read as `iot_monitor` reads it; each event's `frame` (a 64x48 thermal PNG as a
data URL) is decoded and checked at the door (ponder/images.py), replaced in the payload by its
reference, and sent only with its own event's request. A key's context marks a frame unchanged
since the run of identical frames began, so a static scene costs a prompt a few characters.

The gate scores a frame unlike the device's previous one (`frame_change`: another image, or with
`near_identical` set, one further than that many grey levels from it); the reflex tier answers
it with `inspect_camera`.
"""

from __future__ import annotations

from ponder.images import ImagePolicy
from ponder.inference.reflex import ReflexRule
from ponder.pipelines.iot_monitor import Telemetry
from ponder.pipelines.iot_monitor import pipeline as iot
from ponder.pipelines.pipeline import Pipeline


class CameraTelemetry(Telemetry):
    """A reading with the device camera's frame (a data URL, base64 or an allowed path)."""

    frame: str | None = None


pipeline = Pipeline(
    name="camera_monitor",
    key="device_id",
    time="ts",
    schema=CameraTelemetry,
    actions=(*iot.actions, "inspect_camera"),
    instructions=(
        "You watch one industrial device's telemetry (temperature C, vibration g, pressure kPa,"
        " humidity %) and its thermal camera (64x48 greyscale frames; the latest event's frame is"
        " attached as an image)."
        " Decide whether the latest reading needs action."
    ),
    context=iot.context,
    gate=iot.gate,
    images=ImagePolicy(fields=("frame",), max_bytes=64_000, max_pixels=640 * 480),
    reflex=(ReflexRule("frame_change", "inspect_camera", "medium", field="frame"), *iot.reflex),
)

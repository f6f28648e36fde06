"""ponder: continuous model reasoning over keyed event streams.

Define a Pipeline (what to watch, when to think, what may be done) and run it with
`ponder run module:pipeline`, or embed it with `Pipeline.worker(source, sink).run()`.
"""

from ponder.connectors.files import CsvSink, CsvSource, JsonlSink, JsonlSource, NabSource
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.images import Image, ImagePolicy
from ponder.inference.reflex import ReflexEngine, ReflexRule
from ponder.operators.budget import Budget
from ponder.operators.context import ContextPolicy
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.price import Price
from ponder.operators.privacy import FieldRule, Policy, Privacy
from ponder.operators.route import TierSpec
from ponder.operators.vote import Vote
from ponder.pipelines.pipeline import Pipeline, load_pipeline
from ponder.types import DeadLetter, Decision, Event, SourcePos, Usage

__all__ = [
    "Pipeline", "load_pipeline", "ContextPolicy", "GatePolicy", "Rule", "TierSpec", "Price", "Budget", "Vote", "Privacy", "Policy",
    "FieldRule", "ReflexRule",
    "ReflexEngine", "JsonlSource", "JsonlSink", "CsvSource", "CsvSink", "NabSource", "MemorySource",
    "MemorySink", "Event", "Image", "ImagePolicy", "Decision", "DeadLetter", "SourcePos", "Usage",
]
__version__ = "0.1.0"

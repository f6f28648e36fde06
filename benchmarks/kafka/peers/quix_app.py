"""Quix Streams 3.28 peer: a StreamingDataFrame with a stateful apply over RocksDB state (with its
changelog topic), outputs to a topic. Configured by BENCH_* environment variables (see
../throughput.py).

Tansu workarounds (docs/kafka-testing.md): DescribeConfigs returns nothing, so the topic
manager's `retention.ms`/`retention.bytes` are filled in before it derives the changelog
topic's config; input and output topics are created by the harness beforehand.
"""

from __future__ import annotations

import os

from quixstreams import Application, message_context
from quixstreams.models.topics.manager import TopicManager
from quixstreams.state.rocksdb import RocksDBOptions
from quixstreams.utils.json import dumps as json_dumps

from peer_logic import first_event_marker, make_logic

E = os.environ

_derive = TopicManager.derive_topic_config.__func__


def _derive_with_retention(cls, topics):
    topics = list(topics)
    for t in topics:
        cfg = t.broker_config
        if cfg is not None and cfg.extra_config is not None:
            cfg.extra_config.setdefault("retention.ms", "-1")
            cfg.extra_config.setdefault("retention.bytes", "-1")
    return _derive(cls, topics)


TopicManager.derive_topic_config = classmethod(_derive_with_retention)


def _dumps(v):  # state values are already msgpack bytes; keys ("s") go through JSON
    return v if type(v) is bytes else json_dumps(v)


app = Application(
    broker_address=E["BENCH_BROKERS"],
    consumer_group=E["BENCH_GROUP"],
    auto_offset_reset="earliest",
    state_dir=E["BENCH_STATE"],
    commit_interval=float(E.get("BENCH_COMMIT_S", "2.0")),
    consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                           "max.poll.interval.ms": 6000},
    producer_extra_config={"linger.ms": 5},
    rocksdb_options=RocksDBOptions(dumps=_dumps, loads=lambda b: b),
)
source = app.topic(E["BENCH_IN"], key_deserializer="bytes", value_deserializer="bytes")
sink = app.topic(E["BENCH_OUT"], key_serializer="bytes", value_serializer="bytes")
logic = make_logic(E["BENCH_LOGIC"])
step = logic.step


def process(value: bytes, state) -> bytes | None:
    first_event_marker()
    ctx = message_context()
    new, out = step(state.get("s"), value, ctx.topic, ctx.partition, ctx.offset)
    if new is not None:
        state.set("s", new)
    return out


sdf = app.dataframe(source)
sdf = sdf.apply(process, stateful=True)
sdf = sdf.filter(lambda v: v is not None)
sdf.to_topic(sink)

if __name__ == "__main__":
    app.run()

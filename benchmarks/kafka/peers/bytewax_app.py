"""Bytewax 0.21.1 peer: KafkaSource -> key_on -> stateful_map (per-key state as Python objects,
snapshotted to Bytewax's SQLite recovery store when run with -r) -> KafkaSink. Configured by
BENCH_* environment variables (see ../throughput.py).

    python -m bytewax.run bytewax_app:flow -w 1 [-r RECOVERY_DIR -s 2 -b 0]

Bytewax's Kafka source joins no consumer group (static partition assignment; offsets live in its
recovery store), so the harness cannot poll committed offsets. Instead, after the last input
offset of a partition (BENCH_ENDS, from the harness) is processed, a marker record goes to
BENCH_DONE through the same sink; the harness waits for one marker per partition.
"""

from __future__ import annotations

import json
import os

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow

from peer_logic import first_event_marker, make_logic

E = os.environ
ends = {int(p): int(o) for p, o in json.loads(E["BENCH_ENDS"]).items()}
out_topic, done_topic = E["BENCH_OUT"], E["BENCH_DONE"]
logic = make_logic(E["BENCH_LOGIC"])
step = logic.step_obj


def mapper(state, msg):
    first_event_marker()
    state, out = step(state, msg.value, msg.topic, msg.partition, msg.offset)
    return state, (out, msg.partition, msg.offset)


def to_sink(item):
    key, (out, partition, offset) = item
    msgs = []
    if out is not None:
        msgs.append(KafkaSinkMessage(key.encode(), out, topic=out_topic))
    if offset == ends.get(partition, -1) - 1:
        msgs.append(KafkaSinkMessage(b"done", str(partition).encode(), topic=done_topic))
    return msgs


flow = Dataflow("bench")
stream = op.input("in", flow, KafkaSource([E["BENCH_BROKERS"]], [E["BENCH_IN"]], tail=True,
                                          batch_size=int(E.get("BENCH_BYTEWAX_BATCH", "1000"))))
keyed = op.key_on("key", stream, lambda m: m.key.decode())
state = op.stateful_map("logic", keyed, mapper)
msgs = op.flat_map("to_sink", state, to_sink)
op.output("out", msgs, KafkaSink([E["BENCH_BROKERS"]], None))

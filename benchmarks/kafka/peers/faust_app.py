"""faust-streaming 0.15.3 peer: one agent, a RocksDB table (rocksdict) of per-key state, outputs
to a topic. Configured by BENCH_* environment variables (see ../throughput.py).

    python faust_app.py worker --without-web -l warn
"""

from __future__ import annotations

import os

import faust

from peer_logic import first_event_marker, make_logic

E = os.environ
partitions = int(E["BENCH_PARTITIONS"])
app = faust.App(
    E["BENCH_GROUP"],  # the app id is the consumer group
    broker=f"kafka://{E['BENCH_BROKERS']}",
    store="rocksdb://",  # uses rocksdict when python-rocksdb is absent
    datadir=E["BENCH_STATE"],
    topic_partitions=partitions,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=6.0,
    broker_rebalance_timeout=6.0,
    broker_heartbeat_interval=1.0,
    broker_commit_interval=float(E.get("BENCH_COMMIT_S", "2.0")),
    web_enabled=False,
    # the changelog end-offset quirk (docs/kafka-testing.md) only matters on recovery
    producer_max_batch_size=int(E.get("BENCH_FAUST_BATCH", str(1 << 20))),
)
source = app.topic(E["BENCH_IN"], key_serializer="raw", value_serializer="raw", partitions=partitions)
sink = app.topic(E["BENCH_OUT"], key_serializer="raw", value_serializer="raw", partitions=partitions)
table = app.Table("state", default=None, partitions=partitions, key_type=bytes,
                  value_type=bytes)  # bytes: the "raw" codec
logic = make_logic(E["BENCH_LOGIC"])
step = logic.step


@app.agent(source)
async def process(stream):
    async for event in stream.events():
        first_event_marker()
        msg = event.message
        key = event.key
        state, out = step(table.get(key), event.value, msg.topic, msg.partition, msg.offset)
        if state is not None:
            table[key] = state
        if out is not None:
            await sink.send(key=key, value=out)


if __name__ == "__main__":
    app.main()

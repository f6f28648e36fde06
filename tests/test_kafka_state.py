"""Reading partitions to their end, changelog publish/restore and RocksDB stores, on a real broker."""

from __future__ import annotations

import asyncio

from ponder.connectors.kafka import KafkaChangelog, ensure_topics, read_to_end
from ponder.state.memory import MemoryStore
from ponder.state.rocks import RocksStore


def test_read_to_end_returns_every_record_of_many_busy_partitions(broker):
    parts, per = 16, 3000
    values = [f"{p}:{i}".encode() for i in range(per) for p in range(parts)]

    async def go():
        from aiokafka import AIOKafkaProducer

        await ensure_topics(broker, {"many": parts})
        prod = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=5)
        await prod.start()
        for v in values:
            await prod.send("many", v, partition=int(v.split(b":")[0]))
        await prod.flush()
        await prod.stop()
        got: dict[int, list[int]] = {p: [] for p in range(parts)}
        async for p, batch in read_to_end(broker, "many", {p: 0 for p in range(parts)}, max_records=700):
            got[p].extend(int(r.value.split(b":")[1]) for r in batch)
        tail: dict[int, list[int]] = {p: [] for p in range(parts)}
        async for p, batch in read_to_end(broker, "many", {p: per - 5 for p in range(parts)}):
            tail[p].extend(r.offset for r in batch)
        return got, tail

    got, tail = asyncio.run(go())
    assert all(got[p] == list(range(per)) for p in range(parts)), {p: len(v) for p, v in got.items()}
    assert all(tail[p] == list(range(per - 5, per)) for p in range(parts))


def test_changelog_restores_every_partition_into_an_empty_store(broker, tmp_path):
    parts = 16

    async def go():
        await ensure_topics(broker, {"cl-test": parts}, compacted=("cl-test",))
        log = KafkaChangelog(broker, "cl-test")
        await log.start()
        want: dict[int, dict[str, bytes]] = {p: {} for p in range(parts)}
        reached = {}
        for round_ in range(3):
            batches = {}
            for p in range(parts):
                states = {f"k{p}-{i}": f"{round_}:{i}".encode() * 50 for i in range(400)}
                if round_ == 2:
                    states[f"k{p}-0"] = None  # a deleted key becomes a tombstone
                batches[p] = (states, {"decisions_from": round_})
                for k, v in states.items():
                    if v is None:
                        want[p].pop(k, None)
                    else:
                        want[p][k] = v
            reached = await log.publish(batches)
        await log.stop()
        stores = {p: RocksStore(tmp_path / f"p{p}") for p in range(parts)}
        metas = await KafkaChangelog(broker, "cl-test").restore(stores)
        got = {p: dict(s.items()) for p, s in stores.items()}
        # a second restore from the recorded offset reads nothing new and changes nothing
        again = await KafkaChangelog(broker, "cl-test").restore(stores)
        for s in stores.values():
            s.close()
        return want, got, metas, again, reached

    want, got, metas, again, reached = asyncio.run(go())
    for p in range(16):
        assert got[p] == want[p], f"partition {p}: {len(got[p])} of {len(want[p])} keys"
        assert metas[p] == {"decisions_from": 2, "changelog": reached[p]}
    assert again == metas


def test_memory_and_rocks_stores_agree(tmp_path):
    ops = [({"a": b"1", "b": b"2"}, {("t", 0): 5}, {"changelog": 3}),
           ({"a": None, "c": b"3"}, {("t", 0): 9, ("t", 1): 2}, None),
           ({"b": b"22"}, {}, {"decisions_from": 7})]
    stores = [MemoryStore(), RocksStore(tmp_path / "db")]
    for states, positions, meta in ops:
        for s in stores:
            s.write(states, positions, meta)
    m, r = stores
    assert dict(m.items()) == dict(r.items()) == {"b": b"22", "c": b"3"}
    assert m.positions() == r.positions() == {("t", 0): 9, ("t", 1): 2}
    assert m.meta() == r.meta() == {"changelog": 3, "decisions_from": 7}
    r.close()
    reopened = RocksStore(tmp_path / "db")
    assert dict(reopened.items()) == {"b": b"22", "c": b"3"} and reopened.get("a") is None
    reopened.close()

"""Topic administration: create what is missing, read partition counts."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

__all__ = ["ensure_keyed_topics", "ensure_topics", "partition_count"]

logger = logging.getLogger(__name__)

_ALREADY_EXISTS = TopicAlreadyExistsError.errno


async def ensure_topics(brokers: str, topics: dict[str, int], *, compacted: tuple[str, ...] = (),
                        replication: int = 1) -> dict[str, int]:
    """Create missing topics with the given partition counts; return every topic's actual count.

    Compacted topics get `cleanup.policy=compact` (brokers that ignore topic configs still
    create them). An existing topic keeps its partition count: callers check it.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=15000)
    await admin.start()
    try:
        new = [NewTopic(name, num_partitions=n, replication_factor=replication,
                        topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
               for name, n in topics.items()]
        resp = await admin.create_topics(new)
        for name, code, message in resp.topic_errors:
            if code == 0:
                logger.info("created topic %r with %d partitions", name, topics[name])
            elif code != _ALREADY_EXISTS:
                msg = f"cannot create topic {name!r}: error {code} {message}"
                raise RuntimeError(msg)
        described = await admin.describe_topics(list(topics))
        return {d["topic"]: len(d["partitions"]) for d in described}
    finally:
        await admin.close()


async def partition_count(brokers: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=15000)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        return len(described[0]["partitions"]) if described else 0
    finally:
        await admin.close()


async def ensure_keyed_topics(brokers: str, source: str, outputs: tuple[str, ...], partitions: int, *,
                              compacted: tuple[str, ...] = ()) -> int:
    """Create a keyed pipeline's topics: the source with `partitions` if missing, each output
    (decisions, dead letters, a changelog) with as many as the source has. Return the source's
    count; raise ValueError for an existing output with fewer, since the outputs of source
    partition p go to partition p."""
    n = (await ensure_topics(brokers, {source: partitions}))[source]
    counts = await ensure_topics(brokers, dict.fromkeys(outputs, n), compacted=compacted)
    for t in outputs:
        if counts[t] < n:
            msg = (f"topic {t!r} has {counts[t]} partitions but input {source!r} has {n}: outputs of "
                   f"input partition p go to partition p, so it needs at least {n}")
            raise ValueError(msg)
    return n

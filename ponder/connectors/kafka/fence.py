"""Fencing without transactions: a worker that may have lost its partitions must not let a
record it already handed to the broker land afterwards.

Without Kafka transactions nothing on the broker rejects a zombie's late writes, and a produce
request that timed out on the client may still sit in the kernel's send buffer: when a cut
network comes back, TCP delivers it after the partitions' new owner has already written the
same outputs. So when the membership lease lapses while records are unacknowledged, the
producer's connections are reset (SO_LINGER 0: the kernel discards unsent bytes and answers
with RST) and the producer is never used again: the worker stops, commits nothing more, and the
new owner replays what those records were for.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable

from aiokafka import AIOKafkaProducer

__all__ = ["reset_connections", "watch_lease"]

logger = logging.getLogger(__name__)

_RESET = struct.pack("ii", 1, 0)


def reset_connections(producer: AIOKafkaProducer) -> int:
    """Abort every connection of `producer` with a TCP reset; returns how many."""
    client = producer.client
    n = 0
    for conn in list(client._conns.values()):  # noqa: SLF001 - aiokafka has no public handle
        writer = conn._writer  # noqa: SLF001
        if writer is None:
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            except OSError:
                pass
        writer.transport.abort()
        conn.close()
        n += 1
    return n


async def watch_lease(may_send: Callable[[], bool], unacknowledged: Callable[[], bool],
                      fence: Callable[[], None], period_s: float = 0.05) -> None:
    """Call `fence` once the lease lapses while records are unacknowledged."""
    while True:
        await asyncio.sleep(period_s)
        if unacknowledged() and not may_send():
            fence()
            return

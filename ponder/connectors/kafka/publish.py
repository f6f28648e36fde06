"""Publishing events to and reading records from topics, for the `publish`/`subscribe` commands."""

from __future__ import annotations

import asyncio
import time
from typing import Iterable, Iterator

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ponder.connectors.kafka.admin import ensure_topics

__all__ = ["publish_lines", "simulated_lines", "subscribe"]

_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


def simulated_lines(devices: int, events_per_device: int, seed: int, *,
                    camera: bool = False) -> tuple[Iterator[bytes], int]:
    from ponder.simulate import Fleet

    fleet = Fleet(devices, events_per_device, seed, camera=camera)
    return (_enc.encode(e) for e in fleet.iter_events()), fleet.events


def _key(line: bytes, field: str) -> bytes | None:
    try:
        obj = _dec.decode(line)
    except msgspec.DecodeError:
        return None
    k = obj.get(field) if isinstance(obj, dict) else None
    return None if k is None else str(k).encode()


async def publish_lines(brokers: str, topic: str, lines: Iterable[bytes], *, key_field: str,
                        partitions: int = 16, total: int | None = None, console=None) -> tuple[int, int]:
    """Send each line as one record keyed by `key_field`; lines without it go unkeyed (the
    worker dead-letters them, so nothing is lost silently). Returns (records, unkeyed)."""
    await ensure_topics(brokers, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    n = unkeyed = 0
    progress = None
    try:
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            progress = Progress("[bold]publish", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=console)
            progress.start()
            task = progress.add_task(topic, total=total)
        pending = []
        for line in lines:
            line = line.strip()
            key = _key(line, key_field)
            unkeyed += key is None
            pending.append(await producer.send(topic, value=line, key=key))
            n += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
                if progress is not None:
                    progress.update(task, completed=n)
        await producer.flush()
        await asyncio.gather(*pending)
        if progress is not None:
            progress.update(task, completed=n)
    finally:
        if progress is not None:
            progress.stop()
        await producer.stop()
    return n, unkeyed


async def subscribe(brokers: str, topic: str, *, count: int = 0, from_beginning: bool = False,
                    idle_timeout: float = 0.0, as_json: bool = False, console=None) -> int:
    """Read every partition of `topic` (no consumer group) and print records as they come."""
    import sys

    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, enable_auto_commit=False,
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                fetch_max_wait_ms=100)
    await consumer.start()
    n = 0
    try:
        parts = None
        deadline = time.monotonic() + 10.0
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    await asyncio.sleep(0.2)
        if not parts:
            msg = f"topic {topic!r} does not exist"
            raise ValueError(msg)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        last = time.monotonic()
        while True:
            data = await consumer.getmany(timeout_ms=200, max_records=1000)
            for msgs in data.values():
                for m in msgs:
                    n += 1
                    if as_json:
                        sys.stdout.write(m.value.decode("utf-8", "replace") + "\n")
                    else:
                        _pretty(console, m)
                    if count and n >= count:
                        sys.stdout.flush()
                        return n
            if data:
                last = time.monotonic()
                sys.stdout.flush()
            elif idle_timeout and time.monotonic() - last >= idle_timeout:
                return n
    finally:
        await consumer.stop()


def _pretty(console, m) -> None:
    try:
        d = _dec.decode(m.value)
    except msgspec.DecodeError:
        console.print(f"[dim]{m.partition}@{m.offset}[/dim] {m.value!r}")
        return
    if isinstance(d, dict) and "action" in d:
        colour = {"critical": "red", "high": "red", "medium": "yellow"}.get(d.get("severity"), "green")
        console.print(f"[dim]{m.partition}@{m.offset}[/dim] [bold]{d.get('key')}[/bold] "
                      f"[{colour}]{d.get('action')}[/{colour}] ({d.get('severity')}, {d.get('tier')}, "
                      f"conf {d.get('confidence')}) {d.get('reason')}", highlight=False)
    else:
        console.print(f"[dim]{m.partition}@{m.offset}[/dim] {d}", highlight=False)

"""Run a pipeline as a Kafka consumer-group worker: topics, RocksDB state, changelog, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from ponder.connectors.kafka import KafkaChangelog, KafkaSink, KafkaSource, ensure_keyed_topics
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.tracestore import TraceStore
from ponder.runtime.worker import RunStats, Worker
from ponder.state.rocks import RocksStore

__all__ = ["run_worker", "build_worker"]

logger = logging.getLogger(__name__)


async def build_worker(pipe: Pipeline, brokers: str, *, group: str | None = None,
                       state_dir: Path = Path("state"), input_topic: str | None = None,
                       output_topic: str | None = None, dead_letter_topic: str | None = None,
                       partitions: int = 16, checkpoint_every_s: float = 2.0,
                       session_timeout_ms: int = 10_000, engines=None, ledger: Path | None = None,
                       traces: TraceStore | None = None) -> Worker:
    """Create missing topics and assemble a Worker with Kafka source, sink and changelog."""
    t_in, t_out, t_dead = pipe.topics
    t_in, t_out, t_dead = input_topic or t_in, output_topic or t_out, dead_letter_topic or t_dead
    group = group or f"ponder-{pipe.name}"
    t_log = f"{group}.{pipe.name}.changelog"
    n = await ensure_keyed_topics(brokers, t_in, (t_out, t_dead, t_log), partitions, compacted=(t_log,))
    root = Path(state_dir) / group

    def open_store(tp: tuple[str, int]) -> RocksStore:
        return RocksStore(root / f"{tp[0]}-{tp[1]}")

    source = KafkaSource(brokers, t_in, group, session_timeout_ms=session_timeout_ms,
                         rebalance_timeout_ms=session_timeout_ms)
    # producers hand records over only within the source's membership lease (half a session)
    # and give each up within the other half: nothing lands after the group could move on
    give_up_ms = max(1000, session_timeout_ms // 2)
    sink = KafkaSink(brokers, t_out, t_dead, may_send=source.member, request_timeout_ms=give_up_ms,
                     max_hold_s=3 * session_timeout_ms / 1000)
    return pipe.worker(source, sink, engines=engines, open_store=open_store,
                       changelog=KafkaChangelog(brokers, t_log, request_timeout_ms=give_up_ms,
                                                may_send=source.member),
                       checkpoint_every_s=checkpoint_every_s, ledger=ledger, budget_slices=n, traces=traces)


async def run_worker(pipe: Pipeline, brokers: str, *, metrics_port: int = 0, traces: Path | None = None,
                     **kw) -> RunStats:
    """Run until SIGTERM/SIGINT, then stop reading, drain, checkpoint and leave the group.
    `traces`: the local trace store's file (runtime/tracestore.py), None for none."""
    store = TraceStore(traces, pipeline=pipe.name) if traces is not None else None
    try:
        return await _run_worker(pipe, brokers, metrics_port=metrics_port, traces=store, **kw)
    finally:
        if store is not None:
            store.close()


async def _run_worker(pipe: Pipeline, brokers: str, *, metrics_port: int = 0, **kw) -> RunStats:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    # handlers first: a signal while topics are created must still end the run cleanly
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    worker = await build_worker(pipe, brokers, **kw)
    if stopping.is_set():
        return worker.stats
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    if metrics_port:
        from ponder.runtime.metrics import serve_metrics

        serve_metrics(worker, pipe.name, metrics_port)
        logger.info("metrics on :%d/metrics", metrics_port)
    logger.info("worker for pipeline %r started", pipe.name)
    return await worker.run()

"""Backend outage: the model server behind an http tier is killed (SIGKILL) mid-stream, with
requests in flight, and comes back on the same port OUTAGE_S seconds later.

While it is down every escalated event still gets exactly one decision, degraded, from the
reflex tier; the breaker lets one probe through per cool-off and downgrades every other event
at once. Once the server is back, the tier is used again within one cool-off, after exactly
one request (the half-open probe) reached it.

The server is a stdlib subprocess that prints one line per request it receives, with its
arrival time on the system-wide monotonic clock (the same clock as this process's
`time.monotonic()`), so requests are counted even across the kill.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import msgspec
import pytest

from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink
from ponder.inference.engine import EngineError, Request
from ponder.inference.openai import OpenAIEngine
from ponder.inference.reflex import ReflexRule
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import SKIP_OPEN, SKIP_PROBING, TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.types import Decision, SourcePos

OUTAGE_S = 30.0  # as the issue states it; the whole test takes about 36 s
COOLOFF_S = 2.0
EVERY_S = 0.1  # one burst of escalations per key every EVERY_S
KEYS = tuple(f"k{i}" for i in range(8))  # a burst escalates this many keys in the same instant
SLACK_S = 1.0  # scheduling on a busy machine: a burst's wait, a probe's round trip
HELD_S = 1.0  # how long the first server holds each reply, so the kill finds requests in flight
MODEL = "outage-model"
ANSWER = msgspec.json.encode({"action": "inspect", "severity": "low", "reason": "model says",
                              "confidence": 0.9}).decode()

SERVER = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, hold_s, model, answer = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
reply = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
out = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with out:  # one whole line per request, whatever the threads do
            sys.stdout.write(f"request {time.monotonic()!r} {body['user']}\n")
            sys.stdout.flush()
        time.sleep(hold_s)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # bound and listening from here on
httpd.daemon_threads = True
print("ready", repr(time.monotonic()), httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


class ModelServer:
    """The subprocess, and the lines it printed: ("ready" | "request", monotonic time, arg)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, float, str]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, hold_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port), str(hold_s), MODEL, ANSWER],
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, t, arg = line.split()
            self.lines.append((kind, float(t), arg))

    def requests(self) -> list[float]:
        return [t for kind, t, _ in self.lines if kind == "request"]

    def readies(self) -> list[float]:
        return [t for kind, t, _ in self.lines if kind == "ready"]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class BurstSource:
    """A source the test feeds while the worker runs: each `send` is one batch of records."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[Record] | None] = asyncio.Queue()
        self.offset = 0
        self.sent: dict[int, tuple[float, int]] = {}  # seq -> (send time, burst number)
        self.bursts = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def burst(self) -> list[int]:
        """One flagged event for every key, in one batch: they escalate together."""
        now, records, seqs = time.monotonic(), [], []
        for key in KEYS:
            seq = self.offset
            value = msgspec.json.encode({"k": key, "ts": float(seq), "flag": True})
            records.append(Record(value, SourcePos("outage", 0, seq)))
            self.sent[seq] = (now, self.bursts)
            seqs.append(seq)
            self.offset += 1
        self.bursts += 1
        self.queue.put_nowait(records)
        return seqs

    def close(self) -> None:
        self.queue.put_nowait(None)

    async def batches(self):
        while (batch := await self.queue.get()) is not None:
            yield batch


class TimedSink(MemorySink):
    """Remembers when each decision was written."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[int, float] = {}  # seq -> time written

    def write(self, decision: Decision) -> None:
        assert decision.source is not None
        self.at[decision.source.offset] = time.monotonic()
        super().write(decision)


@dataclass
class Moments:
    kill: float = 0.0  # the server process is gone
    back: float = 0.0  # the new server is bound and listening
    first_edge: float = 0.0  # the first decision from the http tier after it came back


async def until(cond, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout_s}s waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0.005)


def outage_pipeline(url: str) -> Pipeline:
    """Every flagged event escalates (numeric signals and gaps off, renotify 0) and asks for
    the edge tier; the reflex tier answers the flag rule with `alert`."""
    return Pipeline(
        name="outage", key="k", time="ts", actions=("none", "alert", "inspect"),
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=(Rule("flag", lambda e: bool(e.payload.get("flag"))),)),
        tiers=(TierSpec("reflex", max_batch=1),
               TierSpec("edge", engine=url, model=MODEL, min_score=0.5, failures=3, cooloff_s=COOLOFF_S)),
        reflex=(ReflexRule("rule", "alert", "high"),))


async def pace(source: BurstSource, stop: asyncio.Event) -> None:
    while not stop.is_set():
        source.burst()
        try:
            await asyncio.wait_for(stop.wait(), EVERY_S)
        except asyncio.TimeoutError:
            pass


async def run_outage(server: ModelServer, source: BurstSource, sink: TimedSink, m: Moments):
    server.start(HELD_S)
    await until(lambda: server.readies(), "the model server to start", 20.0)
    server.port = int(server.lines[0][2])
    worker = outage_pipeline(f"http://127.0.0.1:{server.port}/v1").worker(source, sink)
    run = asyncio.create_task(worker.run())
    pacer: asyncio.Task[None] | None = None
    try:
        # Before: one burst, answered by the model.
        seqs = source.burst()
        await until(lambda: all(s in sink.at for s in seqs), "the first burst's decisions", 20.0)
        # The kill: a second burst reaches the server, which dies holding its replies.
        n = len(server.requests())
        seqs = source.burst()
        await until(lambda: len(server.requests()) == n + len(KEYS), "the second burst at the server", 20.0)
        server.kill()
        m.kill = time.monotonic()
        assert not any(s in sink.at for s in seqs), "a reply left the server before the kill"
        await until(lambda: all(s in sink.at for s in seqs), "the decisions of the killed requests", 20.0)

        # The outage: bursts keep coming.
        stop = asyncio.Event()
        pacer = asyncio.create_task(pace(source, stop))
        await asyncio.sleep(OUTAGE_S - (time.monotonic() - m.kill))
        server.start(0.0)
        await until(lambda: len(server.readies()) == 2, "the model server to restart", 20.0)
        m.back = server.readies()[1]

        def edge_again() -> bool:
            return any(d.tier == "edge" and sink.at[d.source.offset] > m.back for d in sink.decisions)

        await until(edge_again, "the edge tier to be used again", COOLOFF_S + 10.0)
        m.first_edge = min(sink.at[d.source.offset] for d in sink.decisions
                           if d.tier == "edge" and sink.at[d.source.offset] > m.back)
        # After: a few more bursts, all answered by the model again.
        n = source.bursts
        await until(lambda: source.bursts >= n + 3, "three more bursts", 10.0)
        stop.set()
        await pacer
        source.close()
        return await asyncio.wait_for(run, 30.0)
    finally:  # a failed wait must not leave the worker or the pacer running
        for task in (pacer, run):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def test_backend_outage_degrades_every_decision_and_recovers_with_one_probe():
    server, source, sink, m = ModelServer(), BurstSource(), TimedSink(), Moments()
    try:
        stats = await asyncio.wait_for(run_outage(server, source, sink, m), OUTAGE_S + 60.0)
    finally:
        server.kill()

    # None lost: one decision per escalated event, and nothing dead-lettered.
    assert stats.escalations == len(source.sent) == stats.decisions == len(sink.decisions)
    assert sorted(d.source.offset for d in sink.decisions) == sorted(source.sent)
    assert stats.dead_letters == 0 and sink.dead_letters == []
    by_seq = {d.source.offset: d for d in sink.decisions}
    model_answer = ("edge", MODEL, "inspect", False)
    reflex_answer = ("reflex", "reflex", "alert", True)

    def answer(d: Decision) -> tuple[str, str, str, bool]:
        return d.tier, d.model, d.action, d.degraded

    # Before the outage: every decision from the model, none degraded.
    before = [d for s, d in by_seq.items() if sink.at[s] < m.kill]
    assert len(before) == len(KEYS)
    assert all(answer(d) == model_answer and d.trace.route == ["edge"] for d in before)

    # The requests the kill cut off: retried once (a dropped connection may be a stale one),
    # then refused at once; the decisions fall back to reflex.
    cut = [by_seq[s] for s, (_, burst) in source.sent.items() if burst == 1]
    assert len(cut) == len(KEYS)
    for d in cut:
        assert answer(d) == reflex_answer and d.trace.route == ["edge", "reflex"]
        assert len(d.trace.errors) == 1, d.trace.errors
        e = d.trace.errors[0]
        assert e.startswith("edge: EngineError: openai backend unreachable") and "connect failed: ConnectError" in e
        assert e.endswith("(after 2 attempts)"), e

    # Every later decision is the model's or, until the probe succeeded, a degraded reflex one
    # that either skipped the tier, with the reason, or was the one probe of its cool-off.
    later = {s: by_seq[s] for s, (_, burst) in source.sent.items() if burst >= 2}
    edge = {s: d for s, d in later.items() if answer(d) == model_answer}
    fallback = {s: d for s, d in later.items() if answer(d) == reflex_answer}
    assert len(edge) + len(fallback) == len(later)
    assert min(sink.at[s] for s in edge) == m.first_edge
    assert all(source.sent[s][0] < m.first_edge for s in fallback)
    skips = Counter(tuple(d.trace.skipped) for d in fallback.values() if d.trace.route == ["reflex"])
    assert set(skips) == {(f"edge: {SKIP_OPEN}",), (f"edge: {SKIP_PROBING}",)}, skips
    failed_probes = sorted((s for s, d in fallback.items() if d.trace.route == ["edge", "reflex"]),
                           key=sink.at.__getitem__)
    assert sum(skips.values()) + len(failed_probes) == len(fallback)
    for s in failed_probes:
        d = fallback[s]
        assert d.trace.skipped == [] and len(d.trace.errors) == 1
        # refused at once: one connect attempt, no retries
        assert "connect failed: ConnectError" in d.trace.errors[0] and "(after" not in d.trace.errors[0]

    # One probe per cool-off, no more: a call went out at its decision's write time less its
    # latency; the successful probe (the first model answer after the outage) counts too.
    probes = failed_probes + [s for s in edge if sink.at[s] == m.first_edge]
    starts = [sink.at[s] - by_seq[s].latency_ms / 1000.0 for s in probes]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g >= COOLOFF_S - 0.01 for g in gaps), gaps
    # ... and the breaker kept probing through the outage instead of staying shut
    assert len(failed_probes) >= int(OUTAGE_S / (COOLOFF_S + SLACK_S)), len(failed_probes)

    # Back: the tier answers again within one cool-off of the server's return, and exactly one
    # request (the probe) reached the server before the breaker closed.
    assert m.back >= m.kill + OUTAGE_S
    assert m.first_edge - m.back <= COOLOFF_S + SLACK_S, m.first_edge - m.back
    half_open = [t for t in server.requests() if m.back <= t <= m.first_edge]
    assert len(half_open) == 1, half_open
    # From then on every event is answered by the model, with one request each.
    after = [d for s, d in later.items() if source.sent[s][0] > m.first_edge]
    assert len(after) >= 3 * len(KEYS)
    assert all(answer(d) == model_answer and d.trace.route == ["edge"] and d.trace.skipped == [] for d in after)
    assert len([t for t in server.requests() if t >= m.back]) == len(edge)
    # Degraded are exactly the decisions the outage touched.
    assert stats.degraded == len(cut) + len(fallback)


# -- the HTTP client during an outage -------------------------------------------------------------


class CountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        return await super().handle_async_request(request)


def free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(key: str) -> Request:
    return Request(key, "prefix", "tail", 16, ("none",), {}, request_id=f"id-{key}")


async def test_refused_connections_fail_fast_without_retries():
    """A refused connection is not retried however generous the retry settings: per-request
    retries during an outage would multiply the load the moment the server comes back."""
    transport = CountingTransport()
    port = free_port()
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", retries=5, backoff_s=10.0, transport=transport)
    t0 = time.monotonic()
    try:
        with pytest.raises(EngineError, match=rf"^openai backend unreachable at http://127.0.0.1:{port}/v1: "
                                              r"connect failed: ConnectError: [^()]*$"):
            await eng.generate([request(f"k{i}") for i in range(4)])
    finally:
        await eng.stop()
    assert time.monotonic() - t0 < 2.0  # no backoff of 10 s
    assert transport.attempts == 1 + 4  # the start's discovery probe, then one per request

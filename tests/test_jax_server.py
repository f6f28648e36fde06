"""`ponder serve-model` on loopback with a tiny random checkpoint, driven by the official openai
client and by OpenAIEngine, against JaxEngine in process; and `jax:PATH` as a pipeline's edge."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from typer.testing import CliRunner

from ponder.cli import app
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Engine, EngineError, Request
from ponder.inference.jax.engine import JaxEngine, chat_messages
from ponder.inference.jax.server import ModelServer
from ponder.inference.openai import OpenAIEngine
from ponder.inference.reflex import ReflexRule
from ponder.inference.registry import build_engine
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.types import answer_schema

ACTIONS = ("none", "alert", "inspect")
SCHEMA = answer_schema(ACTIONS)
HEAD = "You monitor one stream key.\nAllowed actions: none, alert, inspect.\nReply with JSON.\n"
# small buckets: every engine in this file (the server's and the in-process ones) shares them
KW = {"max_batch": 4, "session_cap_bytes": 16 << 20, "batch_buckets": (1, 4), "seq_buckets": (256, 512),
          "chunk_buckets": (16, 64), "model_name": "tiny"}
MSGS = [{"role": "system", "content": "You watch pumps."},
        {"role": "user", "content": "pump-7 temperature=91.5 vibration=3.2 (mean 40.1)"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = CliRunner().invoke(app, ["init-model", str(path), "--preset", "tiny", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with ModelServer(JaxEngine(ckpt, **KW)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def req(session: str, lines: tuple[str, ...], tail: str = "stats now\n", max_tokens: int = 40) -> Request:
    """Shaped like context.render's prompt: header, the key's data block, then the tail."""
    prefix = HEAD + f"\n<data key={session}>\nRecent events (oldest first):\n" + "".join(
        line + "\n" for line in lines)
    return Request(session, prefix, "</data>\n" + tail, max_tokens, ACTIONS, SCHEMA)


def test_models_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    client.completions.create(model="tiny", prompt="pump", max_tokens=2, temperature=0)
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    for name in ("ponder_model_compiles", "ponder_model_prompt_tokens_total",
                 'ponder_model_sessions{where="device"}', "ponder_model_batch_size_bucket"):
        assert name in text


def test_completions_stream_equals_non_stream(client):
    kw = {"model": "tiny", "prompt": "device-0042 pressure=12.5 rising", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kw)
    parts = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert whole.choices[0].text == "".join(parts) and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 5

    # a stop string cuts the text before it, streamed or not
    text = whole.choices[0].text
    stop = text[len(text) // 2 :][:3]
    cut = client.completions.create(**kw, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True))
    assert cut.choices[0].text == streamed == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_stream_equals_non_stream_and_the_session_is_cached(client):
    kw = {"model": "tiny", "messages": MSGS, "max_tokens": 16, "temperature": 0, "user": "pump-7"}
    first = client.chat.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(**kw)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1 > 0
    assert second.choices[0].message.content == first.choices[0].message.content

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == first.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

    # another key (the `session` field wins over `user`) starts cold
    other = client.chat.completions.create(**kw, extra_body={"session": "pump-8"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_json_schema_response_format_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=48, temperature=1.0,
                                           seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


async def test_concurrent_clients_are_batched_together(ckpt, client):
    """Four clients at once run as one batch and get what each would get alone."""
    users = [f"conc-{i}" for i in range(4)]
    alone = [client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0,
                                            user=u + "-solo").choices[0].message.content for u in users]
    with ModelServer(JaxEngine(ckpt, **KW), max_wait_ms=500) as srv:
        aclient = openai.AsyncOpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        together = await asyncio.gather(*(aclient.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=8, temperature=0, user=u) for u in users))
        await aclient.close()
        text = httpx.get(srv.url.removesuffix("/v1") + "/metrics").text
    assert [r.choices[0].message.content for r in together] == alone
    assert "ponder_model_batch_size_count 1.0" in text and "ponder_model_batch_size_sum 4.0" in text


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base.removesuffix("/v1") + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_request_joins_a_running_stream_and_a_dropped_stream_stops(server):
    """Continuous batching over HTTP: a short request sent while a 300-token stream decodes is
    answered before that stream's last chunk; a stream whose client hangs up stops early."""
    base = server.url
    body = {"model": "tiny", "prompt": "pump-3 flow=12.0 falling", "max_tokens": 300, "temperature": 0,
            "user": "long"}
    short = {"model": "tiny", "prompt": "pump-4 ok", "max_tokens": 4, "temperature": 0, "user": "short"}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(timeout=120) as http:
        full = (await http.post(f"{base}/completions", json=body)).json()
        assert full["choices"][0]["finish_reason"] == "length"  # it really runs 300 tokens
        assert full["usage"]["completion_tokens"] == 300

        events: list[tuple[float, str]] = []
        started = asyncio.Event()

        async def read_stream():
            async with http.stream("POST", f"{base}/completions", json={**body, "stream": True}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        events.append((loop.time(), line[6:]))
                        started.set()

        reader = asyncio.create_task(read_stream())
        await started.wait()
        r = await http.post(f"{base}/completions", json=short)
        answered = loop.time()
        await reader
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert events[-1][1] == "[DONE]"
        assert answered < events[-1][0], "the short request waited for the whole stream"
        text = "".join(json.loads(d)["choices"][0]["text"] for _, d in events[:-1] if json.loads(d)["choices"])
        assert text == full["choices"][0]["text"]

        before = _metric(base, "ponder_model_completion_tokens_total")
        async with http.stream("POST", f"{base}/completions", json={**body, "stream": True}) as s:
            got = 0
            async for line in s.aiter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # hang up
        for _ in range(200):  # the row ends at its next token; its usage is counted then
            after = _metric(base, "ponder_model_completion_tokens_total")
            if after != before:
                break
            await asyncio.sleep(0.05)
        assert 2 <= after - before < 300


def test_bad_requests_are_400(client):
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="tiny", messages=MSGS, n=17)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[7] * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "xml"})


async def test_openai_engine_against_the_server_equals_jax_engine(server, ckpt):
    """The same Requests through HTTP and in process: same tokens, so same text and usage."""
    local = JaxEngine(ckpt, **KW)
    remote = OpenAIEngine(server.url, "tiny", backoff_s=0.01)
    assert isinstance(local, Engine) and isinstance(remote, Engine)
    assert remote.body(req("A", ("- e1",)))["messages"] == chat_messages(*[req("A", ("- e1",)).prefix,
                                                                          req("A", ("- e1",)).tail])
    calls = [[req("eq-A", ("- e1",)), req("eq-B", ("- b1", "- b2"))],
             [req("eq-A", ("- e1", "- e2"), tail="stats later\n")]]
    try:
        for batch in calls:
            here, there = await local.generate(batch), await remote.generate(batch)
            for h, t in zip(here, there):
                assert h.error is None and t.error is None
                assert (h.text, h.usage, h.finish_reason) == (t.text, t.usage, t.finish_reason)
                jsonschema.validate(json.loads(h.text), SCHEMA)
        assert here[0].usage.cached_prompt_tokens > 0  # the second call of eq-A reused its prefix
    finally:
        await local.stop()
        await remote.stop()


async def test_overlapping_jax_engine_calls_share_one_running_batch(ckpt):
    """In process too: a call made while another decodes joins its batch and returns first,
    with the answer it gets alone."""
    eng = JaxEngine(ckpt, **KW)
    admits: list[int] = []
    eng.feed.on_admit = admits.append

    def unconstrained(session: str, line: str, n: int) -> Request:
        return Request(session, HEAD + f"\n<data key={session}>\n{line}\n", "</data>\n", n, ACTIONS, {})

    try:
        (long_alone,) = await eng.generate([unconstrained("ov-solo", "- pump 3 hot", 150)])
        assert long_alone.finish_reason == "length" and long_alone.usage.completion_tokens == 150
        (short_alone,) = await eng.generate([unconstrained("ov-solo2", "- pump 4 ok", 4)])
        admits.clear()

        first = asyncio.create_task(eng.generate([unconstrained("ov-long", "- pump 3 hot", 150)]))
        while not admits:
            await asyncio.sleep(0.001)
        (short,) = await eng.generate([unconstrained("ov-short", "- pump 4 ok", 4)])
        assert not first.done(), "the second call waited for the first"
        (long,) = await first
    finally:
        await eng.stop()
    assert admits == [1, 1]
    assert short.text == short_alone.text and long.text == long_alone.text


def _plain(session: str, n: int) -> Request:
    return Request(session, HEAD + f"\n<data key={session}>\n- reading\n", "</data>\n", n, ACTIONS, {})


def test_jax_engine_across_event_loops_and_a_stop(ckpt):
    """One engine, several asyncio.run calls (the feed restarts on each loop); a call made
    while it stops is refused with a clear error; after the stop it starts again."""
    eng = JaxEngine(ckpt, **KW)
    (a,) = asyncio.run(eng.generate([_plain("loop-1", 4)]))
    (b,) = asyncio.run(asyncio.wait_for(eng.generate([_plain("loop-2", 4)]), 60))
    assert a.error is None and b.error is None and b.usage.completion_tokens == 4

    async def during_stop():
        stopping = asyncio.create_task(eng.stop())
        await asyncio.sleep(0)
        with pytest.raises(EngineError, match="is stopping"):
            await eng.generate([_plain("loop-3", 4)])
        await stopping
        (again,) = await eng.generate([_plain("loop-3", 4)])
        await eng.stop()
        return again

    assert asyncio.run(during_stop()).error is None


def test_back_to_back_event_loops_each_get_their_answer(ckpt):
    """asyncio.run after asyncio.run: the engine thread's `serve` from the last loop may still
    be winding down when the next loop's request arrives, and takes it; the answer must reach
    the loop that waits for it, not the closed one (it used to be lost: a 20 s timeout)."""
    eng = JaxEngine(ckpt, **KW)
    for i in range(20):
        (a,) = asyncio.run(asyncio.wait_for(eng.generate([_plain(f"loop-{i % 3}", 4)]), 20))
        assert a.error is None and a.usage.completion_tokens == 4


async def test_a_caller_that_gives_up_frees_its_row(ckpt):
    """A caller cancelled mid-decode (asyncio.wait_for does that on a timeout): its row ends at
    the next step instead of running to max_tokens, and the session is free for a retry."""
    from ponder.inference.jax.generate import GenRequest

    eng = JaxEngine(ckpt, **KW)
    chosen = []
    try:
        await eng.start()
        prompt = eng.encode_text("pump-9 vibration rising")
        caller = asyncio.create_task(eng.submit(GenRequest("gu", prompt, 400, on_token=chosen.append,
                                                           ignore_eos=True)))
        while len(chosen) < 5:
            await asyncio.sleep(0.001)
        caller.cancel()
        while "gu" in eng.generator.pool._pinned:
            await asyncio.sleep(0.001)
        assert 5 <= len(chosen) < 20, f"the abandoned row chose {len(chosen)} of 400 tokens"
        (retry,) = await eng.generate([_plain("gu", 4)])
        assert retry.error is None and retry.usage.completion_tokens == 4
    finally:
        await eng.stop()


async def test_jax_engine_as_a_pipeline_edge_tier(ckpt):
    assert isinstance(build_engine(f"jax:{ckpt}"), JaxEngine)
    with pytest.raises(ValueError, match="jax:PATH"):
        build_engine("jax:")
    eng = JaxEngine(ckpt, **{**KW, "batch_buckets": (4,), "seq_buckets": (1024,)})  # ~700-token prompts
    pipe = Pipeline(
        name="edge-jax", key="k", time="ts", actions=ACTIONS,
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=(Rule("flag", lambda e: bool(e.payload.get("flag"))),)),
        tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=eng, min_score=0.0, max_batch=4)),
        reflex=(ReflexRule("rule", "alert", "high"),))
    items = [{"k": k, "ts": float(i), "flag": (k, i) in {("A", 1), ("A", 3), ("B", 2)}}
             for i in range(5) for k in ("A", "B")]
    sink = MemorySink()
    try:
        stats = await pipe.worker(MemorySource(items), sink, engines={"edge": eng}).run()
    finally:
        await eng.stop()
    assert stats.decisions == 3 and stats.dead_letters == 0
    assert all(d.tier == "edge" and d.model == "tiny" and not d.degraded for d in sink.decisions), sink.decisions
    a1, a2 = [d for d in sink.decisions if d.key == "A"]
    assert a1.usage.cached_prompt_tokens == 0 < a2.usage.cached_prompt_tokens < a2.usage.prompt_tokens


def test_serve_model_cli_rejects_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(app, ["serve-model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a checkpoint directory" in result.output

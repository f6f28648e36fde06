"""OpenAIEngine against a real HTTP server on loopback (tests/openai_script_server.py, a scripted
stand-in, not ponder's own edge server): request layout, prefix stability, structured output,
usage, concurrency, retries, timeouts, unreachable backends, and a whole pipeline on the edge."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import msgspec
import pytest
from openai_script_server import Call, Reply, ScriptedOpenAIServer, chat_reply, completion_reply

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import Engine, EngineError, Request
from ponder.inference.openai import OpenAIEngine
from ponder.inference.reflex import ReflexRule
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.types import Usage, answer_schema

ACTIONS = ("none", "alert", "inspect")
SCHEMA = answer_schema(ACTIONS)
HEAD = "You monitor one stream key.\nAllowed actions: none, alert, inspect.\nReply with JSON.\n"
GOOD = json.dumps({"action": "inspect", "severity": "medium", "reason": "looks odd", "confidence": 0.8})


def req(session: str = "dev-1", lines: tuple[str, ...] = ("- e1",), tail: str = "stats now\n",
        max_tokens: int = 64) -> Request:
    """A request shaped like context.render's: header, then the key's data block, then tail."""
    prefix = HEAD + f"\n<data key={session}>\nRecent events (oldest first):\n" + "".join(
        line + "\n" for line in lines)
    return Request(session, prefix, "</data>\n" + tail, max_tokens, ACTIONS, SCHEMA)


def engine(srv: ScriptedOpenAIServer, **kw) -> OpenAIEngine:
    kw.setdefault("backoff_s", 0.01)
    return OpenAIEngine(srv.url, "test-model", **kw)


async def generate(eng: OpenAIEngine, requests: list[Request]):
    await eng.start()
    try:
        return await eng.generate(requests)
    finally:
        await eng.stop()


# -- layout ---------------------------------------------------------------------------------------


async def test_chat_layout_is_prefix_stable_and_carries_schema_and_session():
    with ScriptedOpenAIServer([chat_reply(GOOD, prompt_tokens=120, completion_tokens=7, cached=96)]) as srv:
        eng = engine(srv, api_key="sk-test", seed=7)
        assert isinstance(eng, Engine)
        first, second = req(lines=("- e1",), tail="stats 1\n"), req(lines=("- e1", "- e2"), tail="stats 2\n")
        out = await generate(eng, [first])
        out += await generate(eng, [second])

    assert [c.error for c in out] == [None, None]
    assert out[0].text == GOOD and out[0].model == "scripted-model"
    assert out[0].usage == Usage(prompt_tokens=120, cached_prompt_tokens=96, completion_tokens=7)
    a, b = srv.calls
    assert a.path == b.path == "/v1/chat/completions"
    assert a.headers["authorization"] == "Bearer sk-test"
    for call, r in ((a, first), (b, second)):
        body = call.body
        assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("test-model", 64, 0.0, 7)
        assert body["user"] == "dev-1"
        sys_msg, user_msg = body["messages"]
        assert sys_msg == {"role": "system", "content": HEAD}
        assert user_msg["role"] == "user"
        assert user_msg["content"] == r.prefix[len(HEAD) + 1:] + r.tail
        assert sys_msg["content"] + "\n" + user_msg["content"] == r.prompt  # nothing lost or added
        rf = body["response_format"]
        assert rf["type"] == "json_schema"
        assert rf["json_schema"]["strict"] is True and rf["json_schema"]["name"] == "ponder_decision"
        assert rf["json_schema"]["schema"]["properties"]["action"]["enum"] == sorted(ACTIONS)
    # the bytes the server tokenizes first are the same on both calls: the system message exactly,
    # and the first call's data block is a prefix of the second's (append-only window)
    enc = msgspec.json.encode
    assert enc(a.body["messages"][0]) == enc(b.body["messages"][0])
    ua, ub = a.body["messages"][1]["content"], b.body["messages"][1]["content"]
    assert ub.startswith(ua[: ua.index("</data>")])


async def test_prompt_without_data_block_goes_whole_in_one_user_message():
    with ScriptedOpenAIServer([chat_reply(GOOD)]) as srv:
        r = Request("k", "plain prefix\n", "tail\n", 16, ACTIONS, SCHEMA)
        await generate(engine(srv), [r])
    assert srv.calls[0].body["messages"] == [{"role": "user", "content": "plain prefix\ntail\n"}]


async def test_structured_modes_session_fields_and_extra_body():
    with ScriptedOpenAIServer([chat_reply(GOOD)]) as srv:
        await generate(engine(srv, structured="vllm"), [req()])
        await generate(engine(srv, structured="none", session_fields=("user", "session"),
                              extra_body={"top_k": 1, "guided_json": {"x": 1}}), [req()])
        await generate(engine(srv, structured="json_schema", session_fields=()), [req()])
    vllm, none, strict = srv.bodies()
    assert vllm["structured_outputs"] == {"json": SCHEMA} and "response_format" not in vllm
    assert "structured_outputs" not in none and "response_format" not in none
    assert (none["user"], none["session"], none["top_k"], none["guided_json"]) == ("dev-1", "dev-1", 1, {"x": 1})
    assert "user" not in strict and strict["response_format"]["type"] == "json_schema"


async def test_auto_structured_falls_back_to_json_object_when_server_rejects_json_schema():
    rejected = Reply(400, {"error": {"message": "response_format json_schema is not supported"}})
    with ScriptedOpenAIServer([rejected, chat_reply(GOOD)]) as srv:
        eng = engine(srv)
        out = await generate(eng, [req()])
        out += await generate(eng, [req()])
    assert [c.error for c in out] == [None, None]
    assert srv.calls[0].body["response_format"]["type"] == "json_schema"
    assert [c.body["response_format"] for c in srv.calls[1:]] == [{"type": "json_object", "schema": SCHEMA}] * 2
    assert len(srv.calls) == 3 and eng.structured == "json_object" and out[0].enforced


async def test_completions_mode_sends_the_raw_prompt():
    with ScriptedOpenAIServer([completion_reply(GOOD, prompt_tokens=50, completion_tokens=9, cached=40)]) as srv:
        eng = OpenAIEngine(srv.url.removesuffix("/v1"), "test-model", mode="completions")  # /v1 implied
        r = req()
        (c,) = await generate(eng, [r])
    assert srv.calls[0].path == "/v1/completions"
    body = srv.calls[0].body
    assert body["prompt"] == r.prefix + r.tail and "messages" not in body
    assert body["user"] == "dev-1" and body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert (c.text, c.usage, c.error) == (GOOD, Usage(50, 40, 9), None)


# -- usage ----------------------------------------------------------------------------------------


async def test_usage_mapping_variants_and_batch_order():
    replies = {
        "openai": chat_reply("a", prompt_tokens=10, completion_tokens=2, cached=8),
        "no-details": chat_reply("b", prompt_tokens=10, completion_tokens=2),
        "null-cached": chat_reply("c", prompt_tokens=10, completion_tokens=2, cached=None),
        "llama.cpp": chat_reply("d", prompt_tokens=30, completion_tokens=3, timings={"cache_n": 25}),
        "over": chat_reply("e", prompt_tokens=5, completion_tokens=1, cached=9),
        "no-usage": Reply(body={"model": "m", "choices": [{"message": {"content": "f"}, "finish_reason": "stop"}]}),
    }
    replies["null-cached"].body["usage"]["prompt_tokens_details"] = {"cached_tokens": None}
    with ScriptedOpenAIServer(lambda call: replies[call.body["user"]]) as srv:
        out = await generate(engine(srv), [req(session=k) for k in replies])
    assert [c.text for c in out] == list("abcdef")
    # no cached figure reported: estimated (0 here: no earlier prompt for those sessions)
    assert [c.usage for c in out[:5]] == [Usage(10, 8, 2), Usage(10, 0, 2, estimated=True), Usage(10, 0, 2),
                                          Usage(30, 25, 3), Usage(5, 5, 1)]
    # no usage at all: completion tokens by streamed chunks, prompt tokens by characters
    u = out[5].usage
    assert (u.estimated, u.completion_tokens, u.cached_prompt_tokens) == (True, 1, 0) and u.prompt_tokens > 0


async def test_malformed_response_is_an_error_completion():
    with ScriptedOpenAIServer([Reply(200, "not json"), Reply(200, {"choices": []})]) as srv:
        eng = engine(srv)
        out = await generate(eng, [req()])
        out += await generate(eng, [req()])
    assert all(c.error and "malformed response" in c.error and c.text == "" for c in out)


# -- concurrency, retries, failures -----------------------------------------------------------------


async def test_batch_is_sent_concurrently_up_to_the_limit():
    def script(call: Call) -> Reply:
        return Reply(body=chat_reply(call.body["user"]).body, delay_s=0.15)

    with ScriptedOpenAIServer(script) as srv:
        eng = engine(srv, max_concurrency=3)
        t0 = time.monotonic()
        out = await generate(eng, [req(session=f"k{i}") for i in range(10)])
        took = time.monotonic() - t0
    assert [c.text for c in out] == [f"k{i}" for i in range(10)]  # one per request, in order
    assert srv.max_inflight == 3
    assert took < 10 * 0.15 * 0.7  # concurrent, not one after another (4 waves of 0.15 s)


async def test_concurrency_limit_holds_across_concurrent_batches():
    with ScriptedOpenAIServer(lambda call: Reply(body=chat_reply("x").body, delay_s=0.1)) as srv:
        eng = engine(srv, max_concurrency=2)
        await eng.start()
        try:
            batches = await asyncio.gather(*(eng.generate([req(session=f"{b}-{i}") for i in range(3)])
                                             for b in range(3)))
        finally:
            await eng.stop()
    assert [len(b) for b in batches] == [3, 3, 3] and srv.max_inflight == 2


async def test_retries_500_and_429_with_backoff_and_retry_after():
    script = [Reply(500, {"error": "boom"}), Reply(429, {"error": "slow down"}, {"retry-after": "0.3"}),
              chat_reply(GOOD, cached=10)]
    with ScriptedOpenAIServer(script) as srv:
        (c,) = await generate(engine(srv, backoff_s=0.05, retries=3), [req()])
    assert c.error is None and c.text == GOOD and c.usage.cached_prompt_tokens == 10
    t = [call.t for call in srv.calls]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.05 * 0.5  # first backoff: backoff_s with jitter in [0.5, 1]
    assert t[2] - t[1] >= 0.3  # Retry-After wins over the (shorter) backoff
    assert srv.calls[0].raw == srv.calls[2].raw  # a retry resends the same bytes


async def test_retries_exhausted_yield_an_error_completion():
    with ScriptedOpenAIServer([Reply(503, {"error": "overloaded"})]) as srv:
        (c,) = await generate(engine(srv, retries=2), [req()])
    assert len(srv.calls) == 3
    assert c.text == "" and c.usage == Usage() and c.model == "test-model"
    assert "HTTP 503" in c.error and "after 3 attempts" in c.error


async def test_no_retry_on_400():
    with ScriptedOpenAIServer([Reply(400, {"error": {"message": "max_tokens too large"}})]) as srv:
        (c,) = await generate(engine(srv, retries=3), [req()])
    assert len(srv.calls) == 1
    assert c.error.startswith("HTTP 400") and "max_tokens too large" in c.error


async def test_timeout_is_an_error_completion_not_an_engine_error():
    with ScriptedOpenAIServer(lambda call: Reply(body=chat_reply(GOOD).body, delay_s=1.0)) as srv:
        t0 = time.monotonic()
        (c,) = await generate(engine(srv, timeout_s=0.2, retries=1), [req()])
        took = time.monotonic() - t0
    # one deadline for every attempt together: nothing is left for a retry
    assert c.error == "timed out after 0.2s (deadline of 0.2s reached)"
    assert len(srv.calls) == 1 and took < 1.0


async def test_unreachable_backend_raises_engine_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="unreachable"):
        await generate(eng, [req(), req(session="dev-2")])
    assert time.monotonic() - t0 < 2.0


# -- the engine as a pipeline's edge tier -----------------------------------------------------------


def _pipeline(eng: OpenAIEngine) -> Pipeline:
    return Pipeline(
        name="edge-test", key="k", time="ts", actions=ACTIONS,
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0,
                        rules=(Rule("flag", lambda e: bool(e.payload.get("flag"))),)),
        tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=eng, min_score=0.0, max_batch=8)),
        reflex=(ReflexRule("rule", "alert", "high"),))


def _items() -> list[dict]:
    flagged = {("A", 1), ("A", 3), ("B", 2)}
    return [{"k": k, "ts": float(i), "seq": i, "flag": (k, i) in flagged}
            for i in range(5) for k in ("A", "B")]


async def test_pipeline_edge_tier_over_http():
    with ScriptedOpenAIServer([chat_reply(GOOD, prompt_tokens=100, completion_tokens=20, cached=60)]) as srv:
        eng = engine(srv)
        sink = MemorySink()
        stats = await _pipeline(eng).worker(MemorySource(_items()), sink, engines={"edge": eng}).run()
    assert stats.decisions == 3 and stats.dead_letters == 0
    for d in sink.decisions:
        assert (d.tier, d.model, d.degraded, d.action, d.reason) == ("edge", "scripted-model", False, "inspect",
                                                                     "looks odd")
        assert d.usage == Usage(100, 60, 20)
    bodies = srv.bodies()
    assert sorted(b["user"] for b in bodies) == ["A", "A", "B"]
    # the pipeline header is the system message, byte-identical for every key and call
    assert len({msgspec.json.encode(b["messages"][0]) for b in bodies}) == 1
    assert bodies[0]["messages"][0]["content"].startswith(_pipeline(eng).context_policy().instructions)
    assert all(b["response_format"]["json_schema"]["schema"]["properties"]["action"]["enum"] == sorted(ACTIONS)
               for b in bodies)
    # key A's second call extends its first call's data block (append-only, no compaction yet)
    a1, a2 = [b["messages"][1]["content"] for b in bodies if b["user"] == "A"]
    assert a1.startswith("<data key=") and a2.startswith(a1[: a1.index("\nStatistics after") + 1])


async def test_pipeline_invalid_model_answer_falls_back_to_reflex():
    bad = json.dumps({"action": "reboot", "severity": "high", "reason": "x", "confidence": 0.9})
    with ScriptedOpenAIServer([chat_reply(bad, prompt_tokens=100, completion_tokens=20, cached=60)]) as srv:
        eng = engine(srv)
        sink = MemorySink()
        await _pipeline(eng).worker(MemorySource(_items()), sink, engines={"edge": eng}).run()
    assert len(sink.decisions) == 3 and len(srv.calls) == 3
    for d in sink.decisions:
        assert (d.tier, d.model, d.degraded, d.action, d.severity) == ("reflex", "reflex", True, "alert", "high")
        assert d.trace.route == ["edge", "reflex"]
        assert "invalid answer" in d.trace.errors[0]
        assert d.usage == Usage(100, 60, 20)  # the edge call was paid for


async def test_pipeline_unreachable_edge_degrades_to_reflex():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", retries=0)
    sink = MemorySink()
    await _pipeline(eng).worker(MemorySource(_items()), sink, engines={"edge": eng}).run()
    assert len(sink.decisions) == 3
    assert all(d.tier == "reflex" and d.degraded and "unreachable" in d.trace.errors[0] for d in sink.decisions)

"""Server profiles, error classes, deadlines, cancellation and usage of OpenAIEngine, against the
scripted server (tests/openai_script_server.py: a real HTTP server on loopback, not a real model
server). Each profile's request and response formats are those its server documents; vLLM
cannot run here (no GPU), so its profile is tested only this way. llama.cpp's server runs for
real in tests/test_llama_cpp.py."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import pytest
from openai_script_server import Reply, ScriptedOpenAIServer, chat_reply, completion_reply

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import EngineError, Request, answer_token_bound
from ponder.inference.openai import OpenAIEngine
from ponder.inference.servers import PROFILES, ServerProfile, rejection, structured_fields
from ponder.operators.decide import parse_answer
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.worker import WorkerFailed
from ponder.types import REASON_MAX, Usage, answer_schema

ACTIONS = ("none", "alert", "inspect")
SCHEMA = answer_schema(ACTIONS)
GOOD = json.dumps({"action": "inspect", "severity": "medium", "reason": "looks odd", "confidence": 0.8})
# the body llama-cpp-python answers a `json_schema` response_format with: HTTP 500
LLAMA_CPP_500 = {"error": {"message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                           "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
                           "'ctx': {'expected': \"'text' or 'json_object'\"}}]",
                           "type": "internal_server_error", "param": None, "code": None}}


def owned(owner: str, *ids: str) -> list[dict]:
    return [{"id": i, "object": "model", "owned_by": owner} for i in ids]


def req(session: str = "dev-1", body: str = "- e1\n", tail: str = "stats\n", max_tokens: int = 0) -> Request:
    prefix = "You watch one key.\n\n<data key=" + session + ">\nRecent events:\n" + body
    return Request(session, prefix, "</data>\n" + tail, max_tokens, ACTIONS, SCHEMA)


async def run(eng: OpenAIEngine, requests: list[Request]):
    await eng.start()
    try:
        return await eng.generate(requests)
    finally:
        await eng.stop()


# -- profiles: discovered and what they send ---------------------------------------------------


@pytest.mark.parametrize(("owner", "profile", "fields"), [
    ("vllm", "vllm", {"structured_outputs": {"json": SCHEMA}, "repetition_penalty": 1.0, "cache_salt": "t1",
                      "stream_options": {"include_usage": True}, "user": "dev-1"}),
    ("me", "llama.cpp", {"repeat_penalty": 1.0, "top_k": 1, "user": "dev-1"}),
    ("ponder", "ponder", {"session": "dev-1", "response_format": {"type": "json_schema", "json_schema": {
        "name": "ponder_decision", "schema": SCHEMA, "strict": True}}, "max_tokens": 128}),
    ("organization-owner", "openai", {"user": "dev-1", "stream": True}),
])
async def test_discovery_picks_the_profile_and_its_request_fields(owner, profile, fields):
    with ScriptedOpenAIServer([chat_reply(GOOD, cached=3)], models=owned(owner, "m")) as srv:
        eng = OpenAIEngine(srv.url, "m", cache_salt="t1")
        (c,) = await run(eng, [req()])
    assert eng.profile.name == profile and c.error is None and c.text == GOOD
    if profile != "llama.cpp":  # usage from the stream's last event, as vLLM and OpenAI send it
        assert c.usage == Usage(100, 3, 20)
    body = srv.calls[0].body
    assert {k: body.get(k) for k in fields} == fields
    if profile == "llama.cpp":  # one context: one request at a time; no usage in its streams
        assert eng.concurrency == 1 and "stream_options" not in body and "cache_salt" not in body
        sent = body["response_format"]
        assert sent["type"] == "json_object" and sent["schema"]["properties"]["confidence"] == {
            "enum": [round(i / 20, 6) for i in range(21)]}  # bounds its grammar ignores, as a grid
    if profile != "ponder":  # a valid answer always fits: the budget comes from the schema
        assert body["max_tokens"] == answer_token_bound(SCHEMA)


async def test_old_vllm_gets_guided_json_and_a_profile_can_be_named_or_given():
    with ScriptedOpenAIServer([chat_reply(GOOD)], models=owned("vllm", "m")) as srv:
        srv_version = {"version": "0.10.1"}
        orig = srv._handler()

        class Handler(orig):  # a vLLM of before structured_outputs: GET /version says which
            def do_GET(self):  # noqa: N802
                if self.path == "/version":
                    self._send(200, "application/json", json.dumps(srv_version).encode())
                else:
                    super().do_GET()

        srv._httpd.RequestHandlerClass = Handler
        eng = OpenAIEngine(srv.url, "m")
        await run(eng, [req()])
        assert srv.calls[0].body["guided_json"] == SCHEMA and "structured_outputs" not in srv.calls[0].body
        custom = msgspec.structs.replace(PROFILES["vllm"], max_requests=2, extra_body={"priority": 5})
        eng = OpenAIEngine(srv.url, "m", server=custom, max_concurrency=64)
        await run(eng, [req()])
        assert eng.concurrency == 2 and srv.calls[-1].body["priority"] == 5
        eng = OpenAIEngine(srv.url, "m", server="llama.cpp")
        await run(eng, [req()])
        (last,) = [c for c in srv.calls[-2:] if c.path == "/v1/chat/completions"]  # then /extras/tokenize/count
        assert eng.profile.name == "llama.cpp" and last.body["response_format"]["type"] == "json_object"
    with pytest.raises(ValueError, match="unknown server profile 'tgi'"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", server="tgi")


async def test_a_model_the_server_does_not_serve_fails_at_start_naming_the_tier():
    with ScriptedOpenAIServer([chat_reply(GOOD)], models=owned("me", "edge-model")) as srv:
        eng = OpenAIEngine(srv.url, "qwen-7b", tier="edge")
        with pytest.raises(EngineError) as e:
            await eng.start()
        await eng.stop()
        assert str(e.value) == (f"tier 'edge' ({srv.url}): model 'qwen-7b' is not served there (it serves: "
                                "edge-model); set the tier's model= to one of those")
        # a tier that names no model takes the only one served
        eng = OpenAIEngine(srv.url, "")
        await run(eng, [req()])
        assert srv.calls[-1].body["model"] == "edge-model"
        # and a worker stops loudly, before reading anything
        pipe = Pipeline(name="p", key="k", time="ts", actions=ACTIONS,
                        tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=srv.url, model="qwen-7b")))
        with pytest.raises(WorkerFailed, match="tier 'edge'.*model 'qwen-7b' is not served"):
            await pipe.worker(MemorySource([b'{"k": "a", "ts": 1, "v": 1}']), MemorySink()).run()
    assert [c.path for c in srv.calls if c.path != "/extras/tokenize/count"] == ["/v1/chat/completions"]


# -- errors told apart ------------------------------------------------------------------------


def test_rejections_are_classified_by_what_the_server_says():
    body = json.dumps(LLAMA_CPP_500)
    assert rejection(500, body, "json_schema") == "structured"
    assert rejection(500, body, "none") == "request"  # a validation error is never transient
    assert rejection(500, '{"error": {"message": "CUDA out of memory"}}', "json_schema") is None
    assert rejection(503, "overloaded", "none") is None and rejection(429, "slow down", "none") is None
    assert rejection(400, '{"error": {"message": "max_tokens too large"}}', "json_schema") == "request"
    assert rejection(400, "guided_json: unknown field", "guided_json") == "structured"
    assert rejection(404, "The model `x` does not exist.", "structured_outputs") == "request"


async def test_500_validation_error_falls_back_through_the_structured_modes_without_retrying():
    def script(call):
        fmt = call.body.get("response_format")
        if fmt and fmt["type"] == "json_schema":
            return Reply(500, LLAMA_CPP_500)
        return chat_reply(GOOD)

    with ScriptedOpenAIServer(script, models=owned("acme", "m")) as srv:
        eng = OpenAIEngine(srv.url, "m", backoff_s=0.01)
        out = await run(eng, [req()])
        out += await run(eng, [req()])
    assert [c.error for c in out] == [None, None] and eng.structured == "json_object"
    assert [c.body["response_format"]["type"] for c in srv.calls] == ["json_schema", "json_object", "json_object"]


async def test_500_validation_error_about_something_else_is_not_retried_but_a_crash_is():
    with ScriptedOpenAIServer([Reply(500, {"error": {"message": "1 validation error: Field required"}})],
                              models=owned("acme", "m")) as srv:
        (c,) = await run(OpenAIEngine(srv.url, "m", backoff_s=0.01, retries=3), [req()])
    assert len(srv.calls) == 1 and c.error.startswith("HTTP 500") and "Field required" in c.error
    with ScriptedOpenAIServer([Reply(500, {"error": {"message": "engine crashed"}}), chat_reply(GOOD)],
                              models=owned("acme", "m")) as srv:
        (c,) = await run(OpenAIEngine(srv.url, "m", backoff_s=0.01, retries=3), [req()])
    assert len(srv.calls) == 2 and c.error is None


# -- concurrency, deadlines, cancellation -----------------------------------------------------


async def test_a_one_slot_server_gets_one_request_at_a_time_and_queueing_does_not_count_as_a_stall():
    # each answer streams over 0.4 s in small steps; a stall limit of 0.6 s would end any request
    # whose wait in ponder's own queue (up to 1.6 s here) were counted
    reply = lambda call: Reply(body=chat_reply(GOOD).body, delay_s=0.4, pace=True)  # noqa: E731
    with ScriptedOpenAIServer(reply, models=owned("me", "m")) as srv:
        eng = OpenAIEngine(srv.url, "m", max_concurrency=16, stall_s=0.6, timeout_s=20.0)
        out = await run(eng, [req(session=f"k{i}") for i in range(5)])
    assert [c.error for c in out] == [None] * 5 and [c.text for c in out] == [GOOD] * 5
    assert srv.max_inflight == 1 and len([c for c in srv.calls if c.path == "/v1/chat/completions"]) == 5


async def test_a_stalled_stream_is_closed_before_the_retry_and_both_attempts_are_paid_for():
    replies = [Reply(body=chat_reply(GOOD, prompt_tokens=100, completion_tokens=7).body, delay_s=2.0, stall_after=3),
               chat_reply(GOOD, prompt_tokens=100, completion_tokens=7, cached=90)]
    with ScriptedOpenAIServer(replies, models=owned("acme", "m")) as srv:
        eng = OpenAIEngine(srv.url, "m", stall_s=0.5, timeout_s=10.0, backoff_s=0.01)
        t0 = time.monotonic()
        (c,) = await run(eng, [req()])
        took = time.monotonic() - t0
        await asyncio.sleep(2.5)  # the server notices the closed stream at its next writes
        gone = srv.gone
    assert c.error is None and c.text == GOOD and len(srv.calls) == 2 and took < 1.8
    assert gone == 1  # the first attempt's stream was closed: the server stopped generating it
    # attempt 1 streamed the role event and two words before stalling: its prompt (estimated, by
    # characters) and those two chunks count too; attempt 2 reported its own usage
    first_prompt = c.usage.prompt_tokens - 100
    assert first_prompt > 0 and c.usage.completion_tokens == 7 + 2 and c.usage.estimated


async def test_a_stream_cut_off_before_its_finish_reason_is_retried_and_paid_for():
    # llama-cpp-python ends a running stream with [DONE] when another request arrives
    replies = [Reply(body=chat_reply(GOOD).body, cut_after=4), chat_reply(GOOD, prompt_tokens=100, completion_tokens=7)]
    with ScriptedOpenAIServer(replies, models=owned("acme", "m")) as srv:
        (c,) = await run(OpenAIEngine(srv.url, "m", backoff_s=0.01), [req()])
    assert c.error is None and c.text == GOOD and len(srv.calls) == 2
    assert c.usage.completion_tokens == 7 + 3 and c.usage.estimated  # the cut stream's 3 words too


async def test_content_of_the_wrong_type_fails_that_request_alone():
    odd = Reply(body={"choices": [{"message": {"content": [{"type": "text", "text": GOOD}]}}]})
    with ScriptedOpenAIServer(lambda call: odd if call.body["user"] == "b" else chat_reply(GOOD),
                              models=owned("acme", "m")) as srv:
        eng = OpenAIEngine(srv.url, "m", server=ServerProfile(name="plain", stream=False), retries=0)
        a, b = await run(eng, [req("a"), req("b")])
    assert a.error is None and b.error.startswith("malformed response (TypeError: content is a list, not a string)")


async def test_an_uncancellable_request_that_timed_out_is_not_retried():
    profile = ServerProfile(name="plain", stream=False)
    with ScriptedOpenAIServer([Reply(body=chat_reply(GOOD).body, delay_s=1.0)], models=owned("x", "m")) as srv:
        (c,) = await run(OpenAIEngine(srv.url, "m", server=profile, timeout_s=0.3, retries=3), [req()])
    assert len(srv.calls) == 1
    assert c.error == "timed out after 0.3s (timed out and could not be cancelled, so not retried)"
    assert c.usage.prompt_tokens > 0 and c.usage.estimated  # the server was working on it


# -- cached tokens when the server is silent --------------------------------------------------


async def test_cached_tokens_are_estimated_from_the_last_prompt_of_the_session_or_of_the_server():
    def script(call):
        if call.path == "/extras/tokenize/count":  # llama-cpp-python's: its streams carry no usage
            return Reply(body={"count": 200})
        return chat_reply(GOOD, prompt_tokens=200, completion_tokens=5)

    a1, a2 = req("a", body="- e1\n"), req("a", body="- e1\n- e2\n")
    b1 = req("b", body="- e1\n")
    for owner in ("acme", "me"):
        with ScriptedOpenAIServer(script, models=owned(owner, "m")) as srv:
            eng = OpenAIEngine(srv.url, "m")
            await eng.start()
            (u1,) = [c.usage for c in await eng.generate([a1])]
            (u2,) = [c.usage for c in await eng.generate([a2])]
            (u3,) = [c.usage for c in await eng.generate([b1])]
            await eng.stop()
        # reported by the server, or (llama.cpp) counted: its tokenizer, the streamed chunks
        done = 5 if owner == "acme" else len(GOOD.split(" "))
        common = len(a1.prefix)  # a2's prompt starts with a1's prefix, then differs
        assert a2.prompt.startswith(a1.prefix) and not a2.prompt.startswith(a1.prefix + "</")
        assert u1 == Usage(200, 0, done, estimated=True)
        assert u2 == Usage(200, 200 * common // len(a2.prompt), done, estimated=True)
        # a per-prefix cache has nothing for b yet; llama.cpp keeps one context, where b meets a
        shared = len("You watch one key.\n\n<data key=")
        assert u3 == Usage(200, 0 if owner == "acme" else 200 * shared // len(b1.prompt), done, estimated=True)


# -- answers a server could not constrain ------------------------------------------------------


def test_the_token_bound_fits_the_longest_valid_answer():
    # the widest number llama.cpp's grammar allows, a reason at its limit, a newline and an
    # indent around every token
    widest = "-1234567890123456.1234567890123456e-1234567890123456"
    text = ('{\n "action": "inspect",\n "severity": "critical",\n "reason": "' + "x" * REASON_MAX
            + '",\n "confidence": ' + widest + "\n}")
    assert len(text) <= answer_token_bound(SCHEMA)
    assert parse_answer(text.replace(widest, "0.5"), ACTIONS)[1] is None
    too_long = text.replace("x" * REASON_MAX, "x" * (REASON_MAX + 1)).replace(widest, "0.5")
    assert parse_answer(too_long, ACTIONS)[1] == "invalid answer: Expected `str` of length <= 400 - at `$.reason`"
    fields = structured_fields("json_object", SCHEMA, number_bounds=False)["response_format"]["schema"]
    assert fields["properties"]["reason"] == {"type": "string", "maxLength": REASON_MAX}


async def test_an_unconstrained_answer_that_fails_validation_is_asked_for_once_more_with_the_error():
    bad = json.dumps({"action": "reboot", "severity": "high", "reason": "r", "confidence": 0.9})
    with ScriptedOpenAIServer([chat_reply(bad), chat_reply(GOOD), chat_reply(bad)], models=owned("x", "m")) as srv:
        plain = ServerProfile(name="plain", structured="none")
        pipe = Pipeline(name="p", key="k", time="ts", actions=ACTIONS,
                        gate=GatePolicy(rules=(Rule("always", lambda e: True),), cooldown=1),
                        tiers=(TierSpec("reflex", max_batch=1),
                               TierSpec("edge", engine=srv.url, model="m", server=plain, min_score=0.0)))
        sink = MemorySink()
        await pipe.worker(MemorySource([b'{"k": "a", "ts": 1, "v": 1}', b'{"k": "a", "ts": 2, "v": 1}']),
                          sink).run()
    first, second = sink.decisions
    assert (first.tier, first.action, first.trace.route, first.degraded) == ("edge", "inspect", ["edge", "edge"], False)
    assert "Invalid enum value 'reboot'" in first.trace.errors[0]
    assert "rejected" not in srv.calls[0].body["messages"][1]["content"]
    hint = srv.calls[1].body["messages"][1]["content"]
    assert hint.endswith("Your previous reply was rejected: \"invalid answer: Invalid enum value 'reboot' - at "
                         "`$.action`\". Reply again with only the JSON object the schema above describes.\n")
    assert first.usage.prompt_tokens == 200  # both calls paid for
    # the second event: bad answer, then the repair is also bad: the tier gives up, reflex decides
    assert second.trace.route == ["edge", "edge", "reflex"] and second.tier == "reflex" and second.degraded


# -- ponder's own server ------------------------------------------------------------------------


async def test_serve_model_gets_one_attempt_per_deadline_however_many_retries_are_allowed(tmp_path):
    """The issue's cold `serve-model`: attempts timed out one by one and each was sent again while
    the server still generated the last. Now a deadline ends the request (its stream closed) and
    nothing is sent again."""
    from ponder.inference.jax.checkpoint import init_model
    from ponder.inference.jax.engine import JaxEngine
    from ponder.inference.jax.server import ModelServer

    init_model(tmp_path / "tiny", "tiny", seed=0)
    with ModelServer(JaxEngine(tmp_path / "tiny", max_batch=2)) as server:
        warm = OpenAIEngine(server.url, "tiny", mode="completions")
        await run(warm, [Request("w", "warm up", "", 4, ACTIONS, {})])
        # 3,000 tokens: a new shape to compile, then far more decoding than the deadline allows
        eng = OpenAIEngine(server.url, "tiny", mode="completions", timeout_s=1.0, retries=3)
        (c,) = await run(eng, [Request("k", "pump 7 flow", "", 3000, ACTIONS, {})])
        metrics = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    assert c.error == "timed out after 1.0s (deadline of 1.0s reached)" and eng.profile.name == "ponder"
    sent = _metric(metrics, 'ponder_model_requests_total{endpoint="completions",status="200"}')
    assert sent == 2  # the warm-up and one attempt


def _metric(text: str, name: str) -> float:
    (value,) = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value

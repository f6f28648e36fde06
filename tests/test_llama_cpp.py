"""ponder against a server nobody here wrote: llama.cpp's, from the `llama-cpp-python` package,
serving a GGUF that `ponder export-gguf` wrote from a random `tiny` checkpoint.

(a) OpenAIEngine's request matrix against it: discovery, chat with each structured mode it
    meets, completions, a deadline that cancels a running generation, a model it does not serve;
(b) a pipeline whose edge tier is that server: every escalation decided there, none degraded;
(c) greedy equality: `ponder serve-model` and llama.cpp continue the same prompts identically.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ponder.connectors.memory import MemorySink, MemorySource
from ponder.inference.engine import EngineError, Request
from ponder.inference.jax.checkpoint import init_model, init_params, save
from ponder.inference.jax.engine import JaxEngine
from ponder.inference.jax.gguf import export_gguf
from ponder.inference.jax.server import ModelServer
from ponder.inference.openai import OpenAIEngine
from ponder.inference.reflex import ReflexRule
from ponder.operators.context import ContextPolicy
from ponder.operators.decide import parse_answer
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.route import TierSpec
from ponder.pipelines.pipeline import Pipeline
from ponder.types import answer_schema

ACTIONS = ("none", "alert", "inspect")
SCHEMA = answer_schema(ACTIONS)
ALIAS = "tiny-gguf"
# what llama-cpp-python's server prints (verbose, its default) when it reuses its context
PREFIX_HIT = re.compile(r"Llama.generate: (\d+) prefix-match hit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama") / "tiny"
    cfg = init_model(path, "tiny", seed=3)
    # weights at 10x init_model's std: at 0.02 every greedy continuation repeats one token,
    # which would make (c) pass with broken attention (see tests/test_gguf_export.py)
    save(path, cfg, init_params(cfg, seed=3, std=0.2))
    return path


@pytest.fixture(scope="module")
def llama(ckpt, tmp_path_factory):
    """`python -m llama_cpp.server` on a free loopback port; yields (url, log path)."""
    gguf = ckpt.parent / "tiny.gguf"
    export_gguf(ckpt, gguf)
    port = free_port()
    log = tmp_path_factory.mktemp("llama-log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", ALIAS,
             "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port),
             # an f32 KV cache, as ponder's: llama.cpp's default f16 one moves logits by ~1e-2
             # at these weights, enough to flip a near-tie in (c)
             "--type_k", "0", "--type_v", "0"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama.cpp server did not start: " + log.read_text()[-2000:]
            time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(10)


def req(session: str = "dev-1", n: int = 3, tail: str = "Decide now.\n", max_tokens: int = 0) -> Request:
    prefix = ("You monitor one pump. Reply with JSON: action, severity, reason, confidence.\n"
              f"\n<data key={session}>\nRecent events (oldest first):\n"
              + "".join(f"- t={i} flow={10 + i}\n" for i in range(n)))
    return Request(session, prefix, "</data>\n" + tail, max_tokens, ACTIONS, SCHEMA)


async def run(eng: OpenAIEngine, requests: list[Request]):
    await eng.start()
    try:
        return await eng.generate(requests)
    finally:
        await eng.stop()


# -- (a) the request matrix ---------------------------------------------------------------------


async def test_discovery_and_chat_answers_constrained_by_json_object_schema(llama):
    url, _ = llama
    eng = OpenAIEngine(url, ALIAS)
    out = await run(eng, [req(f"k{i}") for i in range(3)])
    assert (eng.profile.name, eng.structured, eng.concurrency) == ("llama.cpp", "json_object", 1)
    for c in out:
        assert c.error is None and c.enforced, c
        answer, err = parse_answer(c.text, ACTIONS)
        assert err is None and answer.action in ACTIONS and 0.0 <= answer.confidence <= 1.0, c.text
        # no usage in its streams: prompt tokens from its tokenizer, completion from the chunks
        assert c.usage.estimated and c.usage.prompt_tokens > 50 and c.usage.completion_tokens > 5


async def test_json_schema_gets_a_500_validation_error_and_the_generic_profile_falls_back(llama):
    url, _ = llama
    forced = OpenAIEngine(url, ALIAS, structured="json_schema", retries=3, backoff_s=0.01)
    (c,) = await run(forced, [req()])
    # rejected as malformed: not retried as if transient
    assert c.error.startswith("HTTP 500") and "json_object" in c.error and "after" not in c.error
    generic = OpenAIEngine(url, ALIAS, server="openai")  # as if nothing were known about the server
    # one at a time: the generic profile knows no request limit, and this server ends a stream
    # early whenever another request arrives (llama-cpp-python's `interrupt_requests`)
    await generic.start()
    out = [c for r in (req(), req(n=4)) for c in await generic.generate([r])]
    await generic.stop()
    assert generic.structured == "json_object" and [c.error for c in out] == [None, None]
    for c in out:  # its grammar kept the enums; bounds it ignores are still enforced here
        answer = json.loads(c.text, strict=False)  # its grammar lets control characters into strings
        assert answer["action"] in ACTIONS and set(answer) == {"action", "severity", "reason", "confidence"}
        err = parse_answer(c.text, ACTIONS)[1]
        assert err is None or err.endswith("at `$.confidence`"), (err, c.text)  # e.g. 9141713e13310106


async def test_completions_mode_is_unconstrained_and_says_so(llama):
    url, _ = llama
    eng = OpenAIEngine(url, ALIAS, mode="completions")
    (c,) = await run(eng, [req(max_tokens=24)])
    assert eng.structured == "none" and not c.enforced and c.error is None
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens > 50 and c.finish_reason in ("stop", "length")


async def test_a_deadline_cancels_the_running_generation_and_the_server_serves_the_next(llama):
    url, log = llama
    before = log.read_text(errors="replace").count("Disconnected from client")
    eng = OpenAIEngine(url, ALIAS, mode="completions", timeout_s=0.3, retries=2)
    long = req(max_tokens=3000, tail="Write a long report.\n")
    (c,) = await run(eng, [long])
    assert c.error == "timed out after 0.3s (deadline of 0.3s reached)"
    ok = OpenAIEngine(url, ALIAS)
    (d,) = await run(ok, [req()])
    assert d.error is None
    # the server logged the hang-up: it stopped generating the abandoned answer
    assert log.read_text(errors="replace").count("Disconnected from client") == before + 1


async def test_a_model_the_server_does_not_serve_fails_at_start(llama):
    url, _ = llama
    eng = OpenAIEngine(url, "qwen2.5-7b", tier="edge")
    with pytest.raises(EngineError, match=rf"tier 'edge' \({url}\): model 'qwen2.5-7b' is not served there "
                                          rf"\(it serves: {ALIAS}\)"):
        await eng.start()
    await eng.stop()


# -- (b) a pipeline on it -------------------------------------------------------------------------


async def test_pipeline_edge_tier_on_llama_cpp_decides_every_escalation(llama):
    url, log = llama
    seen = len(PREFIX_HIT.findall(log.read_text(errors="replace")))
    items = [{"k": k, "ts": float(i), "v": float(i), "flag": i % 2 == 1}
             for i in range(8) for k in ("A", "B", "C")]
    pipe = Pipeline(
        name="lc", key="k", time="ts", actions=ACTIONS,
        context=ContextPolicy(window=8, summary_segments=2, token_budget=2048),
        gate=GatePolicy(rules=(Rule("flag", lambda e: e.payload.get("flag") is True),), cooldown=1),
        tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=url, model=ALIAS, min_score=0.5,
                                                         timeout_s=60.0)),
        reflex=(ReflexRule("*", "alert", "high"),))
    sink = MemorySink()
    stats = await pipe.worker(MemorySource(items), sink).run()
    decisions = sink.decisions
    assert stats.escalations == stats.decisions == len(decisions) >= 6 and stats.dead_letters == 0
    for d in decisions:
        assert (d.tier, d.degraded, d.trace.route, d.trace.errors) == ("edge", False, ["edge"], []), d
        assert d.action in ACTIONS and d.model == ALIAS and d.usage.estimated
    # one context on the server: every call after the first meets the pipeline's header there
    cached = [d.usage.cached_prompt_tokens for d in sorted(decisions, key=lambda d: d.ts)]
    assert cached[0] >= 0 and all(c > 0 for c in cached[1:])
    # a key's second call extends its own first: most of its prompt is estimated cached
    assert max(d.usage.cached_prompt_tokens / d.usage.prompt_tokens for d in decisions) > 0.5
    # the estimate against the truth: the server logs the prefix it reused for each call
    # (the engine is new, so its first call is estimated 0; the server may have met an earlier
    # test's prompt then)
    hits = [int(n) for n in PREFIX_HIT.findall(log.read_text(errors="replace"))[seen:]]
    assert len(decisions) - 1 <= len(hits) <= len(decisions)
    truth, estimate = sum(hits[-(len(decisions) - 1):]), sum(d.usage.cached_prompt_tokens for d in decisions)
    print(f"cached prompt tokens: server {truth}, estimated {estimate}")
    assert abs(estimate - truth) <= 0.15 * truth


# -- (c) greedy equality with ponder's own server -------------------------------------------------


PROMPTS = ["pump 7 flow", '{"action": "', "temperature rose from 20.5 to", "<|im_start|>user\nhello"]


def test_serve_model_and_llama_cpp_continue_prompts_identically(llama, ckpt):
    url, _ = llama
    greedy = {"temperature": 0, "max_tokens": 12}
    with ModelServer(JaxEngine(ckpt, max_batch=2)) as ours, httpx.Client(timeout=120) as http:
        for prompt in PROMPTS:
            a = http.post(ours.url + "/completions", json={"model": "tiny", "prompt": prompt, **greedy}).json()
            # llama.cpp's defaults would change greedy decoding: its penalties off
            b = http.post(url + "/completions", json={
                "model": ALIAS, "prompt": prompt, "repeat_penalty": 1.0, "top_k": 1, **greedy}).json()
            ta, tb = a["choices"][0]["text"], b["choices"][0]["text"]
            # a continuation can end inside a UTF-8 sequence: serve-model shows the stray bytes
            # as U+FFFD, llama-cpp-python drops them (errors="ignore"); the token counts must agree
            assert ta.replace("\ufffd", "") == tb, (prompt, ta, tb)
            assert len(set(ta)) >= 3, ta  # a varied continuation, not one token repeated
            assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"], json.dumps([a, b])

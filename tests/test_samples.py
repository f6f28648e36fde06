"""Test-time compute: `n` samples of one prompt cost one prefill.

The generator (prefill once, fork into n rows, each sample equal to a call of its own with
`seed + i`, the session left holding the prompt and sample 0), JaxEngine, `ponder serve-model`
(`n` choices by `index`, usage with the prompt once) and OpenAIEngine against it (one request
with `n`, or n seeded requests for a server without `n`).
"""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import msgspec
import numpy as np
import pytest
from typer.testing import CliRunner

from ponder.cli import app
from ponder.inference.engine import Request
from ponder.inference.jax import checkpoint
from ponder.inference.jax import step as step_module
from ponder.inference.jax.constrain import Constraint
from ponder.inference.jax.engine import JaxEngine
from ponder.inference.jax.generate import Generator, GenRequest
from ponder.inference.jax.server import ModelServer
from ponder.inference.jax.tokenizer import Tokenizer
from ponder.inference.openai import OpenAIEngine
from ponder.inference.servers import PROFILES
from ponder.types import answer_schema

ACTIONS = ("none", "alert", "inspect")
SCHEMA = answer_schema(ACTIONS)
# one set of shapes for every generator here, in process or behind the server: the jitted
# functions (shared by the process) compile once for the file
BUCKETS = {"max_batch": 4, "batch_buckets": (1, 4), "seq_buckets": (256, 512), "chunk_buckets": (16, 64)}
KW = {**BUCKETS, "session_cap_bytes": 16 << 20, "model_name": "tiny"}
HEAD = "You monitor one stream key.\nAllowed actions: none, alert, inspect.\nReply with JSON.\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = CliRunner().invoke(app, ["init-model", str(path), "--preset", "tiny", "--seed", "0"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def tiny(ckpt):
    cfg, params = checkpoint.load(ckpt)
    return cfg, params, Tokenizer.from_dir(ckpt)


def make(tiny, **kw) -> Generator:
    cfg, params, tk = tiny
    kw = {**BUCKETS, "device_bytes": 16 << 20, "host_bytes": 4 << 20, **kw}
    return Generator(cfg, params, n_vocab=tk.vocab_size, eos_ids=(), **kw)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def apart(tiny, req: GenRequest) -> list:
    """Each sample of `req` as a request of its own (seed + i), in a fresh generator."""
    gen = make(tiny)
    return [gen.generate([GenRequest(f"apart-{i}", req.prompt, req.max_tokens, req.temperature,
                                     seed=req.seed + i, constraint=req.constraint)])[0]
            for i in range(req.n)]


# -- the generator -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_samples_equal_separate_seeded_calls_and_the_prompt_is_prefilled_once(tiny, temperature, monkeypatch):
    gen = make(tiny)
    prefilled = []
    chunk = step_module.prefill_chunk

    def counted(params, cfg, tokens, start, n_new, *rest):
        prefilled.append((tokens.shape[0], int(np.sum(n_new))))
        return chunk(params, cfg, tokens, start, n_new, *rest)

    monkeypatch.setattr(step_module, "prefill_chunk", counted)
    req = GenRequest("k", ids(50, 1), 12, temperature, seed=7, n=4)
    (res,) = gen.generate([req])
    assert prefilled == [(1, 50)]  # one row, the prompt's 50 tokens, once for the four samples
    monkeypatch.undo()

    alone = apart(tiny, req)
    assert res.error is None and len(res.samples) == 4
    assert (res.prompt_tokens, res.cached_tokens, res.tokens) == (50, 0, res.samples[0].tokens)
    for s, a in zip(res.samples, alone):
        assert s.tokens == a.tokens and len(s.tokens) == 12
        np.testing.assert_allclose(s.logprobs, a.logprobs, atol=1e-4)
    distinct = {tuple(s.tokens) for s in res.samples}
    assert len(distinct) == (1 if temperature == 0 else 4)


def test_the_session_keeps_the_prompt_and_sample_0_and_forks_leave_nothing(tiny):
    gen = make(tiny)
    p = ids(60, 2)
    (res,) = gen.generate([GenRequest("k", p, 10, 0.9, seed=3, n=4)])
    s0 = res.samples[0].tokens
    assert len({tuple(s.tokens) for s in res.samples}) == 4
    assert gen.pool.tokens("k") == p + s0[:-1]
    assert gen.pool.keys() == ["k"]  # the other samples' sessions were dropped
    assert gen.pool.usage()["device_bytes"] == 2 * gen.pool.page_bytes  # 69 tokens: two pages

    # the next call reuses sample 0's continuation: the other samples did not write over it
    follow = p + s0[:5] + ids(9, 3)
    again = gen.generate([GenRequest("k", follow, 6)])[0]
    fresh = make(tiny).generate([GenRequest("fresh", follow, 6)])[0]
    assert again.cached_tokens == 65 and again.tokens == fresh.tokens


def test_constrained_samples_validate_independently(tiny):
    cfg, _, tk = tiny
    c = Constraint.json_schema(SCHEMA, tk, vocab_size=cfg.vocab_size)
    prompt = tk.encode(tk.apply_chat_template([{"role": "user", "content": "pump-7 vibration=9.1"}]))
    req = GenRequest("c", prompt, 48, 1.0, seed=40, constraint=c, n=4)
    (res,) = make(tiny).generate([req])
    texts = [tk.decode(s.tokens) for s in res.samples]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1
    assert texts == [tk.decode(a.tokens) for a in apart(tiny, req)]


def test_samples_join_a_running_batch_and_survive_a_layout_round_trip(tiny):
    """A 3-sample request is decoding when a longer prompt arrives: the batch is laid out
    again at a longer cache, and at a shorter one once that prompt's row ends (every row
    scattered to its pages and gathered back each time), and every sample still equals its
    call alone; each sample's on_token saw only its own tokens."""
    gen = make(tiny)
    seen: list[list[int]] = [[], [], []]
    vote = GenRequest("v", ids(40, 4), 30, 0.8, seed=90, n=3,
                      on_token=[seen[i].append for i in range(3)])
    late = GenRequest("late", ids(300, 5), 10)
    shapes = []
    gather = gen.pool.gather
    gen.pool.gather = lambda table: (shapes.append(table.shape), gather(table))[1]
    arrivals = [[(1, late)], [(0, vote)]]
    results = {}

    def fetch():  # the vote at once, the long prompt once its samples have chosen 9 tokens
        return arrivals.pop() if arrivals and (len(arrivals) == 2 or sum(map(len, seen)) >= 9) else []

    gen.serve(fetch, results.__setitem__)
    # the vote's prompt (1 row, S=256); its samples laid out again at S=512 (4 slots: 3 + 1
    # free); the long prompt joining; once it ends, the samples laid out again at S=256
    assert shapes == [(1, 4), (4, 8), (1, 8), (4, 4)]
    res = results[0]
    assert [s.tokens for s in res.samples] == [a.tokens for a in apart(tiny, vote)] == seen
    assert results[1].tokens == make(tiny).generate([GenRequest("alone", late.prompt, 10)])[0].tokens
    assert sorted(gen.pool.keys()) == ["late", "v"]


def test_requests_for_samples_that_cannot_run_get_clear_errors(tiny):
    gen = make(tiny, device_bytes=3 * make(tiny).pool.page_bytes)
    p = ids(20, 6)
    zero, many, big, callbacks = gen.generate([
        GenRequest("a", p, 4, n=0), GenRequest("b", p, 4, n=5), GenRequest("c", p, 4, n=4),
        GenRequest("d", p, 4, n=2, on_token=[print])])
    assert zero.error == ("request 0 (session 'a') asks for n=0 samples; a request may ask for 1 to 4 "
                          "(the most rows decoded together)")
    assert many.error.startswith("request 1 (session 'b') asks for n=5 samples")
    assert big.error == ("request 2 (session 'c') needs 4 pages of 64 tokens for 24 tokens for each of "
                         "4 samples, but the pool has 3 (raise the session cap)")
    assert callbacks.error == "request 3 (session 'd'): 1 on_token callbacks for n=2 samples"
    ok = gen.generate([GenRequest("e", p, 4, n=3)])[0]  # three samples fit three pages
    assert ok.error is None and len(ok.samples) == 3


def test_a_cancelled_request_ends_all_its_samples_and_frees_their_pages(tiny):
    gen = make(tiny)
    stop = threading.Event()
    counts = [0]

    def tick(t):
        counts[0] += 1
        if counts[0] == 6:
            stop.set()

    (res,) = gen.generate([GenRequest("x", ids(30, 7), 50, 0.7, seed=1, n=3, on_token=tick, cancelled=stop)])
    assert res.finish_reason == "error" and res.error == "sample 0: cancelled"
    assert [s.error for s in res.samples] == ["cancelled"] * 3
    assert gen.pool.keys() == ["x"] and gen.pool.usage()["device_sessions"] == 1


# -- JaxEngine, serve-model and the OpenAI client -----------------------------------------------


def request(session: str, n: int = 1, seed: int | None = None, temperature: float | None = 0.7) -> Request:
    prefix = (HEAD + "\n<data key=pump-7>\nRecent events (oldest first):\n"
              "- temperature=91.5\n- vibration=3.2\n")
    return Request(session, prefix, "</data>\nstats now\n", 40, ACTIONS, SCHEMA, n=n, temperature=temperature,
                   seed=seed)


async def test_jax_engine_samples_one_prompt_with_usage_counting_it_once(ckpt):
    eng = JaxEngine(ckpt, **KW)
    try:
        (vote,) = await eng.generate([request("e", n=3, seed=21)])
        alone = await eng.generate([request(f"e{i}", seed=21 + i) for i in range(3)])
    finally:
        await eng.stop()
    assert vote.error is None and vote.text == vote.samples[0]
    assert vote.samples == tuple(a.text for a in alone) and len(set(vote.samples)) > 1
    for text in vote.samples:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert vote.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert vote.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert alone[0].samples == ()  # n = 1: the text alone


@pytest.fixture(scope="module")
def server(ckpt):
    with ModelServer(JaxEngine(ckpt, **KW)) as srv:
        yield srv


def test_serve_model_answers_n_choices_streamed_or_not(server):
    base = server.url
    body = {"prompt": "pump-7 temperature=91.5 rising", "max_tokens": 10, "temperature": 0.9, "seed": 5}
    whole = httpx.post(f"{base}/completions", json={**body, "n": 3}, timeout=120).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    singles = [httpx.post(f"{base}/completions", json={**body, "seed": 5 + i}, timeout=120).json()
               for i in range(3)]
    texts = [c["text"] for c in whole["choices"]]
    assert texts == [s["choices"][0]["text"] for s in singles] and len(set(texts)) == 3
    usage = whole["usage"]
    assert usage["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == 30 == sum(s["usage"]["completion_tokens"] for s in singles)

    parts, finish, streamed_usage = ["", "", ""], {}, None
    with httpx.stream("POST", f"{base}/completions", timeout=120,
                      json={**body, "n": 3, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            streamed_usage = event.get("usage") or streamed_usage
            for c in event["choices"]:
                parts[c["index"]] += c["text"]
                if c["finish_reason"]:
                    finish[c["index"]] = c["finish_reason"]
    assert parts == texts and finish == {0: "length", 1: "length", 2: "length"}
    assert streamed_usage["completion_tokens"] == 30

    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for n, message in ((17, "`n` is 17: a request may ask for n=1 to 16 samples"),
                       (5, "`n` is 5: this server decodes at most 4 rows together (max_batch), so a "
                           "request may ask for n=1 to 4 samples")):
        r = httpx.post(f"{base}/chat/completions", json={**chat, "n": n})
        assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]) == (400, "n", message)


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_client_n_equals_n_separate_seeded_calls(server, stream):
    """The issue's test: through `ponder serve-model`, one request for n samples returns what n
    requests of their own with seed + i return, streamed or not; usage counts the prompt once."""
    profile = msgspec.structs.replace(PROFILES["ponder"], stream=stream)
    eng = OpenAIEngine(server.url, "tiny", server=profile, backoff_s=0.01)
    try:
        vote_req = request(f"o-{stream}", n=3, seed=11)
        body = eng.body(vote_req)
        assert (body["n"], body["temperature"], body["seed"]) == (3, 0.7, 11)
        (vote,) = await eng.generate([vote_req])
        alone = await eng.generate([request(f"o-{stream}-{i}", seed=11 + i) for i in range(3)])
        assert "n" not in eng.body(request("x", seed=4)) and eng.body(request("x", seed=4))["seed"] == 4
    finally:
        await eng.stop()
    assert vote.error is None and vote.text == vote.samples[0] and len(set(vote.samples)) > 1
    assert vote.samples == tuple(a.text for a in alone)
    assert vote.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert vote.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


async def test_openai_client_without_server_n_sends_n_seeded_requests(server):
    native = OpenAIEngine(server.url, "tiny", backoff_s=0.01)
    apart_eng = OpenAIEngine(server.url, "tiny", server=msgspec.structs.replace(PROFILES["ponder"], n=False),
                             backoff_s=0.01)
    try:
        (one,) = await native.generate([request("f-native", n=3, seed=31)])
        (many,) = await apart_eng.generate([request("f-apart", n=3, seed=31)])
        (single,) = await native.generate([request("f-single", seed=31)])
    finally:
        await native.stop()
        await apart_eng.stop()
    assert many.error is None and many.samples == one.samples and many.text == one.text
    assert many.usage.prompt_tokens == 3 * single.usage.prompt_tokens  # each request its own prompt
    assert many.usage.completion_tokens == one.usage.completion_tokens

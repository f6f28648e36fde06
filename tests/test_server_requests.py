"""`ponder serve-model` refuses a malformed request alone: 400 with OpenAI's error JSON naming
the field, no effect on the requests batched with it, and the kept-alive connection stays open
(after a 500 too)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from typer.testing import CliRunner

from ponder.cli import app
from ponder.inference.jax.engine import JaxEngine
from ponder.inference.jax.server import ModelServer

# room for seven rows in one batch; max_wait_ms gives a concurrent burst time to gather
KW = {"max_batch": 8, "session_cap_bytes": 16 << 20, "batch_buckets": (1, 8), "seq_buckets": (256,),
      "chunk_buckets": (16, 64), "model_name": "tiny"}
HUGE = 1180591620717411303424  # 2**70: overflows every integer type on the device


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = CliRunner().invoke(app, ["init-model", str(path), "--preset", "tiny", "--seed", "0"])
    assert result.exit_code == 0, result.output
    with ModelServer(JaxEngine(path, **KW), max_wait_ms=500) as srv:
        yield srv


@pytest.fixture(scope="module")
def vocab(server) -> int:
    return server.engine.cfg.vocab_size


def _addr(r: httpx.Response):
    """The client's end of the connection that carried `r` (same address: same connection)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")


def _batches(base: str) -> tuple[float, float]:
    """(batches admitted, rows admitted) so far, from /metrics."""
    values = {}
    for line in httpx.get(base.removesuffix("/v1") + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["ponder_model_batch_size_count"]), float(values["ponder_model_batch_size_sum"])


def _error(r: httpx.Response) -> dict:
    """The error object of an error reply (or what came instead of OpenAI's error JSON)."""
    try:
        return r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {"not an error JSON": r.text[:200]}


def _invalid(param: str | None) -> dict:
    return {"type": "invalid_request_error", "param": param, "code": None}


async def test_an_overflowing_token_id_is_refused_alone_and_its_batch_runs(server, vocab):
    good = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in
            ("pump-1 temperature=91.5", "pump-2 ok", "valve-3 closed", [5, 6, 7], [40, 41], [[300, 2, 9]])]
    bad = {"prompt": [HUGE, 5, 6], "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        alone = []
        for body in good:
            r = await http.post("/completions", json=body)
            assert r.status_code == 200, r.text
            alone.append(r.json()["choices"][0]["text"])
        before = _batches(server.url)
        replies = await asyncio.gather(*(http.post("/completions", json=b) for b in [*good[:3], bad, *good[3:]]))
    after = _batches(server.url)
    refused = replies.pop(3)
    assert refused.status_code == 400
    error = _error(refused)
    assert {k: v for k, v in error.items() if k != "message"} == _invalid("prompt")
    assert error["message"].startswith(f"Expected `int` <= {vocab - 1} - at `$.prompt[0]`")
    assert [r.status_code for r in replies] == [200] * 6
    assert [r.json()["choices"][0]["text"] for r in replies] == alone
    assert (after[0] - before[0], after[1] - before[1]) == (1, 6)  # the six ran as one batch


def _cases(vocab: int) -> list[tuple[str, bytes, str | None]]:
    """(endpoint, raw body, the param its 400 must name)."""
    msgs = '"messages": [{"role": "user", "content": "hi"}]'
    cases = [
        ("completions", json.dumps({"prompt": [HUGE, 5, 6]}), "prompt"),
        ("completions", json.dumps({"prompt": [5, -1]}), "prompt"),
        ("completions", json.dumps({"prompt": [5, vocab]}), "prompt"),
        ("completions", json.dumps({"prompt": [[vocab + 7]]}), "prompt"),
        ("completions", json.dumps({"prompt": []}), "prompt"),
        ("completions", json.dumps({"prompt": ["a", "b"]}), "prompt"),
        ("completions", json.dumps({"max_tokens": 4}), "prompt"),
        ("completions", json.dumps({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        ("completions", json.dumps({"prompt": "x", "n": 17}), "n"),
        ("completions", json.dumps({"prompt": "x", "temperature": 2.5}), "temperature"),
        ("completions", json.dumps({"prompt": "x", "stream_options": "include_usage"}), "stream_options"),
        ("completions", json.dumps({"prompt": "x", "stop": ["a", ""]}), "stop"),
        ("completions", json.dumps({"prompt": "x", "response_format": {"type": "xml"}}), "response_format"),
        ("chat/completions", json.dumps({"messages": [{"content": "hi"}]}), "messages"),
        ("chat/completions", json.dumps({"messages": [{"role": 5, "content": "hi"}]}), "messages"),
        ("chat/completions", json.dumps({"messages": [{"role": None, "content": "hi"}]}), "messages"),
        ("chat/completions", json.dumps({"messages": []}), "messages"),
        ("chat/completions", json.dumps([{"role": "user", "content": "hi"}]), None),
    ]
    for field in ("max_tokens", "seed", "n", "temperature", "top_p"):  # not JSON, but Python's json reads them
        for value in ("NaN", "Infinity", "-Infinity"):
            cases.append(("completions", f'{{"prompt": "x", "{field}": {value}}}', field))
    cases.append(("chat/completions", f'{{{msgs}, "max_completion_tokens": Infinity}}', "max_completion_tokens"))
    cases.append(("chat/completions", f'{{{msgs}, "temperature": NaN}}', "temperature"))
    return [(e, b.encode(), p) for e, b, p in cases]


def test_each_malformed_request_is_a_400_naming_its_field_on_a_kept_connection(server, vocab):
    raw = [
        ("completions", b'{"prompt": "\xff\xfe pump"}', None, "the request body is not valid UTF-8"),
        ("chat/completions", b'{"messages": [{"role": "user", "content": "\xc3"}]}', None, "the request body is not valid UTF-8"),
        ("completions", b'{"prompt": "x",', None, "the request body is not valid JSON"),
    ]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        first = http.post("/completions", json={"prompt": [0, vocab - 1], "max_tokens": 2, "temperature": 0})
        assert first.status_code == 200, first.text  # the largest token id is accepted
        where = _addr(first)
        got, expected = [], []
        for endpoint, body, param in _cases(vocab):
            r = http.post(f"/{endpoint}", content=body, headers={"content-type": "application/json"})
            error = _error(r)
            named = param is None or f"`$.{param}" in error.get("message", "") or f"`{param}`" in error.get("message", "")
            got.append((body, r.status_code, {k: v for k, v in error.items() if k != "message"}, named, _addr(r)))
            expected.append((body, 400, _invalid(param), True, where))
        for endpoint, body, param, message in raw:
            r = http.post(f"/{endpoint}", content=body, headers={"content-type": "application/json"})
            error = _error(r)
            named = error.get("message", "").startswith(message)
            got.append((body, r.status_code, {k: v for k, v in error.items() if k != "message"}, named, _addr(r)))
            expected.append((body, 400, _invalid(param), True, where))
        assert got == expected
        last = http.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert last.status_code == 200 and _addr(last) == where
        assert last.json()["usage"]["completion_tokens"] == 2


def test_an_unexpected_failure_is_a_500_for_that_request_alone(server, monkeypatch):
    """A bug met by one request (here a tokenizer that raises) answers it 500 with the error
    JSON; the connection stays open and the next request on it runs."""
    engine = server.engine
    encode, decode = engine.encode_text, engine.decode

    def exploding_encode(text: str) -> list[int]:
        if text == "boom":
            msg = "tokenizer exploded"
            raise RuntimeError(msg)
        return encode(text)

    monkeypatch.setattr(engine, "encode_text", exploding_encode)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        ok = http.post("/completions", json={"prompt": "pump", "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200, ok.text
        where = _addr(ok)
        r = http.post("/completions", json={"prompt": "boom", "max_tokens": 3})
        assert (r.status_code, _error(r), _addr(r)) == (500, {
            "message": "RuntimeError: tokenizer exploded", "type": "server_error", "param": None, "code": None},
            where)

        # a failure after a stream's 200 went out ends that stream with an error event, cleanly
        monkeypatch.setattr(engine, "decode", lambda ids: 1 / 0)
        with http.stream("POST", "/completions", json={"prompt": "pump", "max_tokens": 3, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
            assert _addr(s) == where
        assert events == [json.dumps({"error": {"message": "ZeroDivisionError: division by zero",
                                                "type": "server_error", "param": None, "code": None}}), "[DONE]"]
        monkeypatch.setattr(engine, "decode", decode)

        again = http.post("/completions", json={"prompt": "pump", "max_tokens": 3, "temperature": 0})
        assert (again.status_code, _addr(again)) == (200, where)
        assert again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]

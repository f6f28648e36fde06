"""Images through JaxEngine and `ponder serve-model` on a tiny random LLaVA checkpoint (tiny-vl):
the engine's answer equals the Generator's with the same embeddings; the per-key frame cache
skips the vision encoder for a key's repeated (or near-identical) frame and never serves one
key's entry to another; the server takes OpenAI image parts as data URLs only."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image as PILImage

from ponder.images import Image, parse_image
from ponder.inference.engine import Request
from ponder.inference.jax import checkpoint, vision
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.engine import JaxEngine, chat_messages
from ponder.inference.jax.frames import FrameCache, FrameJob
from ponder.inference.jax.generate import Generator
from ponder.inference.jax.rows import GenRequest
from ponder.inference.jax.server import ModelServer
from ponder.inference.jax.tokenizer import Tokenizer

# one set of shapes for every engine here: the jitted functions are traced once per module
KW = {"max_batch": 2, "session_cap_bytes": 8 << 20, "host_cap_bytes": 8 << 20, "batch_buckets": (1, 2),
      "seq_buckets": (128,), "chunk_buckets": (32,), "page_size": 16, "model_name": "tiny-vl"}
MAX_NEW = 6
N_TOKENS = PRESETS["tiny-vl"].vision.n_tokens  # 16
HEAD = "You watch one camera.\n"
DATA = "\n<data key=cam-1>\nframe follows\n"


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """A tiny-vl checkpoint whose random weights (std 0.1) make the image change the answer."""
    path = tmp_path_factory.mktemp("vl") / "tiny-vl"
    checkpoint.init_model(path, "tiny-vl", seed=0)
    cfg, _ = checkpoint.load(path)
    checkpoint.save(path, cfg, checkpoint.init_params(cfg, seed=3, std=0.1))
    return path


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny"
    checkpoint.init_model(path, "tiny", seed=0)
    return path


def png(value: int, spot: int = 0) -> bytes:
    """A 64x48 grey frame; `spot` brightens an 8x6 block by that many grey levels."""
    a = np.full((48, 64), value, np.uint8)
    a[:6, :8] = np.clip(int(value) + spot, 0, 255)
    buf = io.BytesIO()
    PILImage.fromarray(a, "L").save(buf, "PNG")
    return buf.getvalue()


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def frame(value: int, spot: int = 0, field: str = "frame"):
    return parse_image(url(png(value, spot)), field=field, allowed_dirs=(), max_bytes=100_000)


def request(key: str, img, tail: str = "status now\n") -> Request:
    return Request(key, HEAD + DATA, "</data>\n" + tail, MAX_NEW, ("none", "alert"), {},
                   images=(img,) if img is not None else ())


def run(engine: JaxEngine, *reqs: Request):
    return asyncio.run(engine.generate(list(reqs)))


@pytest.fixture(scope="module")
def engine(vl):
    e = JaxEngine(vl, **KW)
    yield e
    asyncio.run(e.stop())


# --- the engine -------------------------------------------------------------------------------


def test_an_image_request_equals_the_generator_with_the_same_embeds(vl, engine):
    """The prompt is the chat template's, the image's n_tokens positions between the data block
    and the tail; the answer is the Generator's for that prompt and vision.embed_images."""
    cfg, params = checkpoint.load(vl)
    tok = Tokenizer.from_dir(vl)
    messages = chat_messages(HEAD + DATA, "</data>\nstatus now\n", "<image>\n")
    assert messages[1]["content"] == "<data key=cam-1>\nframe follows\n<image>\n</data>\nstatus now\n"
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    prompt, starts = vision.expand_image_tokens(ids, cfg.vision)
    assert len(prompt) == len(ids) + N_TOKENS - 1 and len(starts) == 1
    gen = Generator(cfg, params, n_vocab=tok.vocab_size, eos_ids=tok.eos_token_ids or cfg.eos_token_id,
                    max_batch=2, device_bytes=8 << 20, host_bytes=8 << 20,
                    **{k: KW[k] for k in ("batch_buckets", "seq_buckets", "chunk_buckets", "page_size")})
    want = {}
    for value in (40, 200):
        pil = PILImage.open(io.BytesIO(png(value)))
        embeds = vision.embed_images(params["vision"], cfg.vision, [pil], starts)
        want[value] = gen.generate([GenRequest(None, prompt, MAX_NEW, embeds=embeds)])[0]
    assert want[40].tokens != want[200].tokens  # the image matters to this model

    for value in (40, 200):
        got = run(engine, request(f"eq-{value}", frame(value)))[0]
        assert got.error is None
        assert got.text == tok.decode(want[value].tokens)
        assert got.usage.prompt_tokens == len(prompt)


def test_repeated_frames_skip_the_encoder_and_reuse_the_session(engine):
    stats = engine.frames.stats
    first = run(engine, request("cam-a", frame(90)))[0]
    before = (stats.frames_encoded, stats.encoder_calls, stats.hits)
    again = run(engine, request("cam-a", frame(90), tail="status later\n"))[0]
    assert (stats.frames_encoded, stats.encoder_calls, stats.hits) == (before[0], before[1], before[2] + 1)
    # the image ends N_TOKENS positions after "frame follows\n": all of it came from the session
    _, job = engine.request_prompt(request("cam-a", frame(90)))
    image_end = job.starts[0] + N_TOKENS
    assert first.usage.cached_prompt_tokens == 0
    assert again.usage.cached_prompt_tokens >= image_end + 2  # and the "\n</data>" after it

    other = run(engine, request("cam-a", frame(91), tail="status later\n"))[0]  # a new frame: encoded
    assert stats.frames_encoded == before[0] + 1 and stats.encoder_calls == before[1] + 1
    assert other.usage.cached_prompt_tokens == job.starts[0]  # the text before the image only

    run(engine, request("cam-b", frame(90)))  # cam-a's frame, sent by another key: encoded again
    assert stats.frames_encoded == before[0] + 2 and stats.hits == before[2] + 1


def test_near_identical_frames_reuse_within_the_threshold_only(vl):
    e = JaxEngine(vl, near_identical=4, **KW)
    try:
        run(e, request("cam", frame(100)))
        s = e.frames.stats
        assert (s.frames_encoded, s.near_hits) == (1, 0)
        near = run(e, request("cam", frame(100, spot=4), tail="again\n"))[0]  # one cell 4 levels off
        assert (s.frames_encoded, s.near_hits) == (1, 1)
        _, job = e.request_prompt(request("cam", frame(100)))
        assert near.usage.cached_prompt_tokens >= job.starts[0] + N_TOKENS  # its digest: the same K/V
        # drift is measured from the frame that was encoded, not from the last one sent
        run(e, request("cam", frame(100, spot=8)))  # 8 levels from the reference: beyond
        assert (s.frames_encoded, s.near_hits) == (2, 1)
        run(e, request("other", frame(100, spot=8)))  # near for cam, but another key: encoded
        assert (s.frames_encoded, s.near_hits, s.hits) == (3, 1, 0)
    finally:
        asyncio.run(e.stop())


def test_images_in_one_batch_share_one_encoder_call(engine):
    stats = engine.frames.stats
    calls, encoded = stats.encoder_calls, stats.frames_encoded
    out = run(engine, request("batch-1", frame(10)), request("batch-2", frame(20)))
    assert [c.error for c in out] == [None, None]
    assert (stats.encoder_calls, stats.frames_encoded) == (calls + 1, encoded + 2)


def test_bad_image_requests_fail_alone_with_a_reason(engine, text_only):
    corrupt = Image("frame", "image/png", b"not a png", "0" * 64, 64, 48, bytes(64))  # as if parsed
    spelled = Request("k", HEAD + DATA + "look: <image>\n", "</data>\n", MAX_NEW, ("none",), {},
                      images=(frame(5),))
    good, bad = run(engine, request("fine", frame(70)), spelled)
    assert good.error is None
    assert bad.error == ("request 1: the prompt holds 2 image tokens '<image>' for 1 image(s): its text must "
                         "not spell '<image>'")
    broken = run(engine, request("fine", corrupt))[0]
    assert broken.error == "image 0 (frame): cannot decode the image (UnidentifiedImageError)"
    assert broken.usage.prompt_tokens == good.usage.prompt_tokens
    blind = JaxEngine(text_only, **{**KW, "model_name": "tiny"})
    try:
        res = run(blind, request("k", corrupt))[0]
        assert (res.finish_reason, res.text) == ("error", "")
        assert res.error == ("request 0: tiny has no vision tower: this request's 1 image(s) cannot be seen, "
                             "so it is not answered without them")
    finally:
        asyncio.run(blind.stop())


# --- the frame cache --------------------------------------------------------------------------


def _fake_encode(pixels):
    return np.repeat(pixels.reshape(len(pixels), 1, -1), 2, axis=1)  # [N, 2, 4] float32: 32 bytes each


def test_the_cache_holds_its_byte_bound_least_recently_used_out():
    cache = FrameCache(cap_bytes=100)  # 3 entries of 32 bytes fit, not 4
    images = [frame(v, field="f") for v in (1, 2, 3, 4)]

    def prepare(img):
        return np.full(4, float(img.data[-20]), np.float32)

    def send(key, img):
        (got,) = cache.embeds([FrameJob(key, (img,), (0,))], prepare, _fake_encode)
        return got[0]

    for img in images[:3]:
        send("k", img)
    assert (len(cache), cache.bytes, cache.stats.frames_encoded) == (3, 96, 3)
    send("k", images[0])  # a hit: images[0] is now more recently used than images[1]
    cache.near_identical = 255  # any frame is near the key's last encoded one (images[2])
    near = send("k", images[3])
    assert near.digest == images[2].digest  # its features and its digest: the same cached K/V
    assert (cache.stats.hits, cache.stats.near_hits, cache.stats.frames_encoded, len(cache)) == (1, 1, 3, 3)
    cache.near_identical = None
    e = send("k", images[3])
    assert (len(cache), cache.bytes, cache.stats.evicted) == (3, 96, 1)
    assert e.digest == images[3].digest and e.features.shape == (2, 4)
    assert ("k", images[1].digest) not in cache.entries  # the least recently used went
    send("k", images[1])
    assert cache.stats.frames_encoded == 5 and cache.bytes <= 100
    # a frame larger than the whole cache is encoded and not kept
    tiny = FrameCache(cap_bytes=16)
    (got,) = tiny.embeds([FrameJob("k", (images[0],), (0,))], prepare, _fake_encode)
    assert (len(tiny), tiny.bytes, len(got)) == (0, 0, 1)


def test_no_key_caches_nothing_and_bad_options_are_refused():
    cache = FrameCache(cap_bytes=1000)
    img = frame(9)
    for _ in range(2):
        cache.embeds([FrameJob(None, (img,), (0,))], lambda i: np.zeros(4, np.float32), _fake_encode)
    assert (cache.stats.frames_encoded, cache.stats.hits, len(cache)) == (2, 0, 0)
    with pytest.raises(ValueError, match=r"^near_identical must be None or an int of grey levels in \[0, 255\], "
                                         r"got 300$"):
        FrameCache(near_identical=300)
    with pytest.raises(ValueError, match=r"^frame_cache_bytes must be an int >= 0, got -1$"):
        JaxEngine("unused", frame_cache_bytes=-1)


# --- serve-model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(vl):
    with ModelServer(JaxEngine(vl, **KW)) as srv:
        yield srv


def chat(srv, messages, **kw):
    body = {"model": "tiny-vl", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0, **kw}
    return httpx.post(srv.url + "/chat/completions", json=body, timeout=120)


def parts(image_url: str) -> list[dict]:
    """The messages of `request(..)` as OpenAI parts: the image between data block and tail."""
    system, user = chat_messages(HEAD + DATA, "</data>\nstatus now\n")
    head, tail = user["content"].split("</data>")
    return [system, {"role": "user", "content": [
        {"type": "text", "text": head}, {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "\n</data>" + tail}]}]


def test_serve_model_answers_image_parts_as_the_engine_does(server, engine):
    r = chat(server, parts(url(png(150))), session="cam-9")
    assert r.status_code == 200, r.text
    direct = run(engine, request("direct-150", frame(150)))[0]
    body = r.json()
    assert body["choices"][0]["message"]["content"] == direct.text
    assert body["usage"]["prompt_tokens"] == direct.usage.prompt_tokens  # the image's 16 positions count
    calls = server.engine.frames.stats.frames_encoded
    again = chat(server, parts(url(png(150))), session="cam-9").json()
    assert server.engine.frames.stats.frames_encoded == calls  # the same frame, the same session: no encoder
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    chat(server, parts(url(png(150))), session="cam-9", cache_salt="tenant-b")  # another namespace
    assert server.engine.frames.stats.frames_encoded == calls + 1
    # the official client, streamed: the same text
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    chunks = client.chat.completions.create(model="tiny-vl", messages=parts(url(png(150))), max_tokens=MAX_NEW,
                                            temperature=0, stream=True, extra_body={"session": "cam-10"})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.text


@pytest.mark.parametrize(("image_url", "message"), [
    ("http://example.com/cam.png", ("`messages[1].content[1].image_url.url` must be a data URL "
                                   "(data:image/png;base64,...): this server fetches no URLs")),
    ("data:text/plain;base64,aGVsbG8=", ("image field 'messages[1].content[1]': data URL type 'text/plain' is "
                                        "not one of image/png, image/jpeg, image/webp")),
    ("data:image/png;base64,aGVsbG8=", "image field 'messages[1].content[1]': not a PNG, JPEG or WebP image"),
])
def test_bad_image_parts_are_refused(server, image_url, message):
    r = chat(server, parts(image_url), session="bad")
    assert r.status_code == 400
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": "messages",
                                 "code": None}


def test_unknown_parts_and_spelled_image_tokens_are_refused(server):
    r = chat(server, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, ("Invalid value 'input_audio' - at `$.messages[0].content[0].type`: a content part's type is "
             "'text' or 'image_url'"))
    r = chat(server, [{"role": "user", "content": "what is <image>?"}])
    assert (r.status_code, r.json()["error"]["message"]) == (
        400, ("`messages`: the prompt holds 1 image tokens '<image>' for 0 image(s): its text must not spell "
             "'<image>'"))


def test_a_text_only_model_refuses_images_and_reads_text_parts(text_only):
    with ModelServer(JaxEngine(text_only, **{**KW, "model_name": "tiny"})) as srv:
        r = chat(srv, parts(url(png(1))))
        assert r.status_code == 400
        assert r.json()["error"]["message"] == ("`messages[1].content[1]` is an image, but this model (tiny) has "
                                                "no vision tower: send text only")
        as_parts = chat(srv, [{"role": "user", "content": [{"type": "text", "text": "pump "},
                                                           {"type": "text", "text": "hot"}]}])
        as_text = chat(srv, [{"role": "user", "content": "pump hot"}])
        assert as_parts.status_code == 200 and as_parts.json()["choices"] == as_text.json()["choices"]

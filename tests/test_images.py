"""Images in events (ponder/images.py): parsing each form and refusing everything else with its
reason; dead letters for bad images in a run; pixels only in the request of their own event
(never in a payload, context, stored state, trace or another key's request); the unchanged
marker; the OpenAI content-parts body on a real loopback server; what the egress and the
privacy policy keep from a tier; and the built-in camera pipeline on the simulator's cameras."""

from __future__ import annotations

import asyncio
import base64
import doctest
import hashlib
import io
import json
import os

import msgspec
import numpy as np
import pytest
from openai_script_server import ScriptedOpenAIServer, chat_reply
from PIL import Image as PILImage

import ponder.images
from ponder.connectors.base import Record
from ponder.connectors.memory import MemorySink, MemorySource
from ponder.images import Image, ImageError, ImagePolicy, parse_image
from ponder.inference.egress import IMAGES_REFUSED, Egress
from ponder.inference.engine import Completion, Request
from ponder.inference.openai import OpenAIEngine
from ponder.operators import context as ctx
from ponder.operators.gate import GatePolicy, Rule
from ponder.operators.privacy import FieldRule, Policy, Privacy
from ponder.operators.route import TierSpec
from ponder.pipelines.camera_monitor import pipeline as camera_pipeline
from ponder.pipelines.pipeline import Pipeline
from ponder.runtime.decode import Decoder
from ponder.runtime.tracestore import TraceStore
from ponder.runtime.worker import Worker
from ponder.simulate import Fleet
from ponder.state.memory import MemoryStore
from ponder.types import Event, SourcePos, Usage, answer_schema

ANSWER = json.dumps({"action": "alert", "severity": "high", "reason": "r", "confidence": 0.9})
REMOTE = "http://127.0.0.1:9/v1"  # never dialled: tests hand the tier a recording engine


def scene(spot: tuple[int, int] | None = None, noise: int = 0, seed: int = 0, shade: int = 0) -> np.ndarray:
    """A 64x48 grey gradient; a hot spot at `spot`; uniform noise of +-`noise` levels."""
    yy, xx = np.mgrid[0:48, 0:64]
    img = 30.0 + shade + 1.5 * xx + 0.8 * yy
    if spot is not None:
        img += 150.0 * np.exp(-((xx - spot[0]) ** 2 + (yy - spot[1]) ** 2) / 8.0)
    if noise:
        img += np.random.default_rng(seed).integers(-noise, noise + 1, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).convert("RGB" if fmt != "PNG" else "L").save(buf, fmt)
    return buf.getvalue()


def url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PNG = encode(scene())
B64 = base64.b64encode(PNG).decode()


def parse(value, **kw) -> Image:
    kw.setdefault("allowed_dirs", ())
    kw.setdefault("max_bytes", 100_000)
    return parse_image(value, field="frame", **kw)


# -- 1. parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_each_form_parses_to_the_same_image(tmp_path, fmt, mime):
    data = encode(scene(), fmt)
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "f.img").write_bytes(data)
    os.symlink(tmp_path / "cam" / "f.img", tmp_path / "cam" / "link.img")  # a symlink that stays inside
    forms = [url(data, mime), base64.b64encode(data).decode(), str(tmp_path / "cam" / "f.img"),
             str(tmp_path / "cam" / ".." / "cam" / "link.img")]
    images = [parse(v, allowed_dirs=(str(tmp_path / "cam"),)) for v in forms]
    digest = hashlib.sha256(data).hexdigest()
    for img in images:
        assert (img.field, img.mime, img.data, img.digest, img.width, img.height) == ("frame", mime, data, digest, 64, 48)
        assert img.ref == f"image sha256:{digest[:12]} 64x48 {mime.split('/')[1]}"
        assert img == images[0]
    assert images[0].data_url() == url(data, mime)
    assert repr(images[0]) == f"Image('frame', {images[0].ref!r})"  # never the bytes in a log line


def test_each_refusal_says_why(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir(), other.mkdir()
    (other / "x.png").write_bytes(PNG)
    (allowed / "big.png").write_bytes(PNG)
    os.symlink(other / "x.png", allowed / "escape.png")
    dirs = (str(allowed),)
    jpeg = encode(scene(), "JPEG")
    gif = io.BytesIO()
    PILImage.fromarray(scene()).save(gif, "GIF")
    cases = [
        (5, {}, "expected a data URL, base64 text or a file path, got int"),
        ("data:text/plain;base64,aGk=", {}, "data URL type 'text/plain' is not one of image/png, image/jpeg, image/webp"),
        ("data:image/png,abc", {}, "a data URL must be data:<image type>;base64,<data>, got 'data:image/png,abc'"),
        (url(jpeg), {}, "the data URL says image/png but the data is image/jpeg"),
        (url(gif.getvalue(), "image/png"), {}, "not a PNG, JPEG or WebP image"),
        (url(PNG[:-30]), {}, "cannot decode the image: OSError: image file is truncated"),
        (url(PNG), {"max_bytes": 50}, f"image of {len(PNG)} bytes is larger than max_bytes=50"),
        (B64, {"max_pixels": 3000}, "image of 64x48 pixels is more than max_pixels=3000"),
        ("iVBORw0KGgoAA", {}, ("not valid base64 (Invalid base64-encoded string: number of data characters (13)"
                               " cannot be 1 more than a multiple of 4)")),
        ("/srv/frames/0001.png", {}, ("'/srv/frames/0001.png' is neither a data URL nor base64 of a PNG, JPEG or WebP"
                                      " image, and file paths are not allowed (images.allowed_dirs is empty)")),
        (str(other / "x.png"), {"allowed_dirs": dirs}, f"path {str(other / 'x.png')!r} resolves outside the allowed directories"),
        (str(allowed / ".." / "other" / "x.png"), {"allowed_dirs": dirs},
         f"path {str(allowed / '..' / 'other' / 'x.png')!r} resolves outside the allowed directories"),
        (str(allowed / "escape.png"), {"allowed_dirs": dirs},
         f"path {str(allowed / 'escape.png')!r} resolves outside the allowed directories"),
        (str(allowed / "none.png"), {"allowed_dirs": dirs}, f"no such file {str(allowed / 'none.png')!r}"),
        (str(allowed / "big.png"), {"allowed_dirs": dirs, "max_bytes": 50},
         f"file {str(allowed / 'big.png')!r} is larger than max_bytes=50"),
    ]
    for value, kw, why in cases:
        with pytest.raises(ImageError) as e:
            parse(value, **kw)
        assert str(e.value) == f"image field 'frame': {why}", value


def test_the_module_example_holds():
    assert doctest.testmod(ponder.images).failed == 0


def test_near_identical_is_a_grey_level_distance():
    base, noisy, spotted = (parse(url(encode(p))) for p in (scene(), scene(noise=3, seed=1), scene(spot=(20, 20))))
    assert base.digest != noisy.digest  # different bytes ...
    assert base.distance(base.fingerprint) == 0
    assert base.distance(noisy.fingerprint) <= 2  # ... noise averages out over a cell
    assert base.near(noisy.fingerprint, 2) and not base.near(spotted.fingerprint, 40)
    assert base.distance(spotted.fingerprint) > 40  # a hot spot stands out of its cell
    assert base.distance(b"short") == 255  # nothing to compare: as far apart as can be


# -- 2. pipeline, decoding, dead letters ----------------------------------------------------------


FRAMES = ImagePolicy(fields=("frame",))


def pipe(images: ImagePolicy | None = FRAMES, *, tiers=None, privacy=None, **kw) -> Pipeline:
    """Every event escalates (a rule that always fires) to the first tier above reflex."""
    return Pipeline(
        name="cam", key="k", time="ts", actions=("none", "alert"), images=images, privacy=privacy,
        gate=GatePolicy(fields=(), gap=(1e9, 2e9), renotify=0.0, rules=(Rule("flag", lambda e: True),)),
        tiers=tiers or (TierSpec("reflex", max_batch=1),), **kw)


class Recorder:
    """A model tier that keeps every request it is handed and answers at once."""

    name = "recorder"

    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(ANSWER, Usage(10, 0, 5), "rec") for _ in requests]


def run(p: Pipeline, items, *, engines=None, store=None, traces=None) -> MemorySink:
    logic, decoder, built = p.build(engines=engines)
    sink = MemorySink()
    asyncio.run(Worker(logic, decoder, MemorySource(items), sink, built, p.tiers, store=store, traces=traces).run())
    return sink


def test_pipeline_validation_names_the_field(tmp_path):
    class Schema(msgspec.Struct):
        k: str
        ts: float

    cases = [
        ({"images": ImagePolicy(fields=())}, "images.fields must be a non-empty tuple of field names, got ()"),
        ({"images": ImagePolicy(fields=("frame",), max_bytes=0)}, "images.max_bytes must be an int >= 1, got 0"),
        ({"images": ImagePolicy(fields=("frame",), near_identical=300)},
         "images.near_identical must be None or an int of grey levels in [0, 255], got 300"),
        ({"images": ImagePolicy(fields=("frame",), allowed_dirs=(str(tmp_path / "no"),))},
         f"images.allowed_dirs: {str(tmp_path / 'no')!r} is not a directory"),
        ({"images": ImagePolicy(fields=("k",))}, "images.fields names 'k', which is the pipeline's key, time or tenant field"),
        ({"images": ImagePolicy(fields=("frame",)), "schema": Schema},
         "images.fields names 'frame', which the schema Schema does not declare"),
        ({"images": ImagePolicy(fields=("frame",), tiers=("cloud",))}, "images.tiers names tier 'cloud', not one of ['reflex']"),
    ]
    for kw, why in cases:
        with pytest.raises(ValueError) as e:
            pipe(**kw)
        assert str(e.value) == f"pipeline 'cam': {why}"


def test_bad_images_are_dead_letters_with_their_position_and_the_stream_moves_on(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    (tmp_path / "cam").mkdir()
    p = pipe(ImagePolicy(fields=("frame",), allowed_dirs=(str(tmp_path / "cam"),), max_bytes=2_000))
    big = encode(np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8))  # noise: incompressible
    items = [
        {"k": "a", "ts": 1000.0, "frame": url(PNG)},
        {"k": "a", "ts": 1001.0, "frame": url(b"not an image at all")},
        {"k": "a", "ts": 1002.0, "frame": str(outside)},
        {"k": "a", "ts": 1003.0, "frame": 7},
        {"k": "a", "ts": 1004.0, "frame": url(big)},
        {"k": "a", "ts": 1005.0, "frame": None},  # no frame this time: not an image, not an error
        {"k": "a", "ts": 1006.0, "frame": B64},
    ]
    sink = run(p, items)
    assert [(d.source.offset, d.reason) for d in sink.dead_letters] == [
        (1, "image field 'frame': not a PNG, JPEG or WebP image"),
        (2, f"image field 'frame': path {str(outside)!r} resolves outside the allowed directories"),
        (3, "image field 'frame': expected a data URL, base64 text or a file path, got int"),
        (4, f"image field 'frame': image of {len(big)} bytes is larger than max_bytes=2000"),
    ]
    assert sorted(d.source.offset for d in sink.decisions) == [0, 5, 6]


def test_pixels_reach_no_payload_context_state_or_trace(tmp_path):
    frames = [encode(scene(shade=i)) for i in range(3)]
    rec = Recorder()
    store, traces = MemoryStore(), TraceStore(tmp_path / "traces.db", flush_every=1)
    p = pipe(tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=REMOTE, max_batch=1)))
    items = [{"k": "a", "ts": 1000.0 + i, "frame": url(f)} for i, f in enumerate(frames)]
    sink = run(p, items, engines={"edge": rec}, store=store, traces=traces)
    traces.close()
    assert sink.dead_letters == [] and [d.tier for d in sink.decisions] == ["edge"] * 3
    stored = b"".join(v for _, v in store.items())
    on_disk = b"".join(f.read_bytes() for f in tmp_path.iterdir())
    decisions = b"".join(msgspec.json.encode(d) for d in sink.decisions)
    prompts = "".join(r.prefix + r.tail for r in rec.requests)
    assert stored and on_disk and decisions
    for data in frames:
        b64 = base64.b64encode(data)
        for where in (stored, on_disk, decisions, prompts.encode()):
            assert b64[:24] not in where and b64[-24:] not in where and data[16:48] not in where
    refs = [parse(url(f)).ref for f in frames]
    for ref in refs:
        assert ref in prompts  # the reference stands in for the frame
    # each request carried its own event's frame, and the trace says it was sent
    assert [r.images[0].data for r in rec.requests] == frames
    assert [d.trace.images for d in sorted(sink.decisions, key=lambda d: d.ts)] == [
        [f"edge: sent frame ({ref})"] for ref in refs]


# -- 3. context: the unchanged marker -------------------------------------------------------------


def line_refs(policy: ctx.ContextPolicy, frames: list[bytes]) -> tuple[list[str], ctx.ContextState]:
    decoder = Decoder("k", "ts", images=ImagePolicy(fields=("frame",)), max_skew_s=None)
    st = ctx.new_state("a")
    for i, data in enumerate(frames):
        raw = msgspec.json.encode({"k": "a", "ts": 1_764_000_000.0 + 10 * i, "frame": url(data)})
        ev = decoder(Record(raw, SourcePos("t", 0, i)))
        assert isinstance(ev, Event) and ev.payload["frame"] == ev.images[0].ref
        ctx.update(policy, st, ev)
    return st.window, st


def test_identical_frames_are_marked_unchanged_since_their_run_began():
    same, changed = encode(scene()), encode(scene(spot=(30, 20)))
    lines, st = line_refs(ctx.ContextPolicy(), [same, same, same, changed, same])
    r0, r1 = parse(url(same)).ref, parse(url(changed)).ref
    assert lines == [
        f'11-24T16:00:00 "frame"="{r0}"',
        f'11-24T16:00:10 "frame"="{r0} unchanged since 11-24T16:00:00"',
        f'11-24T16:00:20 "frame"="{r0} unchanged since 11-24T16:00:00"',
        f'11-24T16:00:30 "frame"="{r1}"',
        f'11-24T16:00:40 "frame"="{r0}"',  # back to the scene: a change from the frame before
    ]
    assert st.cats == {}  # a frame is not a category: no digest in the summary's counts
    assert msgspec.structs.asdict(st.frames["frame"]) == {"digest": parse(url(same)).digest[:16],
                                                          "since": 1_764_000_040.0, "fingerprint": b""}


def test_near_identical_frames_count_as_unchanged_within_the_threshold():
    frames = [encode(scene(noise=3, seed=i)) for i in range(3)] + [encode(scene(spot=(30, 20), noise=3, seed=9))]
    exact, _ = line_refs(ctx.ContextPolicy(), frames)
    near, st = line_refs(ctx.ContextPolicy(near_identical=4), frames)
    assert sum("unchanged since" in line for line in exact) == 0  # every frame's bytes differ
    assert ["unchanged since 11-24T16:00:00" in line for line in near] == [False, True, True, False]
    assert len(st.frames["frame"].fingerprint) == 64  # the memo: a digest, a time and 64 grey cells


# -- 4. requests: the wire, the egress, privacy, other keys ---------------------------------------

SCHEMA = answer_schema(("none", "alert"))
HEAD = "You monitor one stream key.\nAllowed actions: none, alert.\n"


def request(images: tuple[Image, ...] = ()) -> Request:
    prefix = HEAD + '\n<data key="a">\nRecent events (oldest first):\n- e1\n'
    return Request("a", prefix, "</data>\nDecide.\n", 64, ("none", "alert"), SCHEMA, images=images)


async def _send(srv, reqs, **kw):
    eng = OpenAIEngine(srv.url, "vision-model", backoff_s=0.01, **kw)
    await eng.start()
    try:
        return await eng.generate(reqs)
    finally:
        await eng.stop()


def test_openai_sends_images_as_content_parts_and_nothing_else_changes():
    frames = (parse(url(PNG)), parse(url(encode(scene(), "JPEG"), "image/jpeg")))
    with ScriptedOpenAIServer([chat_reply(ANSWER)]) as srv:
        out = asyncio.run(_send(srv, [request(frames)]))
        out += asyncio.run(_send(srv, [request()]))
    assert [c.error for c in out] == [None, None]
    with_images, without = srv.bodies()
    head, tail = request().prefix[len(HEAD) + 1:], request().tail
    text = head + tail
    assert without["messages"] == [{"role": "system", "content": HEAD}, {"role": "user", "content": text}]
    assert with_images["messages"][1]["content"] == [  # the frames between the data block and the tail
        {"type": "text", "text": head},
        {"type": "image_url", "image_url": {"url": url(PNG)}},
        {"type": "image_url", "image_url": {"url": url(encode(scene(), "JPEG"), "image/jpeg")}},
        {"type": "text", "text": tail},
    ]
    with_images["messages"][1]["content"] = text
    assert with_images == without  # only the user message's content differs


def test_completions_mode_refuses_a_request_with_images_unsent():
    with ScriptedOpenAIServer([chat_reply(ANSWER)]) as srv:
        (c,) = asyncio.run(_send(srv, [request((parse(url(PNG)),))], mode="completions"))
    assert srv.calls == []
    assert c.error == (f"{srv.url}: a request with images needs mode='chat' (the completions API "
                       "takes no images); not sent")


def test_the_egress_refuses_images_for_a_tier_not_allowed_them():
    rec = Recorder()
    door = Egress(rec, b"k", images=False)
    out = asyncio.run(door.generate([request((parse(url(PNG)),)), request()]))
    assert [c.error for c in out] == [IMAGES_REFUSED, None]
    assert len(rec.requests) == 1 and rec.requests[0].images == ()


def test_a_tier_left_out_of_images_tiers_gets_the_request_without_them_and_the_trace_says_so():
    rec, local = Recorder(), Recorder()
    tiers = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine="x", local=True, max_batch=1, min_score=2.0),
             TierSpec("cloud", engine=REMOTE, max_batch=1))
    p = pipe(ImagePolicy(fields=("frame",), tiers=("edge",)), tiers=tiers)
    _, _, built = p.build(engines={"cloud": rec, "edge": local})
    assert isinstance(built["cloud"], Egress) and built["cloud"].images is False
    sink = run(p, [{"k": "a", "ts": 1000.0, "frame": url(PNG)}], engines={"cloud": rec, "edge": local})
    (d,) = sink.decisions
    assert d.tier == "cloud" and rec.requests[0].images == ()
    assert d.trace.images == [f"cloud: withheld frame ({parse(url(PNG)).ref}): tier not in images.tiers"]


def test_a_privacy_rule_on_the_field_withholds_its_image_from_every_tier():
    rec = Recorder()
    p = pipe(tiers=(TierSpec("reflex", max_batch=1), TierSpec("edge", engine=REMOTE, max_batch=1)),
             privacy=Privacy(default=Policy(fields=(FieldRule("frame", "mask"),)), key=b"k"))
    sink = run(p, [{"k": "a", "ts": 1000.0, "frame": url(PNG)}], engines={"edge": rec})
    (d,) = sink.decisions
    assert rec.requests[0].images == ()
    assert '"frame"="[masked]"' in rec.requests[0].prefix and "sha256" not in rec.requests[0].prefix
    assert d.trace.images == ["edge: withheld an image: the privacy policy applies mask to its field"]


def test_a_request_carries_only_its_own_events_images_never_another_keys():
    rec = Recorder()
    tiers = (TierSpec("reflex", max_batch=1), TierSpec("edge", engine="x", local=True, max_batch=8, max_wait_ms=20))
    frames = {k: [encode(scene(shade=s + 40 * j)) for j in range(3)] for s, k in enumerate(("a", "b", "c"))}
    items = [{"k": k, "ts": 1000.0 + j, "frame": url(frames[k][j])} for j in range(3) for k in frames]
    sink = run(pipe(tiers=tiers), items, engines={"edge": rec})
    assert len(sink.decisions) == 9 and len(rec.requests) == 9
    by_id = {d.decision_id: d for d in sink.decisions}
    for r in rec.requests:
        d = by_id[r.request_id]
        assert [img.data for img in r.images] == [frames[d.key][int(d.ts) - 1000]]


# -- 5. the camera pipeline on the simulator's cameras ----------------------------------------------


def test_camera_monitor_inspects_exactly_the_camera_incidents():
    fleet = Fleet(8, 300, 5, camera=True, incident_rate=0.5)
    cams = [i for i in fleet.incidents if i.field == "frame"]
    assert cams  # the seed plants some: the test would say nothing otherwise
    sink = run(camera_pipeline, list(fleet.iter_events()))
    assert sink.dead_letters == []
    found = sorted((d.key, d.ts) for d in sink.decisions if d.action == "inspect_camera")
    assert found == sorted((i.key, i.start) for i in cams)


# -- 6. the gate's frame finding ----------------------------------------------------------------------


def frame_event(i: int, pixels: np.ndarray) -> Event:
    img = parse(url(encode(pixels)))
    return Event("cam", 1000.0 + i, {"frame": img.ref}, SourcePos("t", 0, i), images=(img,))


def frame_findings(frames: list[np.ndarray], near: int | None = None) -> list[list[str]]:
    from ponder.operators.gate import GateState, observe

    g, st = GatePolicy(near_identical=near), GateState()
    return [[f"{f.kind}:{f.field}" for f in observe(g, st, frame_event(i, p)).findings]
            for i, p in enumerate(frames)]


def test_a_frame_is_news_once_and_its_scene_coming_back_is_not():
    """A changed frame scores frame_change on its first showing only; the scene's return, and the
    same change recurring, are not news; the reference is never scored as a category."""
    base, spot = scene(), scene(spot=(10, 10))
    got = frame_findings([base, base, spot, spot, spot, base, base, spot, base])
    assert got == [[], [], ["frame_change:frame"], [], [], [], [], [], []]


def test_noisy_frames_are_news_unless_near_identical_is_set():
    noisy = [scene(noise=2, seed=s) for s in range(6)] + [scene(spot=(20, 20), noise=2, seed=9)]
    exact = frame_findings(noisy)
    assert exact[1:] == [["frame_change:frame"]] * 6  # every new image is unlike every other
    near = frame_findings(noisy, near=8)
    assert near == [[]] * 6 + [["frame_change:frame"]]  # only the hot spot is


def test_a_field_remembers_a_bounded_number_of_frames():
    from ponder.operators.gate import FRAMES, GateState, observe

    g, st = GatePolicy(), GateState()
    for i in range(FRAMES * 3):
        observe(g, st, frame_event(i, scene(shade=10 * i)))
    assert len(st.frames["frame"]) == FRAMES

"""Prefix-cache isolation on `ponder serve-model` (a tiny random checkpoint on loopback): sessions
live in one namespace per (API key, `cache_salt`), so another namespace can neither probe a
session through `cached_tokens` nor wipe it, nor push it out of the pool while it holds no more
than its share; ponder's own client salts each tenant on the wire."""

from __future__ import annotations

import json

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from ponder.inference.egress import Egress
from ponder.inference.engine import Request
from ponder.inference.jax import checkpoint
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.engine import JaxEngine
from ponder.inference.jax.server import BAD_KEY, NO_KEY, Access, ModelServer, serve
from ponder.inference.jax.sessions import SPACE_SEP, SessionPool
from ponder.inference.openai import OpenAIEngine
from ponder.types import answer_schema

KEY_A, KEY_B = "sk-alpha-0001", "sk-beta-0002"
KW = {"max_batch": 4, "session_cap_bytes": 16 << 20, "batch_buckets": (1, 4), "seq_buckets": (256, 512),
      "chunk_buckets": (16, 64), "model_name": "tiny"}
PAGE = 2 * 2 * 64 * 2 * 16 * 4  # tiny, float32: K and V of 2 layers x 64 tokens x 2 heads x 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.init_model(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    with ModelServer(JaxEngine(ckpt, **KW), api_keys=[KEY_A, KEY_B]) as srv:
        yield srv


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def post(srv: ModelServer, key: str | None, prompt: list[int], session: str | None,
         salt: str | None = None, path: str = "/completions") -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    if session is not None:
        body["session"] = session
    if salt is not None:
        body["cache_salt"] = salt
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=120)


def cached(srv: ModelServer, ns: tuple[str | None, str | None], prompt: list[int], session: str | None) -> int:
    """The cached_tokens a request of namespace `ns` = (API key, cache_salt) is told."""
    r = post(srv, ns[0], prompt, session, ns[1])
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


# -- the side channel ------------------------------------------------------------------------------


@pytest.mark.parametrize(("victim", "attackers"), [
    ((KEY_A, None), [(KEY_B, None), (KEY_B, "b-2")]),
    ((KEY_A, "acme"), [(KEY_A, "globex"), (KEY_A, "initech")]),
], ids=["another-api-key", "same-key-another-cache-salt"])
def test_another_namespace_can_neither_probe_nor_wipe_a_session(server, victim, attackers):
    """The issue's probe: the victim read R on session `name`; on the open server a right guess
    of R under that name showed 59 cached tokens and a wrong one (R's first 42 tokens, then
    others) 42, and the wrong guess cut the victim's session to 42. Across namespaces both
    guesses show 0, the attacker's later calls show only its own history, and the victim's
    next call still finds its whole prefix."""
    seed = 100 if victim[1] is None else 200
    name = f"pump-{seed}"
    right = ids(60, seed)
    wrong = right[:42] + [t % 399 + 4 for t in right[42:]]  # differs from token 42 on
    assert cached(server, victim, right, name) == 0
    assert cached(server, victim, right, name) == 59  # its own reading, from cache

    first, second = attackers
    assert cached(server, first, right, name) == cached(server, second, wrong, name) == 0
    # what the attacker sees next is its own history: the same as on a name nobody used
    probe = [cached(server, second, right, name), cached(server, first, wrong, name)]
    control = [cached(server, ns, p, f"nobody-{seed}") for ns, p in ((second, wrong), (second, right),
                                                                      (first, right), (first, wrong))]
    assert probe == control[1::2] == [42, 42] and control[0::2] == [0, 0]

    assert cached(server, victim, right, name) == 59  # nothing was cut or dropped
    # and within the victim's namespace the probe works, as caching must: 59 against 42
    assert cached(server, victim, wrong, name) == 42


def test_one_namespace_is_one_key_and_salt_whoever_sends_it(server):
    """Isolation did not switch caching off: two clients of one key and one salt share their
    sessions (a namespace is the key and salt, not the connection); a request without a
    session keeps nothing, in any namespace."""
    prompt = ids(60, 300)
    with httpx.Client(timeout=120) as one, httpx.Client(timeout=120) as two:
        for client, expected in ((one, 0), (two, 59), (one, 59)):
            r = client.post(server.url + "/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                            json={"prompt": prompt, "max_tokens": 2, "session": "common", "cache_salt": "acme"})
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
    assert [cached(server, (KEY_A, "acme"), prompt, None) for _ in range(2)] == [0, 0]
    # `user`, then `prompt_cache_key`, name the session when `session` is absent
    for field in ("user", "prompt_cache_key"):
        body = {"prompt": prompt, "max_tokens": 2, field: "common", "cache_salt": "acme"}
        r = httpx.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"},
                       timeout=120)
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 59


# -- access ----------------------------------------------------------------------------------------


def test_every_endpoint_but_health_needs_a_key(server):
    root = server.url.removesuffix("/v1")
    no_key = {"error": {"message": NO_KEY, "type": "invalid_request_error", "param": None, "code": None}}
    bad_key = {"error": {"message": BAD_KEY, "type": "invalid_request_error", "param": None,
                         "code": "invalid_api_key"}}
    assert NO_KEY == ("no API key: this server needs `Authorization: Bearer KEY` with one of its keys "
                      "(serve-model --api-key)")
    assert BAD_KEY == "incorrect API key provided"
    for headers, expected in (({}, no_key), ({"Authorization": f"Basic {KEY_A}"}, no_key),
                              ({"Authorization": "Bearer"}, no_key),
                              ({"Authorization": f"Bearer {KEY_A}x"}, bad_key),
                              ({"Authorization": f"Bearer {KEY_A[:-1]}"}, bad_key)):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("GET", "/metrics")):
            r = httpx.request(method, root + path, headers=headers, content=b"{not json", timeout=60)
            assert (r.status_code, r.json(), r.headers["www-authenticate"]) == (401, expected, "Bearer"), path
    assert httpx.get(root + "/health").json() == {"status": "ok"}
    for key in (KEY_A, KEY_B):  # either key, either case of the scheme
        r = httpx.get(server.url + "/models", headers={"Authorization": f"bearer {key}"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]
        assert httpx.get(root + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError, match=BAD_KEY):
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    chat = openai.OpenAI(base_url=server.url, api_key=KEY_B, max_retries=0, timeout=120)
    reply = chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2, extra_body={"session": "s", "cache_salt": "x"})
    assert reply.usage.completion_tokens >= 1


def test_a_bad_cache_salt_is_refused_and_bad_keys_never_start_a_server(server, tmp_path):
    for salt in ("", 7, ["a"]):
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "cache_salt": salt}
        r = httpx.post(server.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 400 and r.json()["error"] == {
            "message": "`cache_salt` must be a non-empty string if given (it names a prefix-cache namespace)",
            "type": "invalid_request_error", "param": "cache_salt", "code": None}
    for keys in ([""], ["sk-1", "two words"], ["sk-\n1"]):
        with pytest.raises(ValueError, match=r"^API key #\d is empty or holds whitespace or control characters"):
            serve(str(tmp_path / "never-loaded"), api_keys=keys)  # refused before the model loads
    assert Access("sk-one").digests == Access(["sk-one", "sk-one"]).digests  # a bare key is one key
    assert Access().open and Access([]).caller(None) == ""


# -- the pool: a fair share per namespace ------------------------------------------------------------


def _pool(device_pages: int, host_pages: int) -> SessionPool:
    pool = SessionPool(PRESETS["tiny"], jnp.float32, device_bytes=device_pages * PAGE,
                       host_bytes=host_pages * PAGE, host_kv="none")  # exact pages: the counts below
    assert pool.page_bytes == PAGE and pool.num_pages == device_pages
    return pool


def _read(pool: SessionPool, key: str, seed: int) -> int:
    """A 2-page reading of session `key` -> its cached prefix."""
    prompt = ids(128, seed)
    n = pool.acquire(key, prompt, 128)
    pool.release(key, prompt)
    return n


def test_a_namespace_within_its_share_is_never_pushed_out():
    """8 device pages, no host memory. A fills the pool with four 2-page sessions; then B reads
    ten sessions. B takes pages from A only while A holds more than its share (8 / 2 = 4),
    then spills its own; A's last two sessions stay. A third namespace's share is 8 / 3 = 2:
    it takes the least recently used session of the namespaces over theirs (B's, not A's
    two it just read)."""
    pool = _pool(8, 0)
    a = [f"A{SPACE_SEP}{i}" for i in range(4)]
    b = [f"B{SPACE_SEP}{i}" for i in range(10)]
    for i, key in enumerate(a):
        assert _read(pool, key, i) == 0
    for i, key in enumerate(b):
        assert _read(pool, key, 10 + i) == 0
    assert [k for k in a if pool.where(k)] == a[2:]
    assert [k for k in b if pool.where(k)] == b[8:]
    assert pool.stats["dropped"] == 10
    assert _read(pool, a[2], 2) == _read(pool, a[3], 3) == 127  # whole, but its last token
    c = f"C{SPACE_SEP}0"
    assert _read(pool, c, 30) == 0
    assert pool.where(c) == "device" and [k for k in a + b if pool.where(k)] == [a[2], a[3], b[9]]


def test_host_memory_follows_the_same_rule():
    """4 device pages and 4 pages' worth of host memory. A's four sessions: two on device, two
    spilled. B's reads spill A to its share on device (2 pages) and drop A's host sessions
    down to its share of host memory (2 pages); B's own then take their turn."""
    pool = _pool(4, 4)
    a = [f"A{SPACE_SEP}{i}" for i in range(4)]
    b = [f"B{SPACE_SEP}{i}" for i in range(6)]
    for i, key in enumerate(a):
        _read(pool, key, i)
    assert [pool.where(k) for k in a] == ["host", "host", "device", "device"]
    for i, key in enumerate(b):
        _read(pool, key, 10 + i)
    assert [pool.where(k) for k in a] == [None, None, "host", "device"]
    assert [pool.where(k) for k in b] == [None] * 4 + ["host", "device"]
    assert _read(pool, a[2], 2) == 127 and pool.stats["restored"] == 1  # back from the host, whole


def test_one_namespace_is_plain_lru():
    pool = _pool(4, 2)
    for i in range(4):
        _read(pool, f"k{i}", i)
    assert [pool.where(f"k{i}") for i in range(4)] == [None, "host", "device", "device"]


def test_a_flood_in_one_namespace_leaves_anothers_session_in_cache(ckpt):
    """Through the server: a pool of 4 one-page sessions and no host memory. A (salt `a`) holds
    one; B (salt `b`, the open server's namespaces) reads eight: its own earliest are dropped,
    A's reading still comes back whole."""
    kw = {**KW, "session_cap_bytes": 4 * PAGE, "host_cap_bytes": 0}
    with ModelServer(JaxEngine(ckpt, **kw)) as srv:  # no keys: one namespace per salt
        reading = ids(60, 400)
        assert [cached(srv, (None, "a"), reading, "pump-1") for _ in range(2)] == [0, 59]
        for i in range(8):
            assert cached(srv, (None, "b"), ids(60, 410 + i), f"flood-{i}") == 0
        assert cached(srv, (None, "b"), ids(60, 410), "flood-0") == 0  # B's own: pushed out
        assert cached(srv, (None, "a"), reading, "pump-1") == 59
        # without a salt, every caller of an open server is one namespace
        assert [cached(srv, (None, None), reading, "pump-1") for _ in range(2)] == [0, 59]


# -- ponder's own client ---------------------------------------------------------------------------


class Tap(httpx.AsyncBaseTransport):
    """Loopback transport that keeps every JSON body it carries."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.bodies.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_two_tenants_through_the_door_get_their_own_salt_and_no_hits(server):
    """Tenants acme and globex send the same stream key and the same prompt through the egress
    to a tier discovered as `ponder` (with an API key): the same session pseudonym on the wire,
    each tenant's own `cache_salt`, and only each tenant's own prefix from cache."""
    actions = ("none", "alert")
    prefix = "You watch one key.\n\n<data key=pump-7>\nRecent events:\n- temperature=91.5\n"

    def request(tenant: str) -> Request:
        return Request("pump-7", prefix, "</data>\nstats now\n", 4, actions, answer_schema(actions), tenant=tenant)

    tap = Tap()
    eng = OpenAIEngine(server.url, "tiny", api_key=KEY_A, transport=tap)
    door = Egress(eng, b"privacy-key")
    await door.start()
    try:
        seen = [(await door.generate([request(t)]))[0] for t in ("acme", "acme", "globex", "globex", "acme")]
    finally:
        await door.stop()
    assert eng.profile.name == "ponder" and eng.profile.cache_salt
    assert all(c.error is None for c in seen), [c.error for c in seen]
    hits = [c.usage.cached_prompt_tokens for c in seen]
    assert hits[0] == hits[2] == 0 and hits[1] == hits[3] == hits[4] > 0
    assert hits[1] == seen[1].usage.prompt_tokens - 1  # the whole prompt but its last token
    salts = [b["cache_salt"] for b in tap.bodies]
    assert salts[0] == salts[1] == salts[4] != salts[2] == salts[3]
    assert salts[0] == door.pseudonym("acme", "salt") and salts[2] == door.pseudonym("globex", "salt")
    assert len({b["session"] for b in tap.bodies}) == 1 and "pump-7" not in tap.bodies[0]["session"]

"""What an OpenAI-compatible server supports, and how ponder talks to it: server profiles.

Servers that all answer `/v1/chat/completions` differ where it matters to a decision:

| profile | structured output | cached tokens | requests at once | cancel | `n` samples |
| --- | --- | --- | --- | --- | --- |
| `vllm` | `structured_outputs: {json}` (v0.11+; `guided_json` before) | `prompt_tokens_details` (with `--enable-prompt-tokens-details`) | many (continuous batching) | close the stream | one request |
| `llama.cpp` (llama-cpp-python's server) | chat: `response_format: {type: json_object, schema}`; completions: none | not reported: estimated | 1 (one context, a lock) | close the stream | n requests |
| `ponder` (`ponder serve-model`) | `response_format: json_schema` | `prompt_tokens_details` | many | close the stream | one request, one prefill |
| `openai` (anything else) | `json_schema`, falling back on rejection | whatever `usage` says, else estimated | the tier's | close the stream | one request |

A profile is chosen by `TierSpec(server=…)`: a profile name, a `ServerProfile` (e.g. a built-in
one with fields replaced), or `auto` (the default), which asks `GET /v1/models` who owns the
model (`vllm`, `ponder`, llama-cpp-python's `me`, llama.cpp's C++ server `llamacpp`) and, for
vLLM, `GET /version`, for llama.cpp's C++ server `GET /props` (its slot count).

Structured modes (`ServerProfile.structured`):

* `json_schema`: OpenAI's `response_format: {type: json_schema, json_schema: {name, schema, strict}}`;
* `json_object`: `response_format: {type: json_object, schema}` (llama-cpp-python; grammar-based,
  it ignores `minimum`/`maximum`);
* `structured_outputs`: vLLM's `structured_outputs: {json: schema}` (vLLM ≥ 0.11);
* `guided_json`: vLLM's older `guided_json: schema` (removed in v0.12);
* `none`: nothing; the answer is parsed and validated, and a bad one is asked again once with
  the validation error as a repair hint (operators/reason.py).

Whatever the mode, the answer is validated after generation (operators/decide.py): bounds and
lengths a server's grammar ignores are still enforced.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import httpx
import msgspec

__all__ = ["ServerProfile", "PROFILES", "profile_named", "structured_fields", "rejection",
           "discover", "Discovery", "FALLBACK", "ServerNotReady"]

logger = logging.getLogger(__name__)

Structured = Literal["json_schema", "json_object", "structured_outputs", "guided_json", "none"]


class ServerProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What one kind of server supports.

    :param structured: how chat requests ask for the decision schema.
    :param structured_completions: the same for `/v1/completions`.
    :param cached_tokens: whether `usage` reports prompt tokens served from cache; if not, the
        client estimates them (`Usage.estimated`).
    :param cache_scope: what an estimate compares a prompt against: `session` (the last prompt
        sent for the same session: per-prefix caches such as vLLM's) or `server` (the last
        prompt sent to the server at all: llama-cpp-python keeps one context).
    :param cache_salt: the server takes vLLM's `cache_salt` (a prefix cache per salt).
    :param session_fields: body fields that carry the session (the stream key).
    :param stream: answer as server-sent events, so a request can be cancelled by closing its
        stream and a deadline can tell a queued request from a working one.
    :param stream_usage: a stream ends with `usage` when asked (`stream_options.include_usage`).
    :param tokenize_path: where to count a prompt's tokens when a stream reports no usage.
    :param greedy: fields sent with `temperature: 0` to make decoding greedy (llama.cpp's
        default `repeat_penalty` 1.1 changes even a temperature-0 answer).
    :param n: the server answers `n` > 1 (one request, the prompt prefilled once); if not,
        a request for n samples is sent as n requests.
    :param max_requests: requests in flight at once; 0: the tier's batching decides.
    :param max_tokens: the completion budget when a tier leaves it open (`max_tokens=0`): 0
        derives it from the schema; ponder's server closes a schema'd answer within any
        budget, so it needs no worst case.
    :param number_bounds: the server's grammar enforces `minimum`/`maximum` on numbers; if
        not (llama.cpp), a bounded number is sent as an enum of 21 evenly spaced values, which
        every JSON-schema grammar enforces (the answer is validated against the real bounds).
    :param extra_body: fields added to every body (last, so they win).
    """

    name: str
    structured: Structured = "json_schema"
    structured_completions: Structured = "json_schema"
    cached_tokens: bool = True
    cache_scope: Literal["session", "server"] = "session"
    cache_salt: bool = False
    session_fields: tuple[str, ...] = ("user",)
    stream: bool = True
    stream_usage: bool = True
    tokenize_path: str | None = None
    greedy: dict[str, Any] = {}
    n: bool = True
    max_requests: int = 0
    max_tokens: int = 0
    number_bounds: bool = True
    extra_body: dict[str, Any] = {}


PROFILES: dict[str, ServerProfile] = {
    "vllm": ServerProfile(name="vllm", structured="structured_outputs",
                          structured_completions="structured_outputs", cache_salt=True,
                          greedy={"repetition_penalty": 1.0}),
    "llama.cpp": ServerProfile(name="llama.cpp", structured="json_object", structured_completions="none",
                               cached_tokens=False, cache_scope="server", stream_usage=False,
                               tokenize_path="/extras/tokenize/count",
                               greedy={"repeat_penalty": 1.0, "top_k": 1, "frequency_penalty": 0.0,
                                       "presence_penalty": 0.0},
                               n=False, max_requests=1, number_bounds=False),
    "ponder": ServerProfile(name="ponder", session_fields=("session",), cache_salt=True, max_tokens=128),
    "openai": ServerProfile(name="openai"),
}
# when a server rejects a structured mode, the next one to try
FALLBACK: dict[str, Structured] = {"json_schema": "json_object", "json_object": "none",
                                   "structured_outputs": "guided_json", "guided_json": "none",
                                   "none": "none"}
_OWNERS = {"vllm": "vllm", "ponder": "ponder", "me": "llama.cpp", "llamacpp": "llama.cpp"}


def profile_named(name: str) -> ServerProfile:
    try:
        return PROFILES[name]
    except KeyError:
        msg = f"unknown server profile {name!r}: expected one of {sorted(PROFILES)} or 'auto'"
        raise ValueError(msg) from None


def structured_fields(mode: Structured, schema: dict[str, Any], number_bounds: bool = True) -> dict[str, Any]:
    """The body fields that ask for `schema` in `mode`."""
    if not schema or mode == "none":
        return {}
    if not number_bounds:
        schema = _gridded(schema)
    if mode == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "ponder_decision", "schema": schema, "strict": True}}}
    if mode == "json_object":
        return {"response_format": {"type": "json_object", "schema": schema}}
    if mode == "structured_outputs":
        return {"structured_outputs": {"json": schema}}
    return {"guided_json": schema}


_GRID = 20


def _gridded(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each bounded number property replaced by an enum on a grid of its range."""
    props = schema.get("properties")
    if not isinstance(props, dict):
        return schema
    out = {}
    for name, p in props.items():
        if isinstance(p, dict) and p.get("type") == "number" and "minimum" in p and "maximum" in p:
            lo, hi = float(p["minimum"]), float(p["maximum"])
            p = {"enum": sorted({round(lo + (hi - lo) * i / _GRID, 6) for i in range(_GRID + 1)})}
        out[name] = p
    return {**schema, "properties": out}


# what a request-validation error says, in FastAPI/pydantic (llama-cpp-python answers them
# with HTTP 500), vLLM and OpenAI
_VALIDATION = re.compile(
    r"validation error|Input should be|Field required|Extra inputs are not permitted|"
    r"literal_error|'loc': \('body'|\"loc\": ?\[\"body\"|invalid_request_error|is not supported|"
    r"Unrecognized request argument|unexpected keyword", re.IGNORECASE)
_MODE_WORDS = {"json_schema": ("response_format", "json_schema"), "json_object": ("response_format", "json_object"),
               "structured_outputs": ("structured_outputs",), "guided_json": ("guided_json",)}


def rejection(status: int, text: str, mode: Structured) -> str | None:
    """Why a failed response is not worth retrying as sent, or None if it may be transient.

    `"structured"`: the server refuses the structured-output fields of `mode` (try the next
    mode); `"request"`: it refuses the request itself (a malformed body, an unknown model, a
    prompt too long). A 500 whose body is a validation error is a rejection, not an outage.
    """
    if status in (408, 429) or (status >= 500 and not _VALIDATION.search(text)):
        return None
    if mode != "none" and any(w in text for w in _MODE_WORDS[mode]):
        return "structured"
    return "request"


class ServerNotReady(Exception):
    """`GET /v1/models` answered 429, 502, 503 or 504 (a server still loading its model, a
    proxy before it): ask again later rather than settle on a profile now."""


class Discovery(msgspec.Struct, frozen=True):
    """What `GET /v1/models` (and friends) said. `models` is None when the server has no such
    endpoint: the model cannot be checked then."""

    profile: ServerProfile
    models: tuple[str, ...] | None


async def discover(client: httpx.AsyncClient, base_url: str, server: str | ServerProfile) -> Discovery:
    """Ask the server what it serves and, for `auto`, which profile fits it. Connection
    errors propagate (the caller decides whether an unreachable server may start later)."""
    r = await client.get(base_url + "/models")
    if r.status_code in (429, 502, 503, 504):  # 501 and 404: there is no such endpoint
        msg = f"{base_url}/models answered HTTP {r.status_code}"
        raise ServerNotReady(msg)
    models: tuple[str, ...] | None = None
    owners: set[str] = set()
    if r.status_code == 200:
        try:
            data = msgspec.json.decode(r.content).get("data") or []
            models = tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
            owners = {str(m.get("owned_by")) for m in data if isinstance(m, dict)}
        except (msgspec.DecodeError, AttributeError, TypeError, KeyError):
            logger.warning("%s/models answered something that is not a model list: %s", base_url, r.text[:200])
    else:
        logger.warning("%s/models answered HTTP %d: the tier's model cannot be checked", base_url, r.status_code)
    if isinstance(server, ServerProfile):
        return Discovery(server, models)
    if server != "auto":
        return Discovery(profile_named(server), models)
    kind = next((_OWNERS[o] for o in owners if o in _OWNERS), "openai")
    profile = PROFILES[kind]
    root = base_url.removesuffix("/v1")
    if "vllm" in owners:
        profile = await _vllm_version(client, root, profile)
    if "llamacpp" in owners:  # llama.cpp's own server: json_schema, usage, N slots
        profile = await _llama_server(client, root)
    return Discovery(profile, models)


async def _vllm_version(client: httpx.AsyncClient, root: str, profile: ServerProfile) -> ServerProfile:
    try:
        r = await client.get(root + "/version")
        version = tuple(int(x) for x in re.findall(r"\d+", str(r.json().get("version", "")))[:2])
    except (httpx.HTTPError, ValueError, AttributeError):
        return profile
    if version and version < (0, 11):
        return msgspec.structs.replace(profile, structured="guided_json", structured_completions="guided_json")
    return profile


async def _llama_server(client: httpx.AsyncClient, root: str) -> ServerProfile:
    slots = 1
    try:
        r = await client.get(root + "/props")
        slots = max(1, int(r.json().get("total_slots") or 1))
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        pass
    return msgspec.structs.replace(PROFILES["llama.cpp"], name="llama-server", structured="json_schema",
                                   structured_completions="json_schema", cached_tokens=True,
                                   cache_scope="session", stream_usage=True, tokenize_path=None,
                                   max_requests=slots)

"""The request bodies `ponder serve-model` accepts, as msgspec Structs.

One typed decode parses and validates a body; a bad field comes back as a `BadRequest` that
names it (OpenAI's `param`), so one malformed request is refused alone, before it can reach the
engine's shared batch. Token ids are bounded by the loaded model's vocabulary, which is why
the completions body is built per model (`Bodies`). `null` means a field's default and unknown
fields are ignored, as OpenAI clients expect.

A chat message's `content` is a string or a list of OpenAI content parts: `{"type": "text",
"text": ...}` and `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`
(a tagged union: any other `type` is refused, naming the part). Only data URLs are images here:
the server fetches nothing (see server.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

__all__ = ["MAX_IMAGES", "MAX_PARTS", "MAX_SAMPLES", "BadRequest", "Bodies", "Body", "ChatBody", "ImagePart",
           "JsonSchemaFormat", "Message", "TextPart", "prompt_of"]

# every length on the device is int32; larger budgets are cut to the context anyway
Budget = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]  # the bounds also refuse NaN
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # OpenAI's seed is an int64
StopString = Annotated[str, Meta(min_length=1)]
MAX_SAMPLES = 16  # `n`: a vote needs a handful; each sample takes a row of the shared batch
MAX_PARTS = 64  # content parts of one message
MAX_IMAGES = 8  # image parts of one request: each is a tower call's row and n_tokens positions
MAX_URL = 16 << 20  # characters of an image part's URL (its bytes are bounded again when parsed)


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class StreamOptions(Struct):
    include_usage: bool | None = None


class JsonSchemaSpec(Struct):
    schema: dict[str, Any]
    name: str | None = None
    strict: bool | None = None


class TextFormat(Struct, tag="text"):
    pass


class JsonObjectFormat(Struct, tag="json_object"):
    pass


class JsonSchemaFormat(Struct, tag="json_schema"):
    json_schema: JsonSchemaSpec


class Body(Struct, kw_only=True):
    """The fields both endpoints share: OpenAI's, plus `session` (the KV session's name)."""

    model: str | None = None
    max_tokens: Budget | None = None
    max_completion_tokens: Budget | None = None
    n: Annotated[int, Meta(ge=1)] | None = None  # samples of the one prompt (at most MAX_SAMPLES)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[StopString], Meta(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    session: str | None = None
    user: str | None = None
    prompt_cache_key: str | None = None


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageUrl(Struct):
    url: Annotated[str, Meta(min_length=1, max_length=MAX_URL)]
    detail: str | None = None  # OpenAI's resolution hint; one resolution here (the tower's)


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrl


Content = str | Annotated[list[TextPart | ImagePart], Meta(max_length=MAX_PARTS)]


class Message(Struct):
    role: Annotated[str, Meta(min_length=1)]
    content: Content = ""


class ChatBody(Body, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]


def completion_body(vocab_size: int) -> type[Body]:
    """The /v1/completions body for a model of `vocab_size` token ids: `prompt` is a string,
    a list of one string, token ids, or a list of one list of token ids."""
    token = Annotated[int, Meta(ge=0, lt=vocab_size)]
    prompt = str | list[str | token | list[token]]
    return msgspec.defstruct("CompletionBody", [("prompt", prompt)], bases=(Body,), kw_only=True)


def prompt_of(body: Body) -> str | list[int]:
    """A completions body's prompt as text or token ids (one prompt per request)."""
    p = body.prompt  # type: ignore[attr-defined]
    if isinstance(p, list) and len(p) == 1 and not isinstance(p[0], int):
        p = p[0]
    if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
        return p
    msg = "`prompt` must be a string, a list of one string, or a non-empty list of token ids"
    raise BadRequest(msg, "prompt")


_AT = re.compile(r" - at `\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")
_PART_TYPE = re.compile(r"at `\$\.messages\[\d+\]\.content\[\d+\]\.type`$")


class Bodies:
    """Decoders for the bodies of one loaded model, built once."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.types = {True: ChatBody, False: completion_body(vocab_size)}
        self.decoders = {chat: msgspec.json.Decoder(t) for chat, t in self.types.items()}

    def parse(self, raw: bytes, chat: bool) -> Body:
        """The body of a chat or completions request -> its Struct, or BadRequest."""
        try:
            return self.decoders[chat].decode(raw)
        except msgspec.ValidationError as e:
            raise self._invalid(e) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            raise self._malformed(raw, chat, e) from None

    def _invalid(self, e: msgspec.ValidationError) -> BadRequest:
        text = str(e)
        m = _AT.search(text) or _MISSING.search(text)
        param = m.group(1) if m else None
        if _PART_TYPE.search(text):
            text += ": a content part's type is 'text' or 'image_url'"
        if param == "prompt" and text.startswith("Expected `int`"):
            text += f" (token ids are 0 <= id < {self.vocab_size}, this model's vocabulary)"
        return BadRequest(text, param)

    def _malformed(self, raw: bytes, chat: bool, error: Exception) -> BadRequest:
        """Why a body that is not strict JSON was refused. Python's json module also reads
        NaN and Infinity: a body it can read is checked again so the field is named."""
        try:
            text = raw.decode()
        except UnicodeDecodeError as e:
            return BadRequest(f"the request body is not valid UTF-8: {e}")
        try:
            obj = json.loads(text)
        except ValueError:
            return BadRequest(f"the request body is not valid JSON: {error}")
        try:
            msgspec.convert(obj, self.types[chat])
        except msgspec.ValidationError as e:
            return self._invalid(e)
        where = _non_finite(obj)
        if where is not None:
            return BadRequest(f"`{where[0]}` is {where[1]}: JSON has no NaN or Infinity", where[0])
        return BadRequest(f"the request body is not valid JSON: {error}")


def _non_finite(obj: Any, key: str | None = None) -> tuple[str, float] | None:
    """(top-level field, value) of the first NaN or infinity in a decoded body, if any."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return (key or "$", obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _non_finite(v, key if key is not None else str(k))
        if found is not None:
            return found
    return None

"""Decide: turn an engine's text into a validated answer, or say exactly why it is not one.

Allowed actions are enforced here, after generation, whatever the engine promised: the answer
is decoded into a Struct whose `action` is a Literal of the pipeline's actions.

>>> parse_answer('{"action":"alert","severity":"high","reason":"hot","confidence":0.8}', ("none", "alert"))
(Answer(action='alert', severity='high', reason='hot', confidence=0.8), None)
>>> parse_answer('{"action":"rm -rf","severity":"high","reason":"x","confidence":1}', ("none",))[1]
"invalid answer: Invalid enum value 'rm -rf' - at `$.action`"

One leniency: raw control characters inside strings, which JSON forbids but llama-cpp-python's
grammar lets through (its `char` rule is `[^"\\]`), are read as spaces rather than failing an
answer that is otherwise valid; nothing else about the answer is relaxed.

>>> parse_answer('{"action":"none","severity":"low","reason":"a\x02b","confidence":0}', ("none",))[0].reason
'a b'
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ponder.types import answer_type

__all__ = ["parse_answer"]

_decoders: dict[tuple[str, ...], msgspec.json.Decoder] = {}


def _extract_json(text: str) -> str:
    """Models wrap JSON in prose or code fences; take the outermost object."""
    start = text.find("{")
    end = text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


_CONTROL = re.compile(r"[\x00-\x1f]")


def parse_answer(text: str, actions: tuple[str, ...]) -> tuple[Any | None, str | None]:
    """Decode and validate an answer: (answer, None) or (None, error)."""
    dec = _decoders.get(actions)
    if dec is None:
        dec = _decoders[actions] = msgspec.json.Decoder(answer_type(actions))
    raw = _extract_json(text)
    try:
        return dec.decode(raw), None
    except msgspec.ValidationError as e:
        return None, f"invalid answer: {e}"
    except msgspec.DecodeError as e:
        error = f"invalid answer: {e}"
    # between JSON tokens a control character is whitespace already; inside a string it is not
    lenient = _CONTROL.sub(" ", raw)
    if lenient == raw:
        return None, error
    try:
        return dec.decode(lenient), None
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return None, f"invalid answer: {e}"  # what else is wrong with it

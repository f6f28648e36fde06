"""Constrained decoding: token masks that keep a model's output inside a JSON Schema.

Model-agnostic: a `Constraint` needs only the tokenizer's byte vocabulary (`Tokenizer.vocab()`),
its special ids and its EOS ids, and hands the generator numpy bool masks to apply to logits.

    c = Constraint.json_schema(answer_schema(actions), tokenizer, vocab_size=cfg.vocab_size)
    s = c.start()
    while not c.is_done(s):
        logits = jnp.where(jnp.asarray(c.mask(s)), logits, -jnp.inf)
        tok = sample(logits)
        if tok in tokenizer.eos_token_ids: break      # only allowed once the JSON is complete
        s = c.advance(s, tok)

Library: llguidance (Bindings for the Low-level Guidance Rust library; used by vLLM, SGLang and
llama.cpp for the same job). Chosen over the other two candidates because:
- it builds from a plain byte vocabulary (`TokenizerWrapper`: bytes per id, special ids, EOS
  ids, several EOS allowed), so any tokenizer that `Tokenizer.vocab()` understands works, and
  padding rows of the embedding simply never get allowed;
- it computes masks lazily with an Earley parser over a token trie: no up-front index per
  schema, ~tens of µs per mask on CPU (see tests/test_constrain.py), a few ms to build;
- it enforces the schema keywords the decision uses: `enum`, `required`,
  `additionalProperties: false`, `maxLength` on `reason`, `minimum`/`maximum` on `confidence`
  (outlines-core 0.2's regex builder drops the number bounds and builds a full DFA index up
  front; xgrammar pulls in torch, triton and apache-tvm-ffi);
- the wheel is abi3, CPU-only and has no Python dependencies.

Output is compact JSON (no whitespace between tokens) unless the schema's own `x-guidance`
options say otherwise: fewer tokens per answer.

Length: `reason` is bounded by its maxLength (400 characters), but a JSON number (here
`confidence`) may have any number of digits, so the grammar alone does not bound the answer's
token count. A generator that hits its max_tokens before `is_done` has an incomplete answer: it
fails to parse and must be treated as invalid (the pipeline falls back). To avoid that, reserve
a few tokens: when the budget left reaches ~16, append `close(state)` (a short completion, e.g.
`","confidence":0}` from inside `reason`; None if none found) and stop.

States are the library's matchers: `advance` updates the state in place and returns it, so keep
one state per request and do not reuse an old one after advancing (use `fork` to branch).
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import llguidance
import numpy as np

__all__ = ["Constraint", "State"]

# Compact JSON: no whitespace between tokens. A schema's "x-guidance" options override these.
_JSON_DEFAULTS = {"whitespace_flexible": False}


class State:
    """One request's position in the grammar. Opaque to callers."""

    __slots__ = ("matcher", "bits", "n_tokens")

    def __init__(self, matcher: llguidance.LLMatcher, words: int):
        self.matcher = matcher
        self.bits = np.empty(words, dtype=np.int32)  # llguidance's packed mask, reused per step
        self.n_tokens = 0


class _Wrapped:
    """What llguidance.TokenizerWrapper reads: bytes per id, special ids, EOS, an encoder."""

    def __init__(self, tokenizer, tokens: list[bytes], eos: int):
        self.eos_token_id = eos
        self.bos_token_id = None
        self.tokens = tokens
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes) -> list[int]:  # only used by llguidance's tokenize helpers
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


# tokenizer -> {vocab_size: LLTokenizer} and tokenizer -> {(schema json, vocab_size): Constraint}
_ll_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_constraints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _ll_tokenizer(tokenizer, vocab_size: int | None) -> tuple[llguidance.LLTokenizer, int]:
    """llguidance's view of `tokenizer` padded to `vocab_size` (default: the tokenizer's ids)."""
    by_size = _ll_tokenizers.setdefault(tokenizer, {})
    if (hit := by_size.get(vocab_size)) is not None:
        return hit
    tokens = list(tokenizer.vocab())  # id -> bytes; b"" for ids without a token
    size = max(len(tokens), tokenizer.vocab_size) if vocab_size is None else vocab_size
    if len(tokens) > size:
        msg = f"the tokenizer has {len(tokens)} ids but the model's vocab_size is {size}"
        raise ValueError(msg)
    eos = list(tokenizer.eos_token_ids)
    if not eos:
        raise ValueError("constrained decoding needs a tokenizer with an EOS token")
    tokens += [b""] * (size - len(tokens))  # embedding rows with no token: never allowed
    wrapped = llguidance.TokenizerWrapper(_Wrapped(tokenizer, tokens, eos[0]))
    ll = llguidance.LLTokenizer(wrapped, n_vocab=size, eos_token=eos)
    by_size[vocab_size] = (ll, size)
    return ll, size


class Constraint:
    """Allowed next tokens for outputs that match a grammar (one per schema and vocabulary)."""

    def __init__(
        self, ll: llguidance.LLTokenizer, grammar: str, vocab_size: int, eos_ids: tuple[int, ...]
    ):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_ids
        self._ll = ll
        self._grammar = grammar
        self._words = (vocab_size + 31) // 32
        self._template = self._new_matcher()
        # single-token spellings of what most often ends a JSON value, for close()
        closers = (ll.tokenize_bytes(text.encode()) for text in ('"', "}", "]", "0"))
        self._closers = [ids[0] for ids in closers if len(ids) == 1]

    @classmethod
    def json_schema(cls, schema: dict[str, Any], tokenizer, vocab_size: int | None = None) -> Constraint:
        """The constraint for `schema` over `tokenizer`'s vocabulary, built once and cached.

        `vocab_size` is the model's (embedding rows, which may exceed the tokenizer's ids);
        masks have that length. Defaults to the tokenizer's size. Raises ValueError for a
        schema llguidance cannot compile."""
        key = (json.dumps(schema, sort_keys=True), vocab_size)
        with _lock:
            cached = _constraints.setdefault(tokenizer, {})
            c = cached.get(key)
            if c is None:
                ll, size = _ll_tokenizer(tokenizer, vocab_size)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
                is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
                if is_error:
                    msg = f"cannot constrain to this JSON Schema: {'; '.join(messages)}"
                    raise ValueError(msg)
                c = cached[key] = cls(ll, grammar, size, tuple(tokenizer.eos_token_ids))
        return c

    def _new_matcher(self) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self._ll, self._grammar, log_level=0)
        if m.is_error():
            msg = f"cannot constrain to this grammar: {m.get_error()}"
            raise ValueError(msg)
        return m

    def start(self) -> State:
        """A fresh state at the beginning of the output."""
        return State(self._template.deep_copy(), self._words)

    def fork(self, state: State) -> State:
        """An independent copy of `state` (advancing one leaves the other as it was)."""
        s = State(state.matcher.deep_copy(), self._words)
        s.n_tokens = state.n_tokens
        return s

    def mask(self, state: State) -> np.ndarray:
        """bool[vocab_size]: the tokens allowed next. EOS only once the output is complete."""
        m = state.matcher
        m.unsafe_compute_mask_ptr(state.bits.ctypes.data, state.bits.nbytes)
        if m.is_error():
            msg = f"constraint failed: {m.get_error()}"
            raise RuntimeError(msg)
        bits = np.unpackbits(state.bits.view(np.uint8), count=self.vocab_size, bitorder="little")
        return bits.view(np.bool_)

    def advance(self, state: State, token_id: int) -> State:
        """Consume `token_id`; ValueError (state left as it was) when the grammar forbids it."""
        m = state.matcher
        token_id = int(token_id)
        if token_id in self.eos_token_ids:  # llguidance's validate_tokens never counts EOS
            ok = m.is_accepting() and not m.is_error()
        else:
            ok = 0 <= token_id < self.vocab_size and m.validate_tokens([token_id]) == 1
        if not ok:
            msg = f"token {token_id} is not allowed here ({state.n_tokens} tokens in)"
            raise ValueError(msg)
        if not m.consume_token(token_id):
            msg = f"token {token_id} was rejected: {m.get_error()}"
            raise ValueError(msg)
        state.n_tokens += 1
        return state

    def is_done(self, state: State) -> bool:
        """The output is complete and nothing but EOS may follow."""
        m = state.matcher
        return m.is_stopped() and not m.is_error()

    def close(self, state: State, max_tokens: int = 32) -> list[int] | None:
        """Tokens that finish the output as quickly as this heuristic can, for a generator that
        is about to run out of max_tokens: forced tokens first, then the first allowed of `"`,
        `}`, `]`, `0`, then the lowest allowed id. Works on a copy (`state` is unchanged) and
        leaves EOS to the caller. None when no completion was found within `max_tokens`: the
        answer is then incomplete and invalid."""
        m = state.matcher.deep_copy()
        out: list[int] = []
        eos = set(self.eos_token_ids)
        while len(out) < max_tokens:
            if m.is_error():
                return None
            if m.is_accepting():
                return out
            ff = m.compute_ff_tokens()
            if ff:
                ff = ff[: max_tokens - len(out)]
                if not m.consume_tokens(ff):
                    return None
                out += ff
                continue
            for t in self._closers:
                if m.validate_tokens([t]) == 1:
                    break
            else:
                bits = np.empty(self._words, dtype=np.int32)
                m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
                allowed = np.unpackbits(bits.view(np.uint8), count=self.vocab_size, bitorder="little")
                ids = [int(i) for i in np.flatnonzero(allowed) if int(i) not in eos]
                if not ids:
                    return None
                t = ids[0]
            if not m.consume_token(t):
                return None
            out.append(t)
        return out if m.is_accepting() and not m.is_error() else None

    def is_complete(self, state: State) -> bool:
        """The output so far is a complete match (EOS is allowed), even if it could go on."""
        m = state.matcher
        return m.is_accepting() and not m.is_error()

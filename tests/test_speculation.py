"""Speculative decoding on the `tiny` preset: drafts (prompt lookup, grammar fast-forward), the
adaptive lookahead, and outputs equal to plain decoding (speculate=None) token for token.

Every Generator here uses the same small buckets, so the jitted functions (shared by the whole
process) compile once for the file.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from ponder.inference.jax import checkpoint, step
from ponder.inference.jax.constrain import Constraint
from ponder.inference.jax.generate import Generator, GenRequest, Speculation
from ponder.inference.jax.rows import Row
from ponder.inference.jax.speculate import (
    Draft,
    draft,
    lookahead,
    lookup,
    observe,
    plan,
    verify_len,
)
from ponder.inference.jax.tokenizer import Tokenizer
from ponder.types import answer_schema

BUCKETS = {"max_batch": 4, "batch_buckets": (1, 4), "seq_buckets": (128,), "chunk_buckets": (16, 64)}
SPEC = Speculation(k_max=7, spec_tokens=32, buckets=(2, 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint.init_model(path, "tiny", seed=0)
    cfg, params = checkpoint.load(path)
    return cfg, params, Tokenizer.from_dir(path)


def make(tiny, speculate=SPEC, **kw) -> Generator:
    cfg, params, tk = tiny
    kw = {**BUCKETS, "device_bytes": 4 << 20, "host_bytes": 4 << 20, **kw}
    return Generator(cfg, params, n_vocab=tk.vocab_size, eos_ids=(), speculate=speculate, **kw)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def repeating(n: int, seed: int) -> list[int]:
    """A prompt that repeats a 13-token phrase: the lookup finds runs to propose."""
    return (ids(13, seed) * (n // 13 + 1))[:n]


def same(a, b) -> None:
    """Results a (speculative) and b (plain) are the same answer."""
    assert (a.tokens, a.finish_reason, a.error) == (b.tokens, b.finish_reason, b.error)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert len(a.samples) == len(b.samples)
    for x, y in zip(a.samples, b.samples):
        same(x, y)


def both(tiny, reqs, spec=SPEC):
    """(speculative results, plain results, the speculative generator) for fresh copies of reqs."""
    gen = make(tiny, spec)
    fast = gen.generate(reqs())
    plain = make(tiny, None).generate(reqs())
    return fast, plain, gen


# -- drafting ------------------------------------------------------------------------------------


def test_lookup_takes_the_most_recent_longest_match():
    ctx = np.asarray([5, 6, 7, 8, 5, 6, 9, 1, 5, 6])
    assert lookup(ctx, 3) == 6  # (5, 6) last seen at 4..5, followed by 9 at 6; (1, 5, 6) unseen
    assert lookup(np.asarray([3, 1, 2, 7, 1, 2, 4, 3, 1, 2]), 3) == 3  # (3, 1, 2) beats a later (1, 2)
    assert lookup(np.asarray([4, 5, 6]), 3) is None
    assert lookup(np.asarray([7]), 3) is None


def test_drafts_never_propose_image_stand_ins():
    spec = Speculation(k_max=4)
    row = Row("t", "k", GenRequest(None, [5, 6, -9, -8, 7, 5, 6], 20))
    assert draft(spec, row, 4, 4, frozenset()).tokens == []  # (5, 6) was followed by a stand-in
    row = Row("t", "k", GenRequest(None, [5, 6, 7, 8, -9, 5, 6], 20))
    assert draft(spec, row, 4, 4, frozenset()).tokens == [7, 8]  # the run stops at the stand-in
    assert draft(spec, row, 4, 1, frozenset()).tokens == [7]  # k_lookup caps it
    assert draft(spec, row, 4, 4, frozenset({8})).tokens == [7]  # the draft stops before EOS: the model picks it


def test_grammar_fast_forward_drafts_forced_tokens_with_masks(tiny):
    cfg, _, tk = tiny
    c = Constraint.json_schema(answer_schema(("none", "alert")), tk, vocab_size=cfg.vocab_size)
    row = Row("t", "k", GenRequest(None, ids(10, 1), 40, constraint=c))
    row.state = c.start()
    d = draft(Speculation(k_max=8), row, 8, 0, frozenset())
    assert d.tokens and all(d.forced)  # `{"action":"` is forced; no lookup token was allowed
    assert tk.decode(d.tokens) == '{"action":"'[: len(tk.decode(d.tokens))]
    assert len(d.masks) == len(d.tokens) + 1
    assert row.state.n_tokens == 0  # drafting works on a fork
    s = c.start()
    for t, m in zip(d.tokens, d.masks):
        np.testing.assert_array_equal(m, c.mask(s))
        c.advance(s, t)
    np.testing.assert_array_equal(d.masks[-1], c.mask(s))


def test_lookahead_falls_with_the_acceptance_rate_and_probes():
    spec = Speculation(k_max=7, smoothing=0.3, min_gain=0.3, probe_every=4)
    assert [lookahead(spec, r) for r in (1.0, 0.9, 0.7, 0.5, 0.29)] == [7, 7, 3, 1, 0]
    assert lookahead(Speculation(k_max=4, adaptive=False), 0.0) == 4
    capped = Speculation(k_max=7, spec_tokens=32)
    assert [capped.max_len(B) for B in (1, 2, 4, 8, 16, 32, 64)] == [8, 8, 8, 4, 2, 1, 1]
    row = Row("t", "k", GenRequest(None, [1], 9))
    ks = []
    for _ in range(10):
        ks.append(plan(spec, row))
        observe(spec, row, ks[-1], 0)  # every draft rejected
    assert ks == [7, 3, 1, 1, 0, 0, 0, 1, 0, 0]  # a probe after probe_every idle steps
    assert plan(spec, Row("t", "k", GenRequest(None, [1], 9, temperature=0.5))) == 0  # sampled
    with pytest.raises(ValueError, match="k_max >= 1"):
        Speculation(k_max=0)


def test_batch_load_picks_the_verify_length():
    """Expected tokens per cost: extra tokens are nearly free at batch 1 and not at batch 16."""
    spec = Speculation(k_max=7, double_at=64)
    guessed, forced = Draft([1] * 7, [False] * 7, None), Draft([1] * 7, [True] * 7, None)
    assert verify_len(spec, 1, [(guessed, 0.9)]) == 8
    assert verify_len(spec, 1, [(guessed.cut(3), 0.9)]) == 4
    assert verify_len(spec, 16, [(guessed, 0.9)] * 16) == 8  # 5.7 tokens for 2.75 steps' cost
    assert verify_len(spec, 16, [(guessed, 0.6)] * 16) == 2  # 1.6 for 1.25 beats 2.2 for 1.75
    assert verify_len(spec, 16, [(guessed, 0.2)] * 16) == 1  # a plain step
    assert verify_len(spec, 16, [(forced, 0.0)] * 16) == 8  # forced tokens are sure
    assert verify_len(spec, 4, [(Draft([], [], None), 1.0)] * 4) == 1
    fixed = Speculation(k_max=4, adaptive=False, buckets=(5,))
    assert verify_len(fixed, 16, [(guessed.cut(2), 0.0)]) == 5


# -- the same output as plain decoding -----------------------------------------------------------


def test_greedy_repetition_accepts_drafts_and_matches_plain(tiny):
    fast, plain, gen = both(tiny, lambda: [GenRequest(None, repeating(60, 1), 40)])
    same(fast[0], plain[0])
    stats = gen.spec_stats
    assert stats.accepted > 0 and stats.steps > 0
    assert stats.tokens > stats.row_steps  # more than one token per verify step


def test_a_batch_of_rows_of_different_lengths_matches_plain(tiny):
    def reqs():
        return [GenRequest(None, repeating(n, s), m) for n, s, m in
                [(5, 1, 30), (70, 2, 12), (100, 3, 25), (40, 4, 1)]]

    fast, plain, gen = both(tiny, reqs)
    for a, b in zip(fast, plain):
        same(a, b)
    assert gen.spec_stats.accepted > 0


def test_sampled_rows_and_n_samples_are_unchanged(tiny):
    def reqs():
        return [GenRequest(None, repeating(50, 5), 20, temperature=0.8, seed=11, n=2),
                GenRequest(None, repeating(30, 6), 24),
                GenRequest(None, repeating(20, 7), 16, temperature=1.0, top_p=0.9, seed=3)]

    fast, plain, gen = both(tiny, reqs)
    for a, b in zip(fast, plain):
        same(a, b)
    assert len(fast[0].samples) == 2 and fast[0].samples[0].tokens != fast[0].samples[1].tokens
    assert gen.spec_stats.steps > 0  # the greedy row speculated beside the sampled ones


def test_json_schema_rows_match_plain_and_fast_forward(tiny):
    cfg, _, tk = tiny
    schema = answer_schema(("none", "alert", "inspect"))
    c = Constraint.json_schema(schema, tk, vocab_size=cfg.vocab_size)
    text = 'pump-7 vibration=9.1 {"action":"inspect","severity":"high","reason":"pump-7 vibration"}'
    prompt = tk.encode(tk.apply_chat_template([{"role": "user", "content": text}]))

    def reqs():
        return [GenRequest(None, prompt, 48, constraint=c),
                GenRequest(None, prompt[3:], 30, constraint=c),
                GenRequest(None, prompt, 48, temperature=1.0, seed=4, constraint=c)]

    fast, plain, gen = both(tiny, reqs)
    for a, b in zip(fast, plain):
        same(a, b)
        jsonschema.validate(json.loads(tk.decode(a.tokens)), schema)
    assert gen.spec_stats.forced > 0 and gen.spec_stats.forced_accepted > 0


def test_stop_and_max_tokens_mid_draft_match_plain(tiny):
    def reqs(seen):
        def stopper(i):
            def f(t):
                seen[i].append(t)
                return len(seen[i]) == 11  # a stop string completes at the 11th token
            return f
        return [GenRequest(None, repeating(40, 8), 30, on_token=stopper(0)),
                GenRequest(None, repeating(40, 9), 10, on_token=stopper(1)),
                GenRequest(None, repeating(40, 10), 13)]

    seen_fast, seen_plain = [[], []], [[], []]
    gen = make(tiny)
    fast = gen.generate(reqs(seen_fast))
    plain = make(tiny, None).generate(reqs(seen_plain))
    for a, b in zip(fast, plain):
        same(a, b)
    assert [len(r.tokens) for r in fast] == [11, 10, 13]
    assert [r.finish_reason for r in fast] == ["stop", "length", "length"]
    assert seen_fast == seen_plain  # the rest of a draft is never shown to the caller
    assert gen.spec_stats.accepted > 0


def test_a_batch_too_large_for_the_budget_decodes_plainly(tiny):
    """spec_tokens 4 allows no verify step at batch bucket 4: every step is the plain one."""
    spec = Speculation(k_max=7, spec_tokens=4, buckets=(2, 8))
    fast, plain, gen = both(tiny, lambda: [GenRequest(None, repeating(40, s), 12) for s in (15, 16)], spec)
    for a, b in zip(fast, plain):
        same(a, b)
    assert gen.spec_stats.steps == 0 and gen.spec_stats.plain == 12  # a step per token


def test_sessions_record_only_valid_kv(tiny):
    """A session written back after speculative steps holds K/V that a later request reuses to
    the same answer as a fresh prefill."""
    gen = make(tiny)
    p = repeating(50, 12)
    first = gen.generate([GenRequest("s", p, 20)])[0]
    assert gen.pool.tokens("s") == p + first.tokens[:-1]
    q = p + first.tokens + repeating(20, 13)
    again = gen.generate([GenRequest("s", q, 20)])[0]
    fresh = make(tiny, None).generate([GenRequest(None, q, 20)])[0]
    assert again.cached_tokens == len(p) + len(first.tokens) - 1
    same(again, fresh)


def test_rejected_drafts_lower_the_lookahead(tiny, monkeypatch):
    """Drafts that are always wrong: the row's k falls to 0 (one-token probes after that) and
    the output is still plain decoding's."""
    prompt = repeating(40, 14)
    plain = make(tiny, None).generate([GenRequest(None, prompt, 40)])[0]
    real, asked = step.draft, []

    def wrong(spec, row, limit, k_lookup, eos_ids):
        asked.append(k_lookup)
        d = real(spec, row, limit, k_lookup, eos_ids)
        n = len(row.out)
        d.tokens = [(plain.tokens[n + i] + 1) % 400 if n + i < len(plain.tokens) else 3
                    for i in range(len(d.tokens))]
        return d

    monkeypatch.setattr(step, "draft", wrong)
    spec = Speculation(k_max=7, spec_tokens=32, buckets=(2, 8), probe_every=8)
    gen = make(tiny, spec)
    same(gen.generate([GenRequest(None, prompt, 40)])[0], plain)
    assert asked[:4] == [7, 3, 1, 1] and set(asked[4:]) == {1}  # then only probes
    stats = gen.spec_stats
    assert stats.accepted == 0 and stats.drafted == 4 + len(asked[4:]) and stats.plain > 20


def test_a_warmed_generator_never_traces_again(tiny):
    cfg, _, tk = tiny
    c = Constraint.json_schema(answer_schema(("none", "alert")), tk, vocab_size=cfg.vocab_size)
    gen = make(tiny)
    gen.warmup(batch_sizes=(1, 4), seq_lens=(128,), sampling=(False, True), masked=(False, True),
               page_moves=False)
    before = gen.compiles
    gen.generate([GenRequest(None, repeating(n, n), 20) for n in (5, 90)])
    gen.generate([GenRequest(None, repeating(90, 1), 30),
                  GenRequest(None, repeating(20, 2), 20, constraint=c),
                  GenRequest(None, repeating(20, 3), 20, temperature=0.7, seed=1, constraint=c)])
    gen.generate([GenRequest(None, repeating(60, 4), 20, temperature=0.5, seed=2, n=2),
                  GenRequest(None, repeating(60, 5), 30)])
    assert gen.spec_stats.steps > 0
    assert gen.compiles == before

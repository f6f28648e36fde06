"""Constrained decoding to the decision JSON Schema, over a random tiny checkpoint's BPE vocabulary.

Random sampling under the mask (uniform over allowed tokens, or from a random bigram "model")
must always end in JSON that decodes into `answer_type(actions)`.
"""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest

from ponder.inference.jax.checkpoint import init_model
from ponder.inference.jax.constrain import Constraint
from ponder.inference.jax.tokenizer import Tokenizer
from ponder.types import answer_schema, answer_type

ACTIONS = ("none", "alert", "shutdown")
PAD = 40  # extra embedding rows with no token, as real checkpoints have
CAP = 1500  # tokens before a sample is closed with Constraint.close


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    cfg = init_model(path, "tiny", seed=0)
    tok = Tokenizer.from_dir(path)
    vocab_size = cfg.vocab_size + PAD
    c = Constraint.json_schema(answer_schema(ACTIONS), tok, vocab_size=vocab_size)
    return tok, c, vocab_size


def _eos(tok, mask: np.ndarray) -> np.ndarray:
    return mask[list(tok.eos_token_ids)]


def _decode(tok, ids: list[int]) -> str:
    vocab = tok.vocab()
    raw = b"".join(vocab[i] for i in ids)
    text = tok.decode(ids)
    assert raw.decode("utf-8") == text  # the bytes the constraint saw are the text
    return text


def _check(text: str, actions=ACTIONS):
    ans = msgspec.json.decode(text, type=answer_type(actions))
    assert ans.action in actions
    assert 0.0 <= ans.confidence <= 1.0
    assert len(ans.reason) <= 400
    assert text.startswith(f'{{"action":"{ans.action}","severity":"{ans.severity}","reason":"')  # compact
    return ans


def _generate(tok, c: Constraint, rng: np.random.Generator, logits_table: np.ndarray | None):
    """Sample under the mask until done (checking the mask's invariants every step)."""
    eos = set(tok.eos_token_ids)
    s = c.start()
    out: list[int] = []
    prev = 0
    while len(out) < CAP:
        m = c.mask(s)
        assert m.shape == (c.vocab_size,) and m.dtype == np.bool_
        assert not m[-PAD:].any() and not m[1]  # padding rows and <|im_start|> never
        done = c.is_complete(s)
        assert _eos(tok, m).all() == done and _eos(tok, m).any() == done  # EOS iff complete
        if c.is_done(s):
            assert set(np.flatnonzero(m)) == eos
            return out, s
        allowed = np.flatnonzero(m)
        if logits_table is None:
            t = int(rng.choice(allowed))
        else:
            logits = logits_table[prev][allowed]
            p = np.exp(logits - logits.max())
            t = int(rng.choice(allowed, p=p / p.sum()))
        if t in eos:
            return out, s
        if rng.random() < 0.05:  # a disallowed token raises and leaves the state as it was
            bad = np.flatnonzero(~m)
            with pytest.raises(ValueError):
                c.advance(s, int(rng.choice(bad)))
            assert (c.mask(s) == m).all()
        c.advance(s, t)
        out.append(t)
        prev = t
    tail = c.close(s)
    assert tail is not None
    for t in tail:
        c.advance(s, t)
    assert c.is_complete(s)
    return out + tail, s


@pytest.mark.parametrize("how", ["uniform", "random_model"])
def test_random_sampling_always_validates(setup, how):
    tok, c, vocab_size = setup
    seen_actions = set()
    for seed in range(25):
        rng = np.random.default_rng(seed)
        table = None
        if how == "random_model":  # random bigram logits: a random-weight model, cheaply
            table = rng.standard_normal((vocab_size, vocab_size)).astype(np.float32) * 3
        ids, s = _generate(tok, c, rng, table)
        assert c.is_complete(s)
        ans = _check(_decode(tok, ids))
        seen_actions.add(ans.action)
    assert len(seen_actions) >= 2  # not stuck on one branch


def test_start_mask_and_eos(setup):
    tok, c, vocab_size = setup
    s = c.start()
    m = c.mask(s)
    assert m.shape == (vocab_size,) and m.dtype == np.bool_
    assert m.any() and not _eos(tok, m).any()
    assert not c.is_done(s) and not c.is_complete(s)
    vocab = tok.vocab()
    assert all(vocab[i].startswith(b"{") for i in np.flatnonzero(m))


def test_disallowed_tokens_raise(setup):
    tok, c, vocab_size = setup
    s = c.start()
    before = c.mask(s)
    for bad in [tok.token_to_id("x"), tok.eos_token_ids[0], 1, vocab_size - 1, vocab_size, -1]:
        with pytest.raises(ValueError):
            c.advance(s, bad)
    assert (c.mask(s) == before).all()
    c.advance(s, int(np.flatnonzero(before)[0]))  # still usable


def test_fixed_text_and_fork(setup):
    tok, c, _ = setup
    text = (
        '{"action":"shutdown","severity":"high",'
        '"reason":"pump-7 vibration 4.1σ above baseline","confidence":0.82}'
    )
    ids = tok.encode(text)
    s = c.start()
    for i, t in enumerate(ids):
        if i == 5:
            branch = c.fork(s)
        c.advance(s, t)
    assert c.is_done(s) and _check(_decode(tok, ids)).action == "shutdown"
    assert not c.is_done(branch)  # the fork did not move
    for t in ids[5:]:
        c.advance(branch, t)
    assert c.is_done(branch)
    c.advance(branch, tok.eos_token_ids[0])  # EOS is accepted once done
    assert c.is_done(branch)

    wrongs = (text.replace("shutdown", "reboot"), text.replace("0.82", "1.5"), text.replace(":", ": ", 1))
    for wrong in wrongs:
        s = c.start()
        with pytest.raises(ValueError):
            for t in tok.encode(wrong):
                c.advance(s, t)


def test_close_from_anywhere(setup):
    tok, c, _ = setup
    for seed in range(30):
        rng = np.random.default_rng(1000 + seed)
        s = c.start()
        ids: list[int] = []
        for _ in range(int(rng.integers(0, 200))):
            m = c.mask(s)
            m[list(tok.eos_token_ids)] = False
            if not m.any():
                break
            t = int(rng.choice(np.flatnonzero(m)))
            c.advance(s, t)
            ids.append(t)
        snapshot = c.mask(s)
        tail = c.close(s)
        assert (c.mask(s) == snapshot).all()  # close works on a copy
        assert tail is not None and len(tail) <= 32
        for t in tail:
            c.advance(s, t)
        assert c.is_complete(s)
        _check(_decode(tok, ids + tail))


def test_cached_per_schema_and_one_action(setup):
    tok, c, vocab_size = setup
    assert Constraint.json_schema(answer_schema(ACTIONS), tok, vocab_size=vocab_size) is c
    one = Constraint.json_schema(answer_schema(("observe",)), tok)
    assert one is not c and one.vocab_size == tok.vocab_size
    s = one.start()
    ids = tok.encode('{"action":"observe","severity":"info","reason":"","confidence":1}')
    for t in ids:
        one.advance(s, t)
    assert one.is_done(s)
    _check(_decode(tok, ids), ("observe",))


def test_mask_timing(setup, capsys):
    tok, c, _ = setup
    rng = np.random.default_rng(7)
    times = []
    for _ in range(5):
        s = c.start()
        while not c.is_done(s):
            t0 = time.perf_counter()
            m = c.mask(s)
            times.append(time.perf_counter() - t0)
            m[list(tok.eos_token_ids)] = False
            if not m.any() or len(times) > 3000:
                break
            c.advance(s, int(rng.choice(np.flatnonzero(m))))
    us = np.array(times) * 1e6
    with capsys.disabled():
        print(f"\nmask: {len(us)} steps, median {np.median(us):.0f} µs, p99 {np.percentile(us, 99):.0f} µs")
    assert np.median(us) < 5000  # loose: a decode step is milliseconds

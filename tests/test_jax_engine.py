"""The JAX generator on the `tiny` preset: sessions (cached-token counts, incremental == full
prefill, divergence, LRU device -> host -> dropped), batching, the compile counter, sampling and
constrained decoding.

Every Generator here uses the same small buckets, so the jitted functions (shared by the whole
process) compile once for the file.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from ponder.inference.jax import checkpoint, model
from ponder.inference.jax.generate import Generator, GenRequest, bucket, length_buckets
from ponder.inference.jax.sampling import apply_masks, sample, top_p_filter
from ponder.inference.jax.sessions import SessionPool
from ponder.inference.jax.tokenizer import Tokenizer
from ponder.types import answer_schema

BUCKETS = {"max_batch": 4, "batch_buckets": (1, 4), "seq_buckets": (128, 256), "chunk_buckets": (16, 64)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint.init_model(path, "tiny", seed=0)
    cfg, params = checkpoint.load(path)
    return cfg, params, Tokenizer.from_dir(path)


def make(tiny, **kw) -> Generator:
    cfg, params, tk = tiny
    kw = {**BUCKETS, "device_bytes": 4 << 20, "host_bytes": 4 << 20, **kw}
    return Generator(cfg, params, n_vocab=tk.vocab_size, eos_ids=(), **kw)


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 400, n).tolist()


def one(gen: Generator, session, prompt, max_tokens=8, **kw):
    return gen.generate([GenRequest(session, prompt, max_tokens, **kw)])[0]


def reference_greedy(tiny, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with model.forward directly: whole prompt, then one token at a time."""
    cfg, params, tk = tiny
    fwd = jax.jit(model.forward, static_argnums=1)
    k, v = model.init_cache(cfg, 1, 256)
    logits, k, v = fwd(params, cfg, jnp.asarray([prompt], jnp.int32), jnp.zeros(1, jnp.int32), k, v)
    out = []
    for i in range(n):
        tok = int(jnp.argmax(logits[0, -1, : tk.vocab_size]))
        out.append(tok)
        start = jnp.full(1, len(prompt) + i, jnp.int32)
        logits, k, v = fwd(params, cfg, jnp.asarray([[tok]], jnp.int32), start, k, v)
    return out


# -- buckets and samplers ------------------------------------------------------------------------


def test_buckets():
    assert length_buckets(1024) == (64, 128, 192, 256, 384, 512, 768, 1024)
    assert length_buckets(1000)[-1] == 960
    assert bucket(65, (64, 128)) == 128
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket(129, (64, 128))


def test_samplers_mask_and_filter():
    logits = jnp.asarray([[0.0, 1.0, 5.0, 9.0], [3.0, 2.0, 1.0, 0.0]])
    masked = apply_masks(logits, n_vocab=3, mask=jnp.asarray([[True] * 4, [False, True, True, True]]))
    assert np.asarray(masked)[0, 3] < -1e30 and np.asarray(masked)[1, 0] < -1e30
    kept = np.asarray(top_p_filter(jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]])), jnp.asarray([0.7])))
    assert (kept > -1e30).tolist() == [[True, True, False, False]]
    seeds, pos = jnp.asarray([1, 1], jnp.uint32), jnp.asarray([4, 4], jnp.int32)
    temps, top_p = jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 1e-6])
    tok, lp = sample(logits, seeds, pos, temps, top_p, None, n_vocab=3, greedy_only=False)
    assert tok.tolist() == [2, 0]  # id 3 is past the vocabulary; top_p ~0 is greedy
    assert np.all(np.asarray(lp) <= 0)


# -- sessions ------------------------------------------------------------------------------------


def test_incremental_prefill_equals_full_prefill(tiny):
    gen = make(tiny)
    p1 = ids(90, 1)
    first = one(gen, "s", p1)
    assert (first.prompt_tokens, first.cached_tokens, first.finish_reason) == (90, 0, "length")
    assert gen.pool.tokens("s") == p1 + first.tokens[:-1]

    extra = ids(60, 2)
    extra[0] = (first.tokens[0] + 1) % 400 + 3  # differs from the cached continuation
    inc = one(gen, "s", p1 + extra)
    full = one(gen, "fresh", p1 + extra)
    assert (inc.prompt_tokens, inc.cached_tokens) == (150, 90)
    assert (full.prompt_tokens, full.cached_tokens) == (150, 0)
    assert inc.tokens == full.tokens == reference_greedy(tiny, p1 + extra, 8)
    np.testing.assert_allclose(inc.logprobs, full.logprobs, atol=1e-4)

    again = one(gen, "s", p1 + extra)  # the same prompt again: all but its last token cached
    assert again.cached_tokens == 149 and again.tokens == full.tokens


def test_divergence_recomputes_from_the_first_different_token(tiny):
    gen = make(tiny)
    p = ids(100, 3)
    one(gen, "s", p)
    q = p[:40] + ids(50, 4)
    q[40] = (p[40] + 1) % 400 + 3
    diverged = one(gen, "s", q)
    fresh = one(gen, "t", q)
    assert diverged.cached_tokens == 40
    assert diverged.tokens == fresh.tokens
    np.testing.assert_allclose(diverged.logprobs, fresh.logprobs, atol=1e-4)


def test_lru_device_then_host_then_dropped(tiny):
    cfg = tiny[0]
    page = SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0).page_bytes
    # 4 pages on device (two 2-page sessions), host memory for two spilled sessions, not three;
    # exact host copies (host_kv="none"), so the restored session's answer is the same to the bit
    gen = make(tiny, device_bytes=4 * page, host_bytes=5 * page, host_kv="none")
    prompts = {key: ids(70, 10 + i) for i, key in enumerate("abcde")}
    outs = {}
    for key in "abcde":
        outs[key] = one(gen, key, prompts[key], max_tokens=40)
        assert outs[key].cached_tokens == 0
    where = {key: gen.pool.where(key) for key in "abcde"}
    assert where == {"a": None, "b": "host", "c": "host", "d": "device", "e": "device"}
    assert gen.pool.stats["spilled"] == 3 and gen.pool.stats["dropped"] == 1

    # back from host; d spills into the room b's host copy leaves, so nothing more is dropped
    b = one(gen, "b", prompts["b"], max_tokens=40)
    assert b.cached_tokens == 69 and b.tokens == outs["b"].tokens
    where = {key: gen.pool.where(key) for key in "abcde"}
    assert where == {"a": None, "b": "device", "c": "host", "d": "host", "e": "device"}
    assert gen.pool.keys() == ["c", "d", "e", "b"] and gen.pool.stats["dropped"] == 1

    a = one(gen, "a", prompts["a"], max_tokens=40)  # dropped: recomputed, same answer
    assert a.cached_tokens == 0 and a.tokens == outs["a"].tokens
    assert gen.pool.stats["restored"] == 1


def test_session_larger_than_the_pool_is_an_error(tiny):
    cfg = tiny[0]
    page = SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0).page_bytes
    gen = make(tiny, device_bytes=2 * page)
    small, big = gen.generate([GenRequest("x", ids(20, 1), 4), GenRequest("y", ids(200, 2), 8)])
    assert small.error is None and len(small.tokens) == 4
    assert big.finish_reason == "error" and "needs 4 pages" in big.error
    assert one(gen, "z", ids(300, 3)).error.startswith("request 0")  # past the largest bucket


# -- batching and compiles -------------------------------------------------------------------------


def test_batched_equals_unbatched_and_nothing_recompiles(tiny):
    gen = make(tiny)
    gen.warmup(batch_sizes=(1, 4), seq_lens=(128, 256), sampling=(False, True))
    before = gen.compiles
    reqs = [GenRequest(f"k{i}", ids(n, 20 + i), m) for i, (n, m) in
            enumerate([(5, 8), (63, 3), (130, 20), (90, 12)])]
    batched = gen.generate(reqs)
    alone = [make(tiny).generate([GenRequest("solo", r.prompt, r.max_tokens)])[0] for r in reqs]
    for b, a, r in zip(batched, alone, reqs):
        assert b.tokens == a.tokens and len(b.tokens) == r.max_tokens
        assert (b.prompt_tokens, b.cached_tokens) == (len(r.prompt), 0)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)

    # varied lengths and batch sizes inside the warmed buckets, sampling included
    for n, sizes in enumerate([(1,), (2, 3), (17, 70, 100), (33, 1, 200, 7)]):
        gen.generate([GenRequest(f"v{n}-{j}", ids(size, n * 10 + j), 9, temperature=0.7 * (j % 2),
                                 seed=j) for j, size in enumerate(sizes)])
    # the same key twice in one call runs in two rounds, the second reusing the first's cache
    twice = gen.generate([GenRequest("dup", ids(50, 5), 4), GenRequest("dup", ids(50, 5) + [7], 4)])
    assert twice[1].cached_tokens == 50
    assert gen.compiles == before


# -- continuous batching --------------------------------------------------------------------------


def _serve(gen: Generator, arrivals):
    """gen.serve where `arrivals(n)` returns the (tag, request) pairs that arrive once n tokens
    have been chosen in all -> (finish order [(tag, result, tokens chosen by then)], admissions)."""
    chosen, order, admits = [0], [], []

    def counted(req: GenRequest) -> GenRequest:
        req.on_token = lambda t: chosen.__setitem__(0, chosen[0] + 1)
        return req

    def fetch():
        return [(tag, counted(r)) for tag, r in arrivals(chosen[0])]

    gen.serve(fetch, lambda tag, res: order.append((tag, res, chosen[0])), admits.append)
    return order, admits


def test_requests_join_the_running_batch_and_finish_first(tiny):
    gen = make(tiny)
    gen.warmup(batch_sizes=(1, 4), seq_lens=(128,))
    before = gen.compiles
    specs = {"A": (ids(20, 31), 60, 0), "B": (ids(30, 32), 6, 5), "C": (ids(9, 34), 9, 5)}
    alone = {tag: one(gen, f"solo-{tag}", p, m) for tag, (p, m, _) in specs.items()}
    sent = set()

    def arrivals(n):
        due = [(tag, GenRequest(tag, p, m)) for tag, (p, m, at) in specs.items() if n >= at and tag not in sent]
        sent.update(tag for tag, _ in due)
        return due

    order, admits = _serve(gen, arrivals)
    assert [tag for tag, _, _ in order] == ["B", "C", "A"]  # static batching would finish A first
    assert admits == [1, 2]  # B and C joined together, into two of A's batch's free slots
    assert order[1][2] < 60  # B and C were answered while A still had tokens to go
    res = {tag: r for tag, r, _ in order}
    for tag, r in res.items():
        assert r.tokens == alone[tag].tokens, tag
        np.testing.assert_allclose(r.logprobs, alone[tag].logprobs, atol=1e-4)
        assert (r.prompt_tokens, r.cached_tokens) == (len(specs[tag][0]), 0)
    assert gen.compiles == before


def test_a_long_prompt_joins_a_chunk_per_decode_step(tiny, monkeypatch):
    """A 200-token prompt joining a decoding row is prefilled in 64-token chunks with a decode
    step of the running row between each, not all at once while it waits; both rows equal their
    runs alone."""
    from ponder.inference.jax import step as G

    gen = make(tiny)
    run_p, long_p = ids(10, 90), ids(200, 91)
    alone = [one(gen, "solo-run", run_p, 40), one(gen, "solo-long", long_p, 5)]
    calls = []
    for name, tag in (("prefill_chunk", "P"), ("decode_step", "D")):
        orig = getattr(G, name)
        monkeypatch.setattr(G, name, lambda *a, _o=orig, _t=tag, **k: (calls.append(_t), _o(*a, **k))[1])
    sent = []

    def arrivals(n):
        due = []
        if not sent:
            due = [("run", GenRequest("run", run_p, 40))]
        elif len(sent) == 1 and n >= 3:
            due = [("long", GenRequest("long", long_p, 5))]
        sent.extend(due)
        return due

    order, _ = _serve(gen, arrivals)
    res = {tag: r for tag, r, _ in order}
    assert res["run"].tokens == alone[0].tokens and res["long"].tokens == alone[1].tokens
    np.testing.assert_allclose(res["run"].logprobs, alone[0].logprobs, atol=1e-4)
    joined = "".join(calls)[1:]  # after the first row's own prefill
    first, last = joined.index("P"), joined.rindex("P")
    assert joined[first : last + 1] == "PDPDPDP"  # 4 chunks of the joining prompt, interleaved


def test_a_session_waits_for_its_running_request_then_reuses_its_cache(tiny):
    gen = make(tiny)
    p = ids(40, 33)
    first = one(gen, "ref", p, 10).tokens
    follow = p + first + [7]
    sent = []

    def arrivals(n):
        due = []
        if not sent:
            due = [("one", GenRequest("s", p, 10))]
        elif len(sent) == 1 and n >= 3:  # the same session, while its first request decodes
            due = [("two", GenRequest("s", follow, 4))]
        sent.extend(due)
        return due

    order, admits = _serve(gen, arrivals)
    assert [tag for tag, _, _ in order] == ["one", "two"] and admits == [1, 1]
    one_res, two_res = order[0][1], order[1][1]
    assert one_res.tokens == first
    # every token of the first answer but its last was fed back, so all of that is cached
    assert two_res.cached_tokens == len(p) + len(first) - 1
    assert two_res.tokens == one(gen, "cold", follow, 4).tokens


def test_rows_carry_over_when_slots_free_and_the_batch_shrinks(tiny):
    """Five requests, max_batch 4: the fifth joins when the first finishes; once one row is
    left the batch shrinks to B=1. Every row, sampled or greedy, equals its run alone."""
    gen = make(tiny)
    specs = [(ids(10, 40), 2, 0.0), (ids(25, 41), 3, 0.9), (ids(50, 42), 40, 0.8),
             (ids(7, 43), 4, 0.0), (ids(33, 44), 5, 0.0)]
    reqs = [GenRequest(f"r{i}", p, n, temperature=t, seed=100 + i) for i, (p, n, t) in enumerate(specs)]
    alone = [one(gen, f"alone-{i}", r.prompt, r.max_tokens, temperature=r.temperature, seed=r.seed)
             for i, r in enumerate(reqs)]
    shapes = []
    gather = gen.pool.gather
    gen.pool.gather = lambda table: (shapes.append(table.shape), gather(table))[1]
    sent = []

    def arrivals(n):
        due = [] if sent else list(enumerate(reqs))
        sent.extend(due)
        return due

    order, admits = _serve(gen, arrivals)
    assert admits == [4, 1]
    assert [tag for tag, _, _ in order] == [0, 1, 3, 4, 2]
    assert shapes == [(4, 2), (1, 2), (1, 2)]  # the first four, r4 (into r0's slot), shrink to r2
    for tag, res, _ in order:
        assert res.tokens == alone[tag].tokens, tag
        np.testing.assert_allclose(res.logprobs, alone[tag].logprobs, atol=1e-4)


def test_a_failing_callback_ends_only_its_own_row(tiny):
    """With one continuous batch for everybody, a caller's broken on_token must not fail the
    other rows decoding beside it."""
    gen = make(tiny)

    def boom(t):
        raise RuntimeError("client callback broke")

    prompts = {"x": ids(12, 50), "y": ids(12, 51), "z": ids(20, 52)}
    alone = {k: one(gen, f"solo-{k}", p, 6) for k, p in prompts.items()}
    bad, y, z = gen.generate([GenRequest("x", prompts["x"], 6, on_token=boom),
                              GenRequest("y", prompts["y"], 6), GenRequest("z", prompts["z"], 6)])
    assert bad.finish_reason == "error" and bad.error == "on_token: RuntimeError: client callback broke"
    assert bad.tokens == alone["x"].tokens[:1]  # the token its callback choked on
    assert y.error is None and z.error is None
    assert (y.tokens, z.tokens) == (alone["y"].tokens, alone["z"].tokens)
    assert gen.pool.where("y") == gen.pool.where("z") == "device"


def test_a_request_larger_than_the_pool_is_refused_at_once(tiny):
    """It is answered before the rows already queued run, not after everything else."""
    cfg = tiny[0]
    page = SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0).page_bytes
    gen = make(tiny, device_bytes=3 * page)
    order = []
    reqs = [GenRequest("a", ids(20, 60), 30), GenRequest("big", ids(200, 61), 8),
            GenRequest("b", ids(20, 62), 30)]
    todo = [list(enumerate(reqs))]
    gen.serve(lambda: todo.pop() if todo else [], lambda i, r: order.append((i, r)))
    assert [i for i, _ in order][0] == 1
    assert "needs 4 pages" in order[0][1].error and order[0][1].finish_reason == "error"
    assert all(r.error is None and len(r.tokens) == 30 for i, r in order[1:])


def test_rows_behind_one_waiting_for_pages_do_not_overtake_it(tiny):
    """`wide` needs 2 of the pool's 3 pages while `run` holds 2: it waits, and the small
    requests that arrive after it wait behind it instead of taking the pages as they free."""
    cfg = tiny[0]
    page = SessionPool(cfg, jnp.float32, device_bytes=1 << 20, host_bytes=0).page_bytes
    gen = make(tiny, device_bytes=3 * page)
    order, sent = [], []

    def fetch():
        if not sent:
            sent.append(1)
            return [("run", GenRequest("run", ids(70, 63), 30)), ("wide", GenRequest("wide", ids(100, 64), 10)),
                    ("s1", GenRequest("s1", ids(10, 65), 4)), ("s2", GenRequest("s2", ids(10, 66), 4))]
        return []

    admits = []
    gen.serve(fetch, lambda tag, r: order.append((tag, r)), admits.append)
    assert all(r.error is None for _, r in order), order
    # the 4-token rows would finish long before `run` had they slipped in beside it
    assert [t for t, _ in order][0] == "run" and admits[:2] == [1, 1]  # `wide` got in alone, first


def test_a_cancelled_request_leaves_the_batch(tiny):
    import threading

    gen = make(tiny)
    gone = threading.Event()
    chosen = []

    def on_token(t):
        chosen.append(t)
        if len(chosen) == 5:
            gone.set()  # the caller gives up mid-stream

    waiting_gone = threading.Event()
    waiting_gone.set()
    results = gen.generate([GenRequest("c", ids(20, 70), 100, on_token=on_token, cancelled=gone),
                            GenRequest("w", ids(20, 71), 100, cancelled=waiting_gone),
                            GenRequest("k", ids(20, 72), 12)])
    c, w, k = results
    assert c.error == "cancelled" and 5 <= len(c.tokens) <= 6  # the pipelined step may add one
    assert w.error == "cancelled" and w.tokens == [] and gen.pool.where("w") is None
    assert k.error is None and len(k.tokens) == 12


def test_finished_rows_hand_jitted_calls_arrays_nobody_edits_later(tiny, monkeypatch):
    """On CPU a jitted call may read a numpy argument in place when it runs, which with the
    pipelined decode step is after the host moved on: a table edited after being handed over
    would send a finished row's K/V to another session's pages. Every table given to a page
    move must still hold what it held when it was handed over."""
    gen = make(tiny)
    handed = []
    for name in ("scatter_row", "scatter", "gather"):
        orig = getattr(gen.pool, name)

        def spy(table, *a, _orig=orig):
            handed.append((table, table.copy()))
            return _orig(table, *a)

        monkeypatch.setattr(gen.pool, name, spy)
    sent = []

    def fetch():  # rows finish and new ones take their slots while others decode
        due = [] if len(sent) > 3 else [(len(sent), GenRequest(f"s{len(sent) % 2}", ids(10 + len(sent), 80 + len(sent)),
                                                               3 + 4 * len(sent)))]
        sent.extend(due)
        return due

    gen.serve(fetch, lambda tag, r: None)
    assert len(handed) > 4
    for arr, snapshot in handed:
        np.testing.assert_array_equal(arr, snapshot)


def test_seeded_sampling_is_reproducible(tiny):
    gen = make(tiny)
    p = ids(40, 7)
    a = one(gen, "a", p, 16, temperature=0.9, top_p=0.95, seed=123)
    b = gen.generate([GenRequest("b0", ids(30, 8), 5),
                      GenRequest("b", p, 16, temperature=0.9, top_p=0.95, seed=123)])[1]
    c = one(gen, "c", p, 16, temperature=0.9, top_p=0.95, seed=124)
    g = one(gen, "g", p, 16)
    assert a.tokens == b.tokens  # another batch, another position in it: same draws
    assert a.tokens != c.tokens and a.tokens != g.tokens


def test_constrained_output_always_validates(tiny):
    from ponder.inference.jax.constrain import Constraint

    cfg, _, tk = tiny
    schema = answer_schema(("none", "alert", "inspect"))
    c = Constraint.json_schema(schema, tk, vocab_size=cfg.vocab_size)
    gen = make(tiny)
    prompt = tk.encode(tk.apply_chat_template([{"role": "user", "content": "pump-7 vibration=9.1"}]))
    reqs = [GenRequest(f"s{seed}", prompt, 48, temperature=1.0, seed=seed, constraint=c)
            for seed in range(24)]
    reqs.append(GenRequest("greedy", prompt, 48, constraint=c))
    results = gen.generate(reqs)
    texts = set()
    for r in results:
        assert r.error is None and r.finish_reason == "stop" and len(r.tokens) <= 48
        text = tk.decode(r.tokens)
        jsonschema.validate(json.loads(text), schema)
        texts.add(text)
    assert len(texts) > 10  # the seeds really sampled


def test_each_result_says_how_long_it_queued_prefilled_and_decoded(tiny):
    """The phases an engine span shows (runtime/tracing.py): on the generator's clock, in
    order, adding up to no more than the call took."""
    import time

    gen = make(tiny)
    t0 = time.perf_counter()
    res = gen.generate([GenRequest("ph", ids(40, 3), 6, ignore_eos=True),
                        GenRequest("ph2", ids(30, 4), 6, ignore_eos=True, n=2, temperature=0.7, seed=1)])
    took = time.perf_counter() - t0
    for r in res:
        assert set(r.phases) == {"queue", "prefill", "decode"}
        assert r.phases["queue"] >= 0 and r.phases["prefill"] > 0 and r.phases["decode"] > 0
        assert sum(r.phases.values()) <= took
    assert res[1].phases["decode"] == max(s.phases["decode"] for s in res[1].samples)

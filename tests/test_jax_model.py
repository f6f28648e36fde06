"""The JAX decoder against transformers (PyTorch CPU) on tiny random checkpoints.

Both directions are covered: Llama/Mistral checkpoints are written by `checkpoint.save` and read
by transformers; the Qwen2 one is built and saved (sharded) by transformers and read by
`checkpoint.load`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jax
import torch
import transformers

import jax.numpy as jnp  # noqa: E402

from ponder.inference.jax import checkpoint, model  # noqa: E402
from ponder.inference.jax.config import PRESETS, ModelConfig  # noqa: E402
from ponder.inference.jax.tokenizer import Tokenizer  # noqa: E402

FORWARD = jax.jit(model.forward, static_argnums=1)
LENGTHS = (1, 7, 33)  # the other tests reuse these shapes where they can: compiling dominates
S = 64  # cache length in these tests

LLAMA = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=(2,),
)


def _hf(path, dtype=torch.float32):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _ours(params, cfg, tokens: np.ndarray, start=0) -> np.ndarray:
    B = tokens.shape[0]
    k, v = model.init_cache(cfg, B, S, params["embed"].dtype)
    start = jnp.full((B,), start, jnp.int32)
    logits, _, _ = FORWARD(params, cfg, jnp.asarray(tokens, jnp.int32), start, k, v)
    return np.asarray(logits)


def _prompt(cfg, n, seed=0):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (1, n))


def _random_norms(params, seed):
    # norms of 1 would hide a misplaced norm weight
    rng = np.random.default_rng(seed)
    layers = dict(params["layers"])
    for k in ("attn_norm", "mlp_norm"):
        layers[k] = jnp.asarray(1 + 0.1 * rng.standard_normal(layers[k].shape), layers[k].dtype)
    return {**params, "layers": layers}


def _write(tmp_path_factory, name, cfg, seed=0):
    path = tmp_path_factory.mktemp(name)
    params = _random_norms(checkpoint.init_params(cfg, seed=seed, std=0.1), seed)
    checkpoint.save(path, cfg, params)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _write(tmp_path_factory, "llama", LLAMA)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    cfg = LLAMA.replace(model_type="mistral", sliding_window=8, rope_theta=1e6, tie_word_embeddings=True)
    return _write(tmp_path_factory, "mistral", cfg, seed=3)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Built and saved by transformers, in 100 KB shards, with random q/k/v biases and norms."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.1,
        max_position_embeddings=128,
        rope_theta=1e6,
        bos_token_id=0,
        eos_token_id=2,
    )
    hf = transformers.Qwen2ForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.normal_(1, 0.1)
    hf.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def ckpt(request):
    """(path, transformers model, our cfg, our float32 params) for each family."""
    path = request.getfixturevalue(f"{request.param}_dir")
    cfg, params = checkpoint.load(path)
    return path, _hf(path), cfg, params


def test_logits_match_transformers_float32(ckpt):
    path, hf, cfg, params = ckpt
    errs = []
    for n in LENGTHS:
        tokens = _prompt(cfg, n, seed=n)
        ref = _hf_logits(hf, tokens)
        errs.append(float(np.abs(_ours(params, cfg, tokens) - ref).max()))
        assert np.abs(ref).max() > 1.0  # the check is not vacuous
    print(f"{cfg.model_type} float32 max abs err by length {dict(zip(LENGTHS, errs))}")
    assert max(errs) < 1e-4


def test_bfloat16_is_close(ckpt):
    """bf16 against transformers in float32: a bf16 mantissa is 8 bits, so logits of size ~5
    land within a few hundredths; we require 5% of the largest logit."""
    path, hf, cfg, _ = ckpt
    _, params = checkpoint.load(path, dtype="bfloat16")
    assert params["layers"]["wq"].dtype == jnp.bfloat16
    tokens = _prompt(cfg, 33)
    ref = _hf_logits(hf, tokens)
    ours = _ours(params, cfg, tokens)
    assert ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    print(f"{cfg.model_type} bfloat16 max abs err {err:.4f} (max |logit| {np.abs(ref).max():.2f})")
    assert err < 0.05 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=lambda s: s["rope_type"],
)  # fmt: skip
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    cfg = LLAMA.replace(rope_scaling=scaling, rope_theta=500000.0)
    checkpoint.save(tmp_path, cfg, checkpoint.init_params(cfg, seed=5, std=0.1))
    cfg2, params = checkpoint.load(tmp_path)
    assert cfg2.rope_scaling == scaling
    tokens = _prompt(cfg, 60)
    err = np.abs(_ours(params, cfg2, tokens) - _hf_logits(_hf(tmp_path), tokens)).max()
    print(f"rope {scaling['rope_type']} max abs err {err:.2e}")
    assert err < 1e-4


def test_incremental_prefill_equals_full(llama_dir):
    cfg, params = checkpoint.load(llama_dir)
    tokens = _prompt(cfg, 33)
    full = _ours(params, cfg, tokens)
    k, v = model.init_cache(cfg, 1, S)
    got, pos = [], 0
    for n in (20, 5) + (1,) * 8:  # prefill, append a chunk, then decode one at a time
        logits, k, v = FORWARD(params, cfg, jnp.asarray(tokens[:, pos : pos + n]), jnp.array([pos]), k, v)
        got.append(np.asarray(logits))
        pos += n
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)


def test_bfloat16_decode_matches_bfloat16_prefill(ckpt):
    """Decode (T = 1) has its own attention kernel (row accumulation, not a dot): in bf16 it
    must agree with the prefill kernel to within bf16 rounding and pick the same tokens."""
    path, _, cfg, _ = ckpt
    _, params = checkpoint.load(path, dtype="bfloat16")
    tokens = _prompt(cfg, 24, seed=4)
    full = _ours(params, cfg, tokens)[0, 16:]
    k, v = model.init_cache(cfg, 1, S, jnp.bfloat16)
    _, k, v = FORWARD(params, cfg, jnp.asarray(tokens[:, :16]), jnp.array([0]), k, v)
    steps = []
    for pos in range(16, 24):
        logits, k, v = FORWARD(params, cfg, jnp.asarray(tokens[:, pos : pos + 1]), jnp.array([pos]), k, v)
        steps.append(np.asarray(logits)[0, 0])
    steps = np.stack(steps)
    assert np.abs(steps - full).max() < 0.02 * np.abs(full).max()
    assert (steps.argmax(-1) == full.argmax(-1)).all()


def test_batched_right_padded_equals_unbatched(qwen2_dir):
    """Two rows of different lengths and starts, right-padded with junk, in two calls."""
    cfg, params = checkpoint.load(qwen2_dir)
    a, b = _prompt(cfg, 33, seed=1)[0], _prompt(cfg, 7, seed=2)[0]
    junk = _prompt(cfg, 20, seed=3)[0]
    full_a, full_b = _ours(params, cfg, a[None])[0], _ours(params, cfg, b[None])[0]

    k, v = model.init_cache(cfg, 2, S)
    call1 = np.stack([a[:20], np.concatenate([b[:5], junk[:15]])])
    l1, k, v = FORWARD(params, cfg, jnp.asarray(call1), jnp.array([0, 0]), k, v)
    call2 = np.stack([a[20:33], np.concatenate([b[5:7], junk[:11]])])
    l2, k, v = FORWARD(params, cfg, jnp.asarray(call2), jnp.array([20, 5]), k, v)
    call3 = np.stack([a[32:33], b[6:7]])  # rewrite the last token: the same logits come back
    l3, k, v = FORWARD(params, cfg, jnp.asarray(call3), jnp.array([32, 6]), k, v)

    l1, l2, l3 = np.asarray(l1), np.asarray(l2), np.asarray(l3)
    close = dict(atol=1e-5, rtol=0)
    np.testing.assert_allclose(l1[0], full_a[:20], **close)
    np.testing.assert_allclose(l2[0], full_a[20:33], **close)
    np.testing.assert_allclose(l1[1, :5], full_b[:5], **close)
    np.testing.assert_allclose(l2[1, :2], full_b[5:7], **close)
    np.testing.assert_allclose(l3[:, 0], np.stack([full_a[32], full_b[6]]), **close)


def test_writes_past_the_cache_are_dropped(llama_dir):
    cfg, params = checkpoint.load(llama_dir)
    k, v = model.init_cache(cfg, 1, S)
    tokens = jnp.asarray(_prompt(cfg, 7))
    _, k, v = FORWARD(params, cfg, tokens, jnp.array([S - 3]), k, v)  # 3 slots left for 7 tokens
    k, v = np.asarray(k), np.asarray(v)
    assert np.all(k[..., : S - 3] == 0) and np.all(k[..., S - 3 :] != 0)  # [L, B, Hkv, D, S]
    assert np.all(v[:, :, :, : S - 3] == 0) and np.all(v[:, :, :, S - 3 :] != 0)  # [L, B, Hkv, S, D]


def test_greedy_generation_matches_transformers(ckpt):
    path, hf, cfg, params = ckpt
    prompt = _prompt(cfg, 7, seed=11)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False)[0, 7:].tolist()

    k, v = model.init_cache(cfg, 1, S)
    logits, k, v = FORWARD(params, cfg, jnp.asarray(prompt), jnp.array([0]), k, v)
    ours = [int(logits[0, -1].argmax())]
    for i in range(15):
        tok = jnp.array([[ours[-1]]], jnp.int32)
        logits, k, v = FORWARD(params, cfg, tok, jnp.array([7 + i]), k, v)
        ours.append(int(logits[0, -1].argmax()))
    # transformers stops at an eos token; ours ran on, so compare up to there
    assert len(ref) == 16 or ref[-1] in cfg.eos_token_id
    assert ours[: len(ref)] == ref
    assert len(set(ref)) > 1  # not a degenerate repeat


def test_sharded_load_and_save(qwen2_dir, tmp_path):
    index = json.loads((qwen2_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg, params = checkpoint.load(qwen2_dir)
    checkpoint.save(tmp_path, cfg, params, shard_bytes=50_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    cfg2, params2 = checkpoint.load(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    checkpoint.save(tmp_path, cfg, params)  # unsharded now: the old shards and index are gone
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]
    tokens = _prompt(cfg, 7)
    np.testing.assert_array_equal(_ours(params, cfg, tokens), _ours(checkpoint.load(tmp_path)[1], cfg, tokens))


def test_config_round_trip():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, name
    assert PRESETS["qwen2.5-0.5b-shape"].num_params == 494_032_768  # the real model's count
    assert 25e6 < PRESETS["small"].num_params < 35e6
    hash(LLAMA.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}))  # usable as a jit static
    # transformers v5 writes `rope_parameters` (theta inside) instead of rope_theta + rope_scaling
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
    cfg = LLAMA.replace(rope_scaling=scaling, rope_theta=5e5)
    v5 = transformers.AutoConfig.for_model(**cfg.to_hf()).to_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert ModelConfig.from_hf(v5) == cfg


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint.init_model(path, "tiny", seed=7)
    return path


MESSAGES = [
    [{"role": "user", "content": "temperature=21.4 on pump-0003, is that odd?"}],
    [
        {"role": "system", "content": "You watch sensors. Answer in JSON."},
        {"role": "user", "content": 'Événement: {"vibration": 0.31}'},
        {"role": "assistant", "content": '{"action": "observe"}'},
        {"role": "user", "content": "and now? 🙂"},
    ],
]


def test_init_model_loads_in_transformers_and_here(tiny_dir):
    cfg, params = checkpoint.load(tiny_dir)
    assert cfg == PRESETS["tiny"]
    tokens = _prompt(cfg, 7)
    err = np.abs(_ours(params, cfg, tokens) - _hf_logits(_hf(tiny_dir), tokens)).max()
    assert err < 1e-4
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.vocab_size == cfg.vocab_size
    assert tok.eos_token_ids == (2, 0)
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("messages", MESSAGES, ids=["one", "multi"])
def test_chat_template_matches_transformers(tiny_dir, messages, gen):
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    tok = Tokenizer.from_dir(tiny_dir)
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    got = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert got == want
    ids = tok.encode(got)
    assert ids == hf_tok(got, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == got


def test_chat_template_environment_matches_transformers(tiny_dir, tmp_path):
    """A Llama-3-like template: bos_token, tojson, loop controls, trim/lstrip, raise_exception."""
    shutil.copytree(tiny_dir, tmp_path, dirs_exist_ok=True)
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
        "  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "<|im_start|>{{ m['role'] }} {{ m | tojson }}<|im_end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg_path = tmp_path / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**config, "chat_template": template, "bos_token": "<|endoftext|>"}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for messages in MESSAGES:
        want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages) == want
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="bad role"):
        hf_tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(Exception, match="bad role"):
        tok.apply_chat_template(bad)


def test_vocab_bytes_reassemble_any_text(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    vocab = tok.vocab()
    assert len(vocab) == tok.vocab_size and vocab[2] == b"<|im_end|>"
    assert tok.special_ids == {0, 1, 2}
    text = 'héllo {"z": -3.25e-4}\n\t日本語 🙂 \x00\x7f'
    ids = tok.encode(text)
    assert b"".join(vocab[i] for i in ids) == text.encode()
    assert tok.decode(ids) == text

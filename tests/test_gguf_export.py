"""`ponder export-gguf` against real llama.cpp (llama-cpp-python, in process) on a tiny random
checkpoint: the file reads back as the checkpoint, llama.cpp tokenizes as ponder does, and it
computes the same logits and greedy continuations as ponder's own JAX model."""

from __future__ import annotations

import itertools
import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import llama_cpp
import numpy as np
import pytest
import tokenizers
from llama_cpp import Llama
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers
from typer.testing import CliRunner

from ponder.cli import app
from ponder.inference.jax import checkpoint, model
from ponder.inference.jax.generate import Generator, GenRequest
from ponder.inference.jax.gguf import export_gguf
from ponder.inference.jax.tokenizer import Tokenizer

N_CTX = 256
QWEN2_REGEX = (  # Qwen2.5's tokenizer.json, verbatim
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    '{"key": "device-0042", "ts": 1712345678.125, "temperature": -12.5, "ok": true}',
    "3.14159 -0.001 1e-9 12345678901234567890 00:07:59",
    "naïve café — Ж привет, 日本語 🙂 emoji",
    "line one\n\nline two\r\n\ttabbed\n",
    "  leading,   several   spaces and trailing   ",
    "don't, it's, we'll; I'm (maybe) [x] {y} a\nb",
    "<|im_start|>user\nWhat now?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "",
]
PROMPTS = [
    "The pump temperature is rising",
    '{"action": "',
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nsensor-0007 "
        "vibration=81.20 (mean 12.0, z=+4.10)<|im_end|>\n<|im_start|>assistant\n"
    ),
    "Ж é 12:34",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    cfg = checkpoint.init_model(path, "tiny", seed=7)
    # weights 10x init_model's std: at std 0.02 every continuation repeats one token (the
    # residual stream is the embedding), which greedy equality would pass with broken attention
    checkpoint.save(path, cfg, checkpoint.init_params(cfg, seed=7, std=0.2))
    cfg, params = checkpoint.load(path)
    tk = Tokenizer.from_dir(path)
    # every embedding row is a token: llama.cpp samples from all rows, ponder from the tokenizer's
    assert tk.vocab_size == cfg.vocab_size == 512
    return path, cfg, params, tk


@pytest.fixture(scope="module")
def f32_file(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(ckpt[0], out)
    return out


@pytest.fixture(scope="module")
def llm(f32_file):
    # an f32 KV cache: llama.cpp's default f16 cache alone moves these logits by ~2e-4
    return Llama(model_path=str(f32_file), n_ctx=N_CTX, logits_all=True, verbose=False,
                 type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def squeeze(text: str) -> str:
    """Without whitespace: rich wraps long error lines (paths included) at the console width."""
    return "".join(text.split())


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_and_tensors_read_back(ckpt, f32_file):
    path, cfg, _, tk = ckpt
    r = gguf.GGUFReader(f32_file)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.file_type") == 0
    expected = {
        "llama.vocab_size": 512, "llama.context_length": 4096, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 160, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
        "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tk.chat_template,
    }  # fmt: skip
    assert {k: field(r, k) for k in expected} == expected
    assert field(r, "llama.rope.freq_base") == cfg.rope_theta == 10000.0
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == np.float32(cfg.rms_norm_eps)

    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    assert field(r, "tokenizer.ggml.tokens") == [vocab[i] for i in range(512)]
    assert field(r, "tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field(r, "tokenizer.ggml.token_type") == [3, 3, 3] + [1] * 509  # CONTROL, NORMAL
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in spec["model"]["merges"]]

    # values: HF tensors, q/k rows interleaved back to halves-per-head order (D = 16)
    hf = load_file(path / "model.safetensors")

    def halves(t, heads):
        return t.reshape(heads, 8, 2, -1).swapaxes(1, 2).reshape(t.shape)

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    hf_layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    for i, (ours, theirs) in itertools.product(range(2), hf_layer.items()):
        names[f"blk.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    assert sorted(t.name for t in r.tensors) == sorted(names)  # tied: no output.weight
    for t in r.tensors:
        want = hf[names[t.name]]
        data = np.asarray(t.data)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = halves(data, 4 if "attn_q" in t.name else 2)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(want.shape)), t.name  # GGUF lists dims innermost first
        assert np.array_equal(data, want), t.name


def test_tokenizer_matches_ponder(ckpt, llm):
    tk = ckpt[3]
    for text in TEXTS:
        ids = tk.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True) == text.encode(), text
        assert tk.decode(ids, skip_special_tokens=False) == text
    # without special=True the control tokens' text is plain text, as in transformers' split_special_tokens
    assert 1 not in llm.tokenize(b"<|im_start|>user", add_bos=False, special=False)
    assert llm.token_bos() == 0 and llm.token_eos() == 2


def test_qwen2_pre_tokenizer_matches(ckpt, tmp_path):
    """A Qwen2-style tokenizer.json (Split on Qwen's regex, then ByteLevel without its own
    regex) exports as llama.cpp's "qwen2" pre-tokenizer and splits text the same way."""
    path = ckpt[0]
    tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.save(str(tmp_path / "tokenizer.json"))
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(path / name, tmp_path / name)
    export_gguf(tmp_path, tmp_path / "q.gguf")
    assert field(gguf.GGUFReader(tmp_path / "q.gguf"), "tokenizer.ggml.pre") == "qwen2"
    llm = Llama(model_path=str(tmp_path / "q.gguf"), n_ctx=64, verbose=False)
    ours = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text), text
    # the two splits differ (Qwen's keeps digits apart), so this is not the gpt-2 test again
    assert ours.encode(TEXTS[1]) != ckpt[3].encode(TEXTS[1])


def test_logits_and_greedy_match_ponder(ckpt, llm):
    _, cfg, params, tk = ckpt
    prompts = [tk.encode(p) for p in PROMPTS]
    fwd = jax.jit(model.forward, static_argnums=1)
    for ids in prompts:
        k, v = model.init_cache(cfg, 1, N_CTX)
        logits, _, _ = fwd(params, cfg, jnp.asarray([ids], jnp.int32), jnp.zeros(1, jnp.int32), k, v)
        ours = np.asarray(logits[0])  # [T, V]
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)])
        # every position, not only the last; logits have std ~1.6 here, and the two f32 paths
        # differ by ~1e-5 (summation order)
        assert np.abs(ours - theirs).max() <= 1e-4

    gen = Generator(cfg, params, n_vocab=tk.vocab_size, eos_ids=(), max_batch=4, batch_buckets=(4,),
                    seq_buckets=(128,), chunk_buckets=(128,), device_bytes=4 << 20, host_bytes=4 << 20)
    results = gen.generate([GenRequest(None, ids, 12, ignore_eos=True) for ids in prompts])
    assert [r.finish_reason for r in results] == ["length"] * 4
    ours = [r.tokens for r in results]
    theirs = [list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 12))
              for ids in prompts]
    assert theirs == ours
    assert all(len(set(t)) > 6 for t in ours)  # varied continuations, not one repeated token


@pytest.mark.parametrize(
    "changes",
    [
        # Llama 3 style: llama3 RoPE scaling (all three bands within 64 positions), untied head,
        # biases on q/k/v/o
        {"rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": True, "o_bias": True,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        # Qwen2: q/k/v biases, linear RoPE scaling, heads * head_dim (128) != hidden (64)
        {"model_type": "qwen2", "attention_bias": True, "head_dim": 32, "rope_theta": 1e6,
         "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ],
    ids=["llama3-rope-biases-untied", "qwen2-linear-rope-wide-heads"],
)
def test_variants_logits_match_ponder(ckpt, tmp_path, changes):
    """The optional parts of the mapping: biases, output.weight, rope_freqs, key_length."""
    cfg = ckpt[1].replace(**changes)
    checkpoint.save(tmp_path, cfg, checkpoint.init_params(cfg, seed=1, std=0.2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt[0] / name, tmp_path / name)
    cfg, params = checkpoint.load(tmp_path)
    assert cfg == ckpt[1].replace(**changes)
    export_gguf(tmp_path, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"rope_freqs.weight", "blk.1.attn_q.bias", "blk.1.attn_v.bias"} <= names
    assert ("output.weight" in names, "blk.0.attn_output.bias" in names) == (cfg.o_bias, cfg.o_bias)

    ids = ckpt[3].encode(PROMPTS[2])  # 70 tokens: past original_max_position_embeddings
    k, v = model.init_cache(cfg, 1, 128)
    logits, _, _ = model.forward(params, cfg, jnp.asarray([ids], jnp.int32), jnp.zeros(1, jnp.int32), k, v)
    llm = Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, logits_all=True, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    assert np.abs(np.asarray(logits[0]) - llm.scores[: len(ids)]).max() <= 1e-4


def test_cli_writes_f16_and_rejects_non_checkpoint(ckpt, tmp_path):
    _, cfg, params, _ = ckpt
    runner = CliRunner()
    out = tmp_path / "tiny-f16.gguf"
    res = runner.invoke(app, ["export-gguf", str(ckpt[0]), str(out), "--dtype", "f16"])
    assert res.exit_code == 0, res.output
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == "F16"
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    f16 = Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    ids = ckpt[3].encode(PROMPTS[0])
    assert f16.tokenize(PROMPTS[0].encode(), add_bos=False, special=True) == ids
    f16.eval(ids)
    k, v = model.init_cache(cfg, 1, 64)
    logits, _, _ = model.forward(params, cfg, jnp.asarray([ids], jnp.int32), jnp.zeros(1, jnp.int32), k, v)
    assert np.abs(np.asarray(logits[0, -1]) - f16.scores[len(ids) - 1]).max() <= 0.05  # measured 0.006

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    res = runner.invoke(app, ["export-gguf", str(empty), str(tmp_path / "x.gguf")])
    assert res.exit_code == 2
    assert squeeze(f"{empty} is not a checkpoint directory: config.json is missing") in squeeze(res.stderr)
    assert not (tmp_path / "x.gguf").exists()
    res = runner.invoke(app, ["export-gguf", str(ckpt[0]), str(tmp_path / "x.gguf"), "--dtype", "q8"])
    assert res.exit_code == 2
    assert squeeze("dtype 'q8' is not one of ('f32', 'f16')") in squeeze(res.stderr)

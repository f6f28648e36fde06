"""Hugging Face checkpoints: load and save config.json + *.safetensors; random init.

A saved directory loads in transformers with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, and here with `load(dir)` and `Tokenizer.from_dir(dir)`.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import PRESETS, ModelConfig

__all__ = ["load", "save", "init_params", "init_model"]

# ours -> (HF name under model.layers.{i}., stored transposed: HF keeps Linear weights [out, in])
_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHARD_BYTES = 500 * 2**20


def _layer_keys(cfg: ModelConfig) -> list[str]:
    skip = set() if cfg.attention_bias else {"bq", "bk", "bv"}
    skip |= set() if cfg.o_bias else {"bo"}
    return [k for k in _LAYER if k not in skip]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    E, F = cfg.hidden_size, cfg.intermediate_size
    Q, KV = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = {
        "attn_norm": (E,), "wq": (E, Q), "wk": (E, KV), "wv": (E, KV), "wo": (Q, E),
        "bq": (Q,), "bk": (KV,), "bv": (KV,), "bo": (E,),
        "mlp_norm": (E,), "w_gate": (E, F), "w_up": (E, F), "w_down": (F, E),
    }  # fmt: skip
    return {k: layer[k] for k in _layer_keys(cfg)}


def load(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Read config.json and model.safetensors, or the shards listed in model.safetensors.index.json."""
    path = Path(path)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]  # {name: shard file}
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    to = _DTYPES[dtype]

    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(path / f, framework="numpy")) for f in files]
        where = {name: h for h in handles for name in h.keys()}

        def get(name: str, transpose: bool = False) -> np.ndarray:
            if name not in where:
                msg = f"{path}: tensor {name!r} is missing (files: {files})"
                raise KeyError(msg)
            t = where[name].get_tensor(name)
            return t.T if transpose else t

        L = cfg.num_hidden_layers
        layers = {}
        for key in _layer_keys(cfg):
            name, transpose = _LAYER[key]
            stacked = np.stack([get(f"model.layers.{i}.{name}", transpose) for i in range(L)])
            layers[key] = jnp.asarray(stacked, to)
        params = {
            "embed": jnp.asarray(get("model.embed_tokens.weight"), to),
            "layers": layers,
            "norm": jnp.asarray(get("model.norm.weight"), to),
        }
        if not cfg.tie_word_embeddings:
            params["lm_head"] = jnp.asarray(get("lm_head.weight", transpose=True), to)
    return cfg, params


def save(path: str | Path, cfg: ModelConfig, params: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json, generation_config.json and safetensors in HF layout (sharded with an
    index when larger than `shard_bytes`). Earlier model*.safetensors files in `path` are removed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed"])}
    for i in range(cfg.num_hidden_layers):
        for key, (name, transpose) in _LAYER.items():
            if key in params["layers"]:
                t = np.asarray(params["layers"][key][i])
                tensors[f"model.layers.{i}.{name}"] = t.T if transpose else t
    tensors["model.norm.weight"] = np.asarray(params["norm"])
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"]).T
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes

    for old in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata=meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / fname, metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    dtype = str(params["embed"].dtype)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2) + "\n")
    eos = list(cfg.eos_token_id)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    gen["pad_token_id"] = cfg.pad_token_id
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def init_params(cfg: ModelConfig, seed: int = 0, dtype: str = "float32", std: float = 0.02) -> dict:
    """Random weights: normal(0, std) matrices and embeddings, norms = 1, biases normal(0, std)."""
    rng = np.random.default_rng(seed)
    to = _DTYPES[dtype]
    L = cfg.num_hidden_layers

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(std), to)

    layers = {}
    for key, shape in _shapes(cfg).items():
        layers[key] = jnp.ones((L, *shape), to) if key.endswith("norm") else normal(L, *shape)
    params = {
        "embed": normal(cfg.vocab_size, cfg.hidden_size),
        "layers": layers,
        "norm": jnp.ones((cfg.hidden_size,), to),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal(cfg.hidden_size, cfg.vocab_size)
    return params


def init_model(path: str | Path, preset: str, seed: int = 0, dtype: str | None = None) -> ModelConfig:
    """Write a randomly initialised checkpoint of a preset, with a freshly trained tokenizer.

    dtype defaults to float32, or bfloat16 for qwen2.5-0.5b-shape (as Qwen ships it; ~1 GB in
    two shards). The byte-level BPE is trained here to the preset's vocab_size; should the
    generated text run out of pairs first, the tokenizer ends up smaller than the embedding,
    which transformers allows (real Qwen2.5 has 151,665 tokens for 151,936 rows).
    """
    from .tokenizer import SPECIAL_TOKENS, train_bpe, write_tokenizer_files

    if preset not in PRESETS:
        msg = f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}"
        raise ValueError(msg)
    cfg = PRESETS[preset]
    dtype = dtype or ("bfloat16" if cfg.num_params > 200e6 else "float32")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tk = train_bpe(cfg.vocab_size, seed, n_lines=max(20_000, cfg.vocab_size * 2 // 3))
    assert [tk.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must be ids 0..2"
    write_tokenizer_files(path, tk, model_max_length=cfg.max_position_embeddings)
    save(path, cfg, init_params(cfg, seed, dtype))
    return cfg

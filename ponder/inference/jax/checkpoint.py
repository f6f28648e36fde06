"""Hugging Face checkpoints: load and save config.json + *.safetensors; random init.

A saved directory loads in transformers with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`, and here with `load(dir)` and `Tokenizer.from_dir(dir)`.
A LLaVA one (cfg.vision set) loads with `LlavaForConditionalGeneration.from_pretrained(dir)`;
its params carry a `vision` sub-tree (see vision.py) beside the text model's.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import PRESETS, ModelConfig, VisionConfig

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
# vision tower: ours -> (HF name under {tower}encoder.layers.{i}., transposed)
_VISION_LAYER = {
    "ln1_w": ("layer_norm1.weight", False),
    "ln1_b": ("layer_norm1.bias", False),
    "wq": ("self_attn.q_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "wk": ("self_attn.k_proj.weight", True),
    "bk": ("self_attn.k_proj.bias", False),
    "wv": ("self_attn.v_proj.weight", True),
    "bv": ("self_attn.v_proj.bias", False),
    "wo": ("self_attn.out_proj.weight", True),
    "bo": ("self_attn.out_proj.bias", False),
    "ln2_w": ("layer_norm2.weight", False),
    "ln2_b": ("layer_norm2.bias", False),
    "fc1": ("mlp.fc1.weight", True),
    "fc1_b": ("mlp.fc1.bias", False),
    "fc2": ("mlp.fc2.weight", True),
    "fc2_b": ("mlp.fc2.bias", False),
}
# the rest of the tower (under {tower}) and the projector (under {projector}); patch is the
# conv kernel [E, C, p, p] flattened to [C*p*p, E]
_VISION_TOP = {
    "patch": "embeddings.patch_embedding.weight",
    "patch_b": "embeddings.patch_embedding.bias",
    "cls": "embeddings.class_embedding",
    "pos": "embeddings.position_embedding.weight",
    "pre_norm_w": "pre_layrnorm.weight",
    "pre_norm_b": "pre_layrnorm.bias",
    "post_norm_w": "post_layernorm.weight",
    "post_norm_b": "post_layernorm.bias",
}
_PROJECTOR = {
    "proj1": ("linear_1.weight", True),
    "proj1_b": ("linear_1.bias", False),
    "proj2": ("linear_2.weight", True),
    "proj2_b": ("linear_2.bias", False),
}
# (text model, LM head, vision tower, projector) name prefixes: transformers 5, then 4.x LLaVA
_LLAVA_LAYOUTS = (
    ("model.language_model.", "lm_head.weight", "model.vision_tower.vision_model.", "model.multi_modal_projector."),
    ("language_model.model.", "language_model.lm_head.weight", "vision_tower.vision_model.", "multi_modal_projector."),
)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHARD_BYTES = 500 * 2**20
IMAGE_TOKEN = "<image>"  # the placeholder a LLaVA prompt repeats once per image feature row


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
    """Read config.json and model.safetensors, or the shards listed in model.safetensors.index.json.
    A LLaVA checkpoint (tensor names of transformers 5 or 4.x) also reads preprocessor_config.json
    when present, and its params get a `vision` sub-tree."""
    path = Path(path)
    processor = path / "preprocessor_config.json"
    processor = json.loads(processor.read_text()) if processor.exists() else None
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), processor)
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

        text, head, tower, projector = "model.", "lm_head.weight", "", ""
        if cfg.vision is not None:
            text, head, tower, projector = next(
                (lay for lay in _LLAVA_LAYOUTS if f"{lay[0]}embed_tokens.weight" in where), _LLAVA_LAYOUTS[0])
        L = cfg.num_hidden_layers
        layers = {}
        for key in _layer_keys(cfg):
            name, transpose = _LAYER[key]
            stacked = np.stack([get(f"{text}layers.{i}.{name}", transpose) for i in range(L)])
            layers[key] = jnp.asarray(stacked, to)
        params = {
            "embed": jnp.asarray(get(f"{text}embed_tokens.weight"), to),
            "layers": layers,
            "norm": jnp.asarray(get(f"{text}norm.weight"), to),
        }
        if not cfg.tie_word_embeddings:
            params["lm_head"] = jnp.asarray(get(head, transpose=True), to)
        if cfg.vision is not None:
            params["vision"] = _load_vision(cfg.vision, get, tower, projector, to)
    return cfg, params


def _load_vision(vcfg: VisionConfig, get, tower: str, projector: str, to) -> dict:
    from .vision import vision_shapes

    top, _ = vision_shapes(vcfg)
    out = {}
    for key in top:
        if key in _PROJECTOR:
            name, transpose = _PROJECTOR[key]
            t = get(projector + name, transpose)
        elif key == "patch":  # conv kernel [E, C, p, p] -> [C*p*p, E]
            t = get(tower + _VISION_TOP[key]).reshape(vcfg.hidden_size, -1).T
        else:
            t = get(tower + _VISION_TOP[key])
        out[key] = jnp.asarray(t, to)
    out["layers"] = {
        key: jnp.asarray(np.stack([get(f"{tower}encoder.layers.{i}.{name}", transpose)
                                   for i in range(vcfg.num_hidden_layers)]), to)
        for key, (name, transpose) in _VISION_LAYER.items()
    }
    return out


def _vision_tensors(vcfg: VisionConfig, vp: dict) -> dict[str, np.ndarray]:
    """The vision sub-tree under transformers 5's LLaVA names."""
    _, _, tower, projector = _LLAVA_LAYOUTS[0]
    out = {}
    for key, t in vp.items():
        if key == "layers":
            continue
        t = np.asarray(t)
        if key in _PROJECTOR:
            name, transpose = _PROJECTOR[key]
            out[projector + name] = t.T if transpose else t
        elif key == "patch":
            p, C = vcfg.patch_size, vcfg.num_channels
            out[tower + _VISION_TOP[key]] = t.T.reshape(vcfg.hidden_size, C, p, p)
        else:
            out[tower + _VISION_TOP[key]] = t
    for i in range(vcfg.num_hidden_layers):
        for key, (name, transpose) in _VISION_LAYER.items():
            t = np.asarray(vp["layers"][key][i])
            out[f"{tower}encoder.layers.{i}.{name}"] = t.T if transpose else t
    return out


def save(path: str | Path, cfg: ModelConfig, params: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """Write config.json, generation_config.json and safetensors in HF layout (sharded with an
    index when larger than `shard_bytes`). Earlier model*.safetensors files in `path` are removed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = _LLAVA_LAYOUTS[0][0] if cfg.vision is not None else "model."
    tensors = {f"{text}embed_tokens.weight": np.asarray(params["embed"])}
    for i in range(cfg.num_hidden_layers):
        for key, (name, transpose) in _LAYER.items():
            if key in params["layers"]:
                t = np.asarray(params["layers"][key][i])
                tensors[f"{text}layers.{i}.{name}"] = t.T if transpose else t
    tensors[f"{text}norm.weight"] = np.asarray(params["norm"])
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"]).T
    if cfg.vision is not None:
        tensors |= _vision_tensors(cfg.vision, params["vision"])
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
    if cfg.vision is not None:
        processor = json.dumps(cfg.vision.processor_hf(), indent=2)
        (path / "preprocessor_config.json").write_text(processor + "\n")
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
    if cfg.vision is not None:
        from .vision import vision_shapes

        top, per_layer = vision_shapes(cfg.vision)
        vision = {k: jnp.ones(sh, to) if k.endswith("norm_w") else normal(*sh) for k, sh in top.items()}
        Lv = cfg.vision.num_hidden_layers
        vision["layers"] = {k: jnp.ones((Lv, *sh), to) if k.startswith("ln") and k.endswith("_w")
                            else normal(Lv, *sh) for k, sh in per_layer.items()}
        params["vision"] = vision
    return params


def init_model(path: str | Path, preset: str, seed: int = 0, dtype: str | None = None) -> ModelConfig:
    """Write a randomly initialised checkpoint of a preset, with a freshly trained tokenizer.

    dtype defaults to float32, or bfloat16 for qwen2.5-0.5b-shape (as Qwen ships it; ~1 GB in
    two shards). The byte-level BPE is trained here to the preset's vocab_size; should the
    generated text run out of pairs first, the tokenizer ends up smaller than the embedding,
    which transformers allows (real Qwen2.5 has 151,665 tokens for 151,936 rows). A vision
    preset (tiny-vl) gets a LLaVA checkpoint: the tokenizer gains an `<image>` special token
    after the trained ones (cfg.vision.image_token_id), and preprocessor_config.json is written.
    """
    from .tokenizer import SPECIAL_TOKENS, train_bpe, write_tokenizer_files

    if preset not in PRESETS:
        msg = f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}"
        raise ValueError(msg)
    cfg = PRESETS[preset]
    dtype = dtype or ("bfloat16" if cfg.num_params > 200e6 else "float32")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    vision = cfg.vision is not None  # one id is kept for the <image> token
    tk = train_bpe(cfg.vocab_size - vision, seed, n_lines=max(20_000, cfg.vocab_size * 2 // 3))
    assert [tk.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2], "special tokens must be ids 0..2"
    if vision:
        tk.add_special_tokens([IMAGE_TOKEN])
        cfg = cfg.replace(vision=replace(cfg.vision, image_token_id=tk.token_to_id(IMAGE_TOKEN)))
    write_tokenizer_files(path, tk, model_max_length=cfg.max_position_embeddings)
    if vision:  # tokenizer_config.json lists the added special tokens too
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config["added_tokens_decoder"][str(cfg.vision.image_token_id)] = {"content": IMAGE_TOKEN, **flags}
        config["image_token"] = IMAGE_TOKEN
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    save(path, cfg, init_params(cfg, seed, dtype))
    return cfg

"""ModelConfig: the shape of a Llama-family decoder, read from and written to config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "ARCHITECTURES"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Hashable, so it can be a static argument of `jax.jit`.

    `rope_scaling` is None for plain RoPE, else a dict with `rope_type` in linear | dynamic |
    llama3 | yarn plus that type's keys, as transformers reads them (see model.rope_frequencies).
    It is left out of the hash (dicts are unhashable) but not out of equality.
    `attention_bias` means biases on q/k/v (Qwen2 always has them); `o_bias` a bias on o_proj
    too (Llama's `attention_bias: true` sets both). `sliding_window` (Mistral) limits attention
    to the last `sliding_window` positions, query included.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            msg = f"model_type {self.model_type!r} is not one of {sorted(ARCHITECTURES)}"
            raise ValueError(msg)
        if self.num_attention_heads % self.num_key_value_heads:
            msg = (
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
            raise ValueError(msg)
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            msg = f"rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})"
            raise NotImplementedError(msg)

    @property
    def num_params(self) -> int:
        E, F, D = self.hidden_size, self.intermediate_size, self.head_dim
        Hq, Hkv = self.num_attention_heads, self.num_key_value_heads
        attn = E * Hq * D * 2 + E * Hkv * D * 2
        attn += (Hq + 2 * Hkv) * D * self.attention_bias + E * self.o_bias
        layer = attn + 3 * E * F + 2 * E
        head = 0 if self.tie_word_embeddings else E * self.vocab_size
        return self.vocab_size * E + self.num_hidden_layers * layer + E + head

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config.json (Llama, Qwen2, Mistral; transformers v4 or v5 keys)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            msg = f"config.json model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}"
            raise ValueError(msg)
        if hf.get("hidden_act", "silu") != "silu":
            msg = f"hidden_act {hf['hidden_act']!r} is not supported (only silu)"
            raise NotImplementedError(msg)
        if hf.get("mlp_bias"):
            raise NotImplementedError("mlp_bias=true is not supported")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("partial_rotary_factor != 1 is not supported")

        # v5 writes one `rope_parameters` dict; v4 wrote `rope_theta` and `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope.update(hf.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope.pop("partial_rotary_factor", None)
        scaling = None
        if rope_type != "default":
            scaling = {"rope_type": rope_type, **rope}
            if rope_type in ("llama3", "yarn"):
                scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))

        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            # transformers applies it to layers >= max_window_layers only; no released Qwen2/2.5
            # checkpoint turns it on.
            raise NotImplementedError("Qwen2 use_sliding_window=true is not supported")

        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        heads = hf["num_attention_heads"]
        bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bias,
            o_bias=bias if model_type == "llama" else False,
            sliding_window=window,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json that transformers (v4 and v5) loads as the same model."""
        if self.model_type == "qwen2" and (not self.attention_bias or self.o_bias):
            raise ValueError("a qwen2 config has q/k/v biases and no o_proj bias")
        if self.model_type == "mistral" and (self.attention_bias or self.o_bias):
            raise ValueError("a mistral config has no attention biases")
        if self.model_type == "llama" and self.attention_bias != self.o_bias:
            raise ValueError("a llama config has either all four attention biases or none")
        eos = self.eos_token_id
        hf: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else list(eos) if eos else None,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        elif self.model_type == "qwen2":
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
            hf["max_window_layers"] = self.num_hidden_layers
        else:
            hf["sliding_window"] = self.sliding_window
        return hf


# bos/eos/pad follow the tokenizer that `checkpoint.init_model` trains: <|endoftext|>=0,
# <|im_start|>=1, <|im_end|>=2.
_SPECIAL = dict(bos_token_id=0, eos_token_id=(2, 0), pad_token_id=0)

PRESETS: dict[str, ModelConfig] = {
    # ~0.1M params: unit tests and smoke runs.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        **_SPECIAL,
    ),
    # ~32M params, Llama-shaped (untied head, no biases).
    "small": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        **_SPECIAL,
    ),
    # The real Qwen2.5-0.5B dimensions (494M params), random weights.
    "qwen2.5-0.5b-shape": ModelConfig(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=32768,
        model_type="qwen2",
        **_SPECIAL,
    ),
}

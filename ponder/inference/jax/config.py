"""ModelConfig: the shape of a Llama-family decoder, read from and written to config.json.

A LLaVA-style checkpoint (config.json model_type "llava") reads as its text model's ModelConfig
with `vision` set: the VisionConfig of its CLIP or SigLIP tower, projector and image processor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARCHITECTURES", "PRESETS", "ModelConfig", "VisionConfig"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
# transformers' LlamaConfig / Qwen2Config / MistralConfig defaults, for LLaVA text_configs
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_DEFAULTS,
    "qwen2": {**_LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016,
              "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
    "mistral": {**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
}


@dataclass(frozen=True)
class VisionConfig:
    """A LLaVA vision tower (CLIP or SigLIP ViT), its projector into the text model, and the
    image processing in front of it. Hashable (tuples only), so ModelConfig stays a jit static.

    `feature_layers` index the tower's hidden states as transformers does (0: the embeddings,
    i: after layer i, negative from the end; several are concatenated); `select_strategy`
    "default" drops the CLS position (CLIP), "full" keeps every position. Processing: resize
    (shortest edge to `resize_shortest`, or to exactly `resize_hw`), center crop to `crop_hw`
    (None: none), rescale by `rescale_factor`, normalise by `image_mean` / `image_std`.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    text_hidden_size: int
    image_token_id: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    feature_layers: tuple[int, ...] = (-2,)
    select_strategy: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    resize_shortest: int | None = None
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    do_normalize: bool = True

    def __post_init__(self):
        if self.model_type not in VISION_TOWERS:
            msg = f"vision model_type {self.model_type!r} is not one of {list(VISION_TOWERS)}"
            raise NotImplementedError(msg)
        for name in ("hidden_act", "projector_act"):
            if getattr(self, name) not in ACTIVATIONS:
                msg = f"vision {name} {getattr(self, name)!r} is not one of {list(ACTIVATIONS)}"
                raise NotImplementedError(msg)
        if self.select_strategy not in ("default", "full"):
            msg = f"vision_feature_select_strategy {self.select_strategy!r} is not 'default' or 'full'"
            raise ValueError(msg)
        if self.image_size % self.patch_size:
            msg = f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            raise ValueError(msg)
        L = self.num_hidden_layers
        if any(not -L - 1 <= i <= L for i in self.feature_layers) or not self.feature_layers:
            msg = f"vision_feature_layer {list(self.feature_layers)} is outside the tower's 0..{L} hidden states"
            raise ValueError(msg)
        if self.hidden_size % self.num_attention_heads:
            msg = f"vision hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads"
            raise ValueError(msg)

    @property
    def cls(self) -> bool:
        """Whether the tower prepends a CLS position (CLIP does, SigLIP does not)."""
        return self.model_type == "clip_vision_model"

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Placeholder tokens (and feature rows) per image."""
        return self.n_patches + self.cls - (self.select_strategy == "default")

    @property
    def layers_run(self) -> int:
        """Tower layers that must run to reach the deepest selected hidden state."""
        L = self.num_hidden_layers
        return max(i % (L + 1) for i in self.feature_layers)

    @property
    def num_params(self) -> int:
        E, F, C, p = self.hidden_size, self.intermediate_size, self.num_channels, self.patch_size
        pos = self.n_patches + self.cls
        embed = C * p * p * E + E * (not self.cls) + pos * E + E * self.cls + 2 * E * self.cls
        layer = 4 * (E * E + E) + 2 * E * F + F + E + 4 * E
        T, n = self.text_hidden_size, len(self.feature_layers)
        proj = E * n * T + T * T + 2 * T * self.projector_bias
        return embed + self.num_hidden_layers * layer + 2 * E + proj

    @classmethod
    def from_hf(cls, hf: dict[str, Any], text_hidden_size: int,
                processor: dict[str, Any] | None = None) -> VisionConfig:
        """From a llava config.json (its vision_config and projector keys) and, when there is
        one, the checkpoint's preprocessor_config.json."""
        v = hf["vision_config"]
        model_type = v.get("model_type", "clip_vision_model")
        siglip = model_type == "siglip_vision_model"
        layers = hf.get("vision_feature_layer", -2)
        token = hf.get("image_token_id", hf.get("image_token_index"))
        if token is None:
            raise ValueError("a llava config.json needs image_token_id (or image_token_index)")
        image_size = v.get("image_size", 224)
        p = dict(processor or {})
        size, crop = p.get("size") or {"shortest_edge": image_size}, p.get("crop_size")
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if processor is None and siglip:
            size, crop = {"height": image_size, "width": image_size}, None
        elif processor is None:
            crop = {"height": image_size, "width": image_size}
        mean = p.get("image_mean", (0.5,) * 3 if siglip else CLIP_MEAN)
        std = p.get("image_std", (0.5,) * 3 if siglip else CLIP_STD)
        return cls(
            model_type=model_type,
            hidden_size=v.get("hidden_size", 768),
            intermediate_size=v.get("intermediate_size", 3072),
            num_hidden_layers=v.get("num_hidden_layers", 12),
            num_attention_heads=v.get("num_attention_heads", 12),
            image_size=image_size,
            patch_size=v.get("patch_size", 16 if siglip else 32),
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"),
            text_hidden_size=text_hidden_size,
            image_token_id=int(token),
            feature_layers=tuple(layers) if isinstance(layers, list) else (int(layers),),
            select_strategy=hf.get("vision_feature_select_strategy", "default"),
            projector_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)),
            image_mean=tuple(float(x) for x in (mean if isinstance(mean, list | tuple) else [mean] * 3)),
            image_std=tuple(float(x) for x in (std if isinstance(std, list | tuple) else [std] * 3)),
            resize_shortest=size.get("shortest_edge") if p.get("do_resize", True) else None,
            resize_hw=(size["height"], size["width"]) if "height" in size and p.get("do_resize", True) else None,
            crop_hw=(crop["height"], crop["width"]) if crop and p.get("do_center_crop", True) else None,
            resample=int(p.get("resample", 3)),
            rescale_factor=float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 1.0,
            do_normalize=bool(p.get("do_normalize", True)),
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The llava keys of config.json (the caller adds text_config and the rest)."""
        v: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "torch_dtype": dtype,
        }
        if self.cls:
            v["projection_dim"] = self.text_hidden_size  # CLIPVisionModel ignores it; keeps readers happy
        else:
            v["vision_use_head"] = False
        layers = self.feature_layers
        return {
            "vision_config": v,
            "image_token_id": self.image_token_id,
            "image_token_index": self.image_token_id,  # transformers 4.x reads this name
            "image_seq_length": self.n_tokens,
            "vision_feature_layer": layers[0] if len(layers) == 1 else list(layers),
            "vision_feature_select_strategy": self.select_strategy,
            "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias,
        }

    def processor_hf(self) -> dict[str, Any]:
        """preprocessor_config.json for transformers' CLIPImageProcessor (SiglipImageProcessor)."""
        size = ({"shortest_edge": self.resize_shortest} if self.resize_shortest is not None
                else {"height": self.resize_hw[0], "width": self.resize_hw[1]} if self.resize_hw else None)
        out: dict[str, Any] = {
            "image_processor_type": "CLIPImageProcessor" if self.cls else "SiglipImageProcessor",
            "do_resize": size is not None,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.crop_hw is not None,
            "do_rescale": self.rescale_factor != 1.0,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }
        if self.crop_hw is not None:
            out["crop_size"] = {"height": self.crop_hw[0], "width": self.crop_hw[1]}
        return out


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
    vision: VisionConfig | None = None  # a LLaVA checkpoint's tower and projector

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
        if self.vision is not None and self.vision.text_hidden_size != self.hidden_size:
            msg = (f"the vision projector outputs {self.vision.text_hidden_size} features, the text "
                   f"model's hidden_size is {self.hidden_size}")
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
        vision = self.vision.num_params if self.vision else 0
        return self.vocab_size * E + self.num_hidden_layers * layer + E + head + vision

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], processor: dict[str, Any] | None = None) -> ModelConfig:
        """Read a Hugging Face config.json (Llama, Qwen2, Mistral; transformers v4 or v5 keys),
        or a LLaVA one (its text_config, with `vision` from the rest and `processor`, the
        checkpoint's preprocessor_config.json if it has one)."""
        if hf.get("model_type") == "llava":
            text = dict(hf.get("text_config") or {})
            text.setdefault("model_type", "llama")
            # transformers saves a sub-config's non-default keys only (llava-1.5's text_config
            # has 7): the rest are its class defaults
            text = {**_TEXT_DEFAULTS.get(text["model_type"], {}), **text}
            if "tie_word_embeddings" not in text and "tie_word_embeddings" in hf:
                text["tie_word_embeddings"] = hf["tie_word_embeddings"]
            cfg = cls.from_hf(text)
            return cfg.replace(vision=VisionConfig.from_hf(hf, cfg.hidden_size, processor))
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
        """A config.json that transformers (v4 and v5) loads as the same model (with `vision`:
        a LlavaForConditionalGeneration whose text_config is this model's)."""
        if self.vision is not None:
            text = self.replace(vision=None).to_hf(dtype)
            del text["architectures"]
            return {
                "architectures": ["LlavaForConditionalGeneration"],
                "model_type": "llava",
                "text_config": text,
                **self.vision.to_hf(dtype),
                "tie_word_embeddings": self.tie_word_embeddings,
                "torch_dtype": dtype,
            }
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


# tiny with a CLIP tower: 32x32 images in 8x8 patches, 16 image tokens each. image_token_id is
# the `<image>` token that init_model adds to the tokenizer after training it (the last id).
PRESETS["tiny-vl"] = PRESETS["tiny"].replace(vision=VisionConfig(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    text_hidden_size=PRESETS["tiny"].hidden_size,
    image_token_id=PRESETS["tiny"].vocab_size - 1,
    resize_shortest=32,
    crop_hw=(32, 32),
))

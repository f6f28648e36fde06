"""Images for a LLaVA-style model: the CLIP / SigLIP vision tower in JAX, the projector into the
text model's embedding space, and the image processing in front of them.

`preprocess(image, vcfg)` turns a PIL image or a uint8 array into pixels [3, H, W] float32 as
transformers' CLIPImageProcessor (PIL backend) does; `encode(params["vision"], vcfg, pixels)`
turns pixels [N, 3, H, W] into features [N, vcfg.n_tokens, text hidden size], the rows that
replace an image's placeholder tokens (`rows.Embeds`). Params (weights [in, out], layers
stacked on a leading L axis):

    patch [C*p*p, E] (the conv kernel, flattened in (C, p, p) order)  patch_b [E] (SigLIP)
    cls [E] (CLIP)  pos [positions, E]  pre_norm_w, pre_norm_b [E] (CLIP)
    post_norm_w, post_norm_b [E] (kept for saving; LLaVA reads hidden states before it)
    layers: ln1_w, ln1_b, ln2_w, ln2_b [L, E]  wq, wk, wv, wo [L, E, E]  bq, bk, bv, bo [L, E]
            fc1 [L, E, F]  fc1_b [L, F]  fc2 [L, F, E]  fc2_b [L, E]
    proj1 [E * len(feature_layers), T]  proj2 [T, T]  proj1_b, proj2_b [T] (with projector bias)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .compiles import counted_jit
from .config import VisionConfig
from .rows import Embeds

__all__ = ["digest", "embed_images", "encode", "encode_jit", "expand_image_tokens", "preprocess", "vision_shapes"]


def vision_shapes(vcfg: VisionConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(top-level shapes, per-layer shapes) of the params this config has."""
    E, F, C, p = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_channels, vcfg.patch_size
    T = vcfg.text_hidden_size
    top = {"patch": (C * p * p, E), "pos": (vcfg.n_patches + vcfg.cls, E),
           "post_norm_w": (E,), "post_norm_b": (E,),
           "proj1": (E * len(vcfg.feature_layers), T), "proj2": (T, T)}
    if vcfg.cls:
        top |= {"cls": (E,), "pre_norm_w": (E,), "pre_norm_b": (E,)}
    else:
        top["patch_b"] = (E,)
    if vcfg.projector_bias:
        top |= {"proj1_b": (T,), "proj2_b": (T,)}
    layers = {"ln1_w": (E,), "ln1_b": (E,), "wq": (E, E), "bq": (E,), "wk": (E, E), "bk": (E,),
              "wv": (E, E), "bv": (E,), "wo": (E, E), "bo": (E,), "ln2_w": (E,), "ln2_b": (E,),
              "fc1": (E, F), "fc1_b": (F,), "fc2": (F, E), "fc2_b": (E,)}
    return top, layers


def _act(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=name == "gelu_pytorch_tanh")


def _layer_norm(x, w, b, eps: float):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def encode(vp: dict, vcfg: VisionConfig, pixels):
    """pixels float32 [N, C, H, W] (from `preprocess`) -> features [N, vcfg.n_tokens, T] in the
    params' dtype: the tower's selected hidden states (CLS dropped under "default"), projected.
    Only the layers up to the deepest selected hidden state run. Jittable with vcfg static."""
    N = pixels.shape[0]
    C, S, p = vcfg.num_channels, vcfg.image_size, vcfg.patch_size
    if tuple(pixels.shape[1:]) != (C, S, S):
        msg = f"pixels have shape {tuple(pixels.shape)}, the vision tower takes [N, {C}, {S}, {S}] (see preprocess)"
        raise ValueError(msg)
    E, H = vcfg.hidden_size, vcfg.num_attention_heads
    D = E // H
    g = S // p
    dtype = vp["patch"].dtype
    # the stride-p conv as one matmul over non-overlapping patches, rows in raster order
    x = jnp.asarray(pixels).reshape(N, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(N, g * g, C * p * p)
    x = x.astype(dtype) @ vp["patch"]  # [N, P, E]
    if "patch_b" in vp:
        x = x + vp["patch_b"]
    if vcfg.cls:
        x = jnp.concatenate([jnp.broadcast_to(vp["cls"], (N, 1, E)).astype(dtype), x], axis=1)
    x = x + vp["pos"]
    if vcfg.cls:
        x = _layer_norm(x, vp["pre_norm_w"], vp["pre_norm_b"], vcfg.layer_norm_eps)
    Sx = x.shape[1]

    def layer(x, lp):
        h = _layer_norm(x, lp["ln1_w"], lp["ln1_b"], vcfg.layer_norm_eps)
        q = (h @ lp["wq"] + lp["bq"]).reshape(N, Sx, H, D)
        k = (h @ lp["wk"] + lp["bk"]).reshape(N, Sx, H, D)
        v = (h @ lp["wv"] + lp["bv"]).reshape(N, Sx, H, D)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(N, Sx, E)
        x = x + out @ lp["wo"] + lp["bo"]
        h = _layer_norm(x, lp["ln2_w"], lp["ln2_b"], vcfg.layer_norm_eps)
        x = x + _act(vcfg.hidden_act, h @ lp["fc1"] + lp["fc1_b"]) @ lp["fc2"] + lp["fc2_b"]
        return x, x

    n = vcfg.layers_run
    hidden = [x]
    if n:
        run = jax.tree.map(lambda a: a[:n], vp["layers"])
        _, outs = jax.lax.scan(layer, x, run)  # outs [n, N, Sx, E]: the state after each layer
        hidden += [outs[i] for i in range(n)]
    L1 = vcfg.num_hidden_layers + 1
    picked = [hidden[i % L1] for i in vcfg.feature_layers]
    if vcfg.select_strategy == "default":  # as transformers: drop position 0 (CLIP's CLS)
        picked = [h[:, 1:] for h in picked]
    feats = jnp.concatenate(picked, axis=-1)
    y = feats @ vp["proj1"]
    if "proj1_b" in vp:
        y = y + vp["proj1_b"]
    y = _act(vcfg.projector_act, y) @ vp["proj2"]
    if "proj2_b" in vp:
        y = y + vp["proj2_b"]
    return y


encode_jit = counted_jit(encode, "vision", static_argnums=1)


def preprocess(image: Any, vcfg: VisionConfig) -> np.ndarray:
    """A PIL image, or a uint8 array [H, W] / [H, W, 3] / [H, W, 4] -> float32 [3, S, S] as
    transformers' CLIPImageProcessor (PIL backend) makes it: transparency composited onto white,
    RGB, resized (shortest edge, or to a fixed size) with the checkpoint's resampling, center
    cropped, rescaled, normalised."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        ok = image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)))
        if not ok:
            msg = (f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {image.dtype} "
                   f"{list(image.shape)}")
            raise ValueError(msg)
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        msg = f"an image must be a PIL image or a uint8 numpy array, not {type(image).__name__}"
        raise TypeError(msg)
    w, h = image.size
    if w < 1 or h < 1:
        msg = f"the image is empty ({w}x{h} pixels)"
        raise ValueError(msg)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")

    if vcfg.resize_hw is not None:
        oh, ow = vcfg.resize_hw
    elif vcfg.resize_shortest is not None:  # transformers' get_resize_output_image_size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = vcfg.resize_shortest, int(vcfg.resize_shortest * long / short)
        oh, ow = (new_long, new_short) if w <= h else (new_short, new_long)
    else:
        oh, ow = h, w
    if (oh, ow) != (h, w):
        image = image.resize((ow, oh), resample=vcfg.resample)
    arr = np.array(image)  # [H, W, 3] uint8
    if vcfg.crop_hw is not None:
        ch, cw = vcfg.crop_hw
        if oh < ch or ow < cw:
            msg = f"the image resized to {oh}x{ow} is smaller than the {ch}x{cw} crop"
            raise ValueError(msg)
        top, left = (oh - ch) // 2, (ow - cw) // 2
        arr = arr[top : top + ch, left : left + cw]
    x = (arr.astype(np.float64) * vcfg.rescale_factor).astype(np.float32)
    if vcfg.do_normalize:
        mean, std = np.array(vcfg.image_mean, np.float32), np.array(vcfg.image_std, np.float32)
        x = (x - mean) / std
    x = np.ascontiguousarray(x.transpose(2, 0, 1))
    S = vcfg.image_size
    if x.shape != (3, S, S):
        msg = f"the processed image is {x.shape[1]}x{x.shape[2]}, the tower takes {S}x{S}"
        raise ValueError(msg)
    return x


def digest(pixels: np.ndarray) -> str:
    """A name for an image's content (rows.Embeds.digest): the hash of its processed pixels."""
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(pixels, np.float32).tobytes(), digest_size=16).hexdigest()


def expand_image_tokens(ids: list[int], vcfg: VisionConfig) -> tuple[list[int], list[int]]:
    """A tokenized prompt with one image token per image -> (the prompt with each repeated
    n_tokens times, as LlavaProcessor expands it, and each image's first position)."""
    out, starts = [], []
    for t in ids:
        if t == vcfg.image_token_id:
            starts.append(len(out))
            out += [t] * vcfg.n_tokens
        else:
            out.append(t)
    return out, starts


def embed_images(vp: dict, vcfg: VisionConfig, images: list[Any], starts: list[int]) -> list[Embeds]:
    """Preprocess and encode images (one tower call) -> the Embeds of a GenRequest, image i at
    prompt position starts[i] (see expand_image_tokens), each named by its pixels' digest."""
    if len(images) != len(starts):
        msg = f"{len(images)} images for {len(starts)} image positions in the prompt"
        raise ValueError(msg)
    if not images:
        return []
    pixels = np.stack([preprocess(im, vcfg) for im in images])
    feats = np.asarray(encode_jit(vp, vcfg, pixels))
    return [Embeds(s, feats[i], digest(pixels[i])) for i, s in enumerate(starts)]

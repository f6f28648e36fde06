"""Images in the JAX engine against transformers (PyTorch CPU) on tiny random LLaVA checkpoints.

`init-model --preset tiny-vl` writes a checkpoint LlavaForConditionalGeneration loads; the
vision tower + projector (vision.encode) equal transformers' get_image_features for CLIP and
SigLIP towers, one or several feature layers, either select strategy, Llama or Qwen2 text and
transformers 5 or 4.x tensor names; preprocessing equals the CLIP / SigLIP image processors;
greedy generation with an image equals LlavaForConditionalGeneration.generate, and sessions
reuse an image's cached K/V only for the same image.
"""

from __future__ import annotations

import json
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from ponder.cli import app
from ponder.inference.jax import checkpoint, vision
from ponder.inference.jax.compiles import TRACES
from ponder.inference.jax.config import PRESETS
from ponder.inference.jax.generate import Generator
from ponder.inference.jax.rows import Embeds, GenRequest

TINY_VL = PRESETS["tiny-vl"]
# vision variants: (name, config changes) on top of tiny-vl
VARIANTS = {
    "clip": {},
    "clip-full-two-layers": {"feature_layers": (-1, 1), "select_strategy": "full", "projector_bias": False,
                             "projector_act": "gelu_pytorch_tanh"},
    "siglip-qwen2": {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "feature_layers": (-1,),
                     "select_strategy": "full", "layer_norm_eps": 1e-6, "image_mean": (0.5,) * 3,
                     "image_std": (0.5,) * 3, "resize_shortest": None, "resize_hw": (32, 32), "crop_hw": None},
}


def _variant(name: str):
    cfg = TINY_VL.replace(vision=replace(TINY_VL.vision, **VARIANTS[name]))
    if name.endswith("qwen2"):
        cfg = cfg.replace(model_type="qwen2", attention_bias=True, tie_word_embeddings=False)
    return cfg


def _random_params(cfg, seed):
    """std 0.1 and norms away from 1, so a misplaced weight shows in the outputs."""
    params = checkpoint.init_params(cfg, seed=seed, std=0.1)
    rng = np.random.default_rng(seed)

    def jitter(tree):
        return {k: jitter(v) if isinstance(v, dict) else
                (jnp.asarray(1 + 0.1 * rng.standard_normal(v.shape), v.dtype) if "norm" in k or k.startswith("ln")
                 and k.endswith("_w") else v) for k, v in tree.items()}

    return jitter(params)


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava(request, tmp_path_factory):
    """(name, path, our cfg, our params, transformers model) per vision variant."""
    cfg = _variant(request.param)
    path = tmp_path_factory.mktemp(request.param)
    checkpoint.save(path, cfg, _random_params(cfg, seed=len(request.param)))
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    loaded_cfg, params = checkpoint.load(path)
    assert loaded_cfg == cfg
    return request.param, path, cfg, params, hf.eval()


def _pixels(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _hf_features(hf, pixels):
    with torch.no_grad():
        out = hf.get_image_features(torch.tensor(pixels)).pooler_output
    return torch.stack(list(out)).numpy()


def test_init_model_tiny_vl_is_a_llava_checkpoint(tmp_path):
    path = tmp_path / "vl"
    result = CliRunner().invoke(app, ["init-model", str(path), "--preset", "tiny-vl", "--seed", "0"])
    assert result.exit_code == 0, result.output
    hf_cfg = json.loads((path / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == TINY_VL.vocab_size - 1
    assert tok("a<image><image>b")["input_ids"][1:3] == [image_id, image_id]
    assert hf_cfg["model_type"] == "llava" and hf_cfg["text_config"]["model_type"] == "llama"
    assert hf_cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert (hf_cfg["image_token_id"], hf_cfg["image_token_index"]) == (image_id, image_id)
    assert (hf_cfg["vision_feature_layer"], hf_cfg["vision_feature_select_strategy"]) == (-2, "default")
    assert (hf_cfg["projector_hidden_act"], hf_cfg["multimodal_projector_bias"]) == ("gelu", True)

    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    cfg, params = checkpoint.load(path)
    assert cfg == TINY_VL and cfg.vision.n_tokens == 16 == hf_cfg["image_seq_length"]
    feats = np.asarray(vision.encode_jit(params["vision"], cfg.vision, _pixels(2)))
    assert feats.shape == (2, 16, cfg.hidden_size)
    np.testing.assert_allclose(feats, _hf_features(hf.eval(), _pixels(2)), atol=1e-5, rtol=0)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(path)
    assert (processor.size["shortest_edge"], processor.crop_size["height"]) == (32, 32)


def test_encode_matches_get_image_features(llava):
    name, _, cfg, params, hf = llava
    px = _pixels(3, seed=1)
    ref = _hf_features(hf, px)
    ours = np.asarray(vision.encode_jit(params["vision"], cfg.vision, px))
    assert ours.shape == ref.shape == (3, cfg.vision.n_tokens, cfg.hidden_size)
    assert np.abs(ref).max() > 0.5  # not vacuous
    err = float(np.abs(ours - ref).max())
    print(f"{name}: features max abs err {err:.2e}")
    assert err < 1e-4


def test_transformers4_names_load_the_same(llava, tmp_path):
    """4.x LLaVA checkpoints name the tensors language_model.model.*, language_model.lm_head,
    vision_tower.*, multi_modal_projector.*"""
    _, path, cfg, params, _ = llava
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))
    old = {}
    for k, t in load_file(path / "model.safetensors").items():
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        old[k] = t
    assert not any(k.startswith("model.") for k in old)
    save_file(old, tmp_path / "model.safetensors")
    for f in ("config.json", "preprocessor_config.json"):
        (tmp_path / f).write_text((path / f).read_text())
    cfg4, params4 = checkpoint.load(tmp_path)
    assert cfg4 == cfg
    leaves = zip(*(sorted(_flat(p).items()) for p in (params, params4)))
    for (k, a), (k4, b) in leaves:
        assert k == k4 and np.array_equal(np.asarray(a), np.asarray(b)), k


def _flat(tree, pre=""):
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{pre}{k}.") if isinstance(v, dict) else {pre + k: v}
    return out


def _images():
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)  # landscape, odd sizes: resize then crop
    rgba = rng.integers(0, 256, (50, 37, 4), dtype=np.uint8)  # transparency composited on white
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)  # upscaled
    return {"rgb-array": rgb, "rgb-pil": Image.fromarray(rgb), "rgba": Image.fromarray(rgba),
            "gray": Image.fromarray(gray), "palette": Image.fromarray(rgb).convert("P")}


@pytest.mark.parametrize("name", ["clip", "siglip-qwen2"])
def test_preprocess_matches_image_processor(name, tmp_path):
    vcfg = _variant(name).vision
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(vcfg.processor_hf()))
    kind = transformers.CLIPImageProcessorPil if vcfg.cls else transformers.SiglipImageProcessorPil
    processor = kind.from_pretrained(tmp_path)
    for label, image in _images().items():
        ref = processor(images=[image], return_tensors="np")["pixel_values"][0]
        ours = vision.preprocess(image, vcfg)
        assert ours.shape == ref.shape == (3, 32, 32) and ours.dtype == np.float32, label
        assert np.abs(ours - ref).max() < 1e-5, label


def test_bad_images_get_clear_errors():
    vcfg = TINY_VL.vision
    with pytest.raises(ValueError, match=r"^an image array must be uint8 \[H, W\], \[H, W, 3\] or \[H, W, 4\]; "
                                         r"got float32 \[8, 8, 3\]$"):
        vision.preprocess(np.zeros((8, 8, 3), np.float32), vcfg)
    with pytest.raises(ValueError, match=r"got uint8 \[8, 8, 2\]$"):
        vision.preprocess(np.zeros((8, 8, 2), np.uint8), vcfg)
    with pytest.raises(TypeError, match="^an image must be a PIL image or a uint8 numpy array, not list$"):
        vision.preprocess([[0]], vcfg)
    with pytest.raises(ValueError, match=r"^the image is empty \(0x5 pixels\)$"):
        vision.preprocess(Image.new("RGB", (0, 5)), vcfg)
    with pytest.raises(ValueError, match=r"^pixels have shape \(1, 3, 28, 28\), the vision tower takes "
                                         r"\[N, 3, 32, 32\] \(see preprocess\)$"):
        vision.encode(checkpoint.init_params(TINY_VL)["vision"], vcfg, np.zeros((1, 3, 28, 28), np.float32))


# --- generation ------------------------------------------------------------------------------

MAX_NEW = 8


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    cfg = _variant("clip")
    path = tmp_path_factory.mktemp("gen")
    checkpoint.save(path, cfg, _random_params(cfg, seed=11))
    cfg, params = checkpoint.load(path)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as ignore_eos does here
    hf.generation_config.pad_token_id = 0
    # chunks of 8 tokens: the image (16 positions from 5) spans three prefill chunks
    gen = Generator(cfg, params, eos_ids=(), max_batch=2, batch_buckets=(1, 2), seq_buckets=(64,),
                    chunk_buckets=(8,), page_size=16, device_bytes=1 << 20, host_bytes=1 << 20)
    return cfg, params, hf, gen


def _prompt(cfg, start=5, after=6):
    rng = np.random.default_rng(3)
    text = rng.integers(3, cfg.vocab_size - 1, start + after).tolist()
    return text[:start] + [cfg.vision.image_token_id] * cfg.vision.n_tokens + text[start:]


def _hf_generate(hf, prompt, pixels):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(pixels),
                          max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def _request(cfg, params, prompt, pixels, session="s"):
    feats = np.asarray(vision.encode_jit(params["vision"], cfg.vision, pixels))[0]
    e = Embeds(prompt.index(cfg.vision.image_token_id), feats, vision.digest(pixels))
    return GenRequest(session, prompt, MAX_NEW, ignore_eos=True, embeds=[e])


def test_generate_with_an_image_equals_transformers_and_reuses_the_session(clip_llava):
    cfg, params, hf, gen = clip_llava
    prompt, a, b = _prompt(cfg), _pixels(1, seed=21), _pixels(1, seed=22)
    want_a, want_b = _hf_generate(hf, prompt, a), _hf_generate(hf, prompt, b)
    assert want_a != want_b  # the image matters

    first = gen.generate([_request(cfg, params, prompt, a)])[0]
    assert (first.error, first.tokens, first.cached_tokens) == (None, want_a, 0)
    again = gen.generate([_request(cfg, params, prompt, a)])[0]  # the whole prompt but its last token is cached
    assert (again.tokens, again.cached_tokens) == (want_a, len(prompt) - 1)
    other = gen.generate([_request(cfg, params, prompt, b)])[0]  # another image: only the text before it
    assert (other.tokens, other.cached_tokens) == (want_b, prompt.index(cfg.vision.image_token_id))


def test_text_requests_never_trace_the_embeds_prefill(clip_llava):
    cfg, _, hf, gen = clip_llava
    prompt = np.random.default_rng(5).integers(3, cfg.vocab_size - 1, 20).tolist()
    before = TRACES["prefill_embeds"]
    res = gen.generate([GenRequest(None, prompt, MAX_NEW, ignore_eos=True)])[0]
    assert TRACES["prefill_embeds"] == before
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
    assert res.tokens == out[0, len(prompt):].tolist()


def test_image_prompts_after_warmup_trace_nothing(clip_llava, tmp_path):
    """warmup_embeds traces the image prefill at every shape the plain warmup covers; then a
    request with an image (its prompt built by expand_image_tokens, its embeddings by
    embed_images) compiles nothing, and gets the tokens transformers generates from the same
    processed pixels."""
    from ponder.inference.jax.join import warmup_embeds

    cfg, params, hf, gen = clip_llava
    image = np.random.default_rng(9).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    img = cfg.vision.image_token_id
    prompt, starts = vision.expand_image_tokens([7, 8, img, 9, img, 10], cfg.vision)
    assert (len(prompt), starts) == (4 + 2 * 16, [2, 19])
    assert prompt[2:18] == [img] * 16 and prompt[19:35] == [img] * 16 and prompt[35] == 10
    embeds = vision.embed_images(params["vision"], cfg.vision, [image, Image.fromarray(image)], starts)
    assert [e.start for e in embeds] == starts and embeds[0].digest == embeds[1].digest
    pixels = vision.preprocess(image, cfg.vision)[None]
    alone = np.asarray(vision.encode_jit(params["vision"], cfg.vision, pixels))[0]
    for e in embeds:  # encoded together, so equal only to float rounding
        np.testing.assert_allclose(e.features, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="^1 images for 2 image positions in the prompt$"):
        vision.embed_images(params["vision"], cfg.vision, [image], starts)

    gen.warmup(sampling=(False,), page_moves=True)
    warmup_embeds(gen)
    before = gen.compiles
    res = gen.generate([GenRequest("w", prompt, MAX_NEW, ignore_eos=True, embeds=embeds)])[0]
    assert gen.compiles == before
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          pixel_values=torch.tensor(np.concatenate([pixels, pixels])), max_new_tokens=MAX_NEW)
    assert res.tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("text_type", ["llama", "qwen2", "mistral"])
def test_a_sparse_llava_config_reads_transformers_defaults(text_type):
    """transformers writes only a sub-config's non-default keys (llava-1.5's text_config has 7,
    its vision_config 9): the missing ones are those of the text model's config class."""
    from ponder.inference.jax.config import ModelConfig

    vision_cfg = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
    sparse = {"model_type": "llava", "image_token_index": 32000, "vision_config": vision_cfg,
              "text_config": {"model_type": text_type, "vocab_size": 32064}}
    full = transformers.LlavaConfig(**{k: v for k, v in sparse.items() if k != "model_type"}).to_dict()
    assert full["text_config"]["hidden_size"] == 4096  # filled in by transformers
    ours, want = ModelConfig.from_hf(sparse), ModelConfig.from_hf(full)
    assert ours == want and ours.vocab_size == 32064
    assert (ours.vision.image_token_id, ours.vision.n_tokens, ours.vision.feature_layers) == (32000, 4, (-2,))

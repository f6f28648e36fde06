"""Export a checkpoint (config.json, safetensors, tokenizer.json) as one GGUF file for llama.cpp.

Every ponder model (Llama, Qwen2, Mistral configs) is written as GGUF architecture "llama": its
loader takes optional q/k/v/o biases, a head size other than hidden/heads, GQA, a missing
`output.weight` (tied embeddings: it reuses `token_embd.weight`) and per-frequency RoPE
divisors (`rope_freqs.weight`), so one mapping covers them all. ("qwen2" would need no
permutation, but in llama.cpp it requires heads * head_dim == hidden and has no o_proj bias
and no rope_freqs.)

Tensors (GGUF name <- HF name; ponder keeps Linear weights [in, out], GGUF as HF [out, in]):

    token_embd.weight              <- model.embed_tokens.weight [V, E]
    output_norm.weight             <- model.norm.weight
    output.weight                  <- lm_head.weight (only when untied)
    rope_freqs.weight [D/2]        <- default / scaled inverse frequencies (linear, llama3 only)
    blk.{i}.attn_norm.weight       <- model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_q.weight / .bias  <- self_attn.q_proj, rows permuted (see `_interleave`)
    blk.{i}.attn_k.weight / .bias  <- self_attn.k_proj, rows permuted
    blk.{i}.attn_v.weight / .bias  <- self_attn.v_proj
    blk.{i}.attn_output.weight / .bias <- self_attn.o_proj
    blk.{i}.ffn_norm.weight        <- post_attention_layernorm.weight
    blk.{i}.ffn_gate / ffn_up / ffn_down.weight <- mlp.gate_proj / up_proj / down_proj

Why the permutation: ponder (like transformers) rotates the two halves of each head
(rotate_half, llama.cpp's "NEOX" RoPE); llama.cpp's "llama" rotates adjacent pairs. Reordering
each head's q and k rows from [x0..x(D/2-1), y0..] to [x0, y0, x1, y1, ...] makes the two
identical, as convert_hf_to_gguf.py does. Scores q.k are unchanged (same permutation on both).

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) model: the tokenizer.json
vocabulary strings, its merges, token types (special added tokens are CONTROL, so llama.cpp
parses them in text only when asked to), ids past the tokenizer padded with unused "[PADn]"
tokens up to the embedding's rows, and `tokenizer.ggml.pre` naming llama.cpp's pre-tokenizer
whose regex is the one tokenizer.json uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import load
from .config import ModelConfig
from .model import rope_frequencies
from .tokenizer import Tokenizer

__all__ = ["DTYPES", "export_gguf"]

DTYPES = ("f32", "f16")

# tokenizer.json pre-tokenizer regex -> llama.cpp's name for the same split (llama-vocab.cpp)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (  # Qwen2's, but digits in runs of up to three
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {_GPT2_REGEX: "gpt-2", _QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> ModelConfig:
    """Write the checkpoint in `model_dir` to `out` as GGUF (matrices in `dtype`; norms, biases
    and rope_freqs stay f32, as llama.cpp expects). Raises ValueError for a directory that is
    not a checkpoint and NotImplementedError for what llama.cpp's "llama" cannot express;
    both before `out` is created."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            msg = f"{model_dir} is not a checkpoint directory: {name} is missing"
            raise ValueError(msg)
    if dtype not in DTYPES:
        msg = f"dtype {dtype!r} is not one of {DTYPES}"
        raise ValueError(msg)
    cfg, params = load(model_dir, "float32")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        msg = f"sliding_window={cfg.sliding_window} cannot be exported: llama.cpp's llama has none"
        raise NotImplementedError(msg)
    freqs = _rope_freqs(cfg)
    tk = Tokenizer.from_dir(model_dir)
    pre, tokens, types, merges = _vocab(tk, cfg)

    w = gguf.GGUFWriter(out, "llama")
    w.add_name(model_dir.resolve().name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos_text = tk.special_tokens.get("eos_token")  # the chat's end (<|im_end|>), else config's
    eos = tk.token_to_id(eos_text) if eos_text else None
    eos = eos if eos is not None else next(iter(cfg.eos_token_id), None)
    for add_id, i in ((w.add_bos_token_id, cfg.bos_token_id), (w.add_eos_token_id, eos),
                      (w.add_pad_token_id, cfg.pad_token_id)):
        if i is not None:
            add_id(i)
    # ponder never prepends BOS (chat templates carry their own), so llama.cpp must not either
    w.add_add_bos_token(False)
    if tk.chat_template:
        w.add_chat_template(tk.chat_template)

    def add(name: str, t, matrix: bool = True) -> None:
        t = np.ascontiguousarray(np.asarray(t, np.float32))
        w.add_tensor(name, t.astype(np.float16) if matrix and dtype == "f16" else t)

    add("token_embd.weight", params["embed"])
    add("output_norm.weight", params["norm"], matrix=False)
    if not cfg.tie_word_embeddings:
        add("output.weight", np.asarray(params["lm_head"]).T)
    if freqs is not None:
        add("rope_freqs.weight", freqs, matrix=False)
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    lay = {k: np.asarray(v) for k, v in params["layers"].items()}  # [L, ...], weights [in, out]
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}"
        add(f"{b}.attn_norm.weight", lay["attn_norm"][i], matrix=False)
        add(f"{b}.attn_q.weight", _interleave(lay["wq"][i].T, Hq))
        add(f"{b}.attn_k.weight", _interleave(lay["wk"][i].T, Hkv))
        add(f"{b}.attn_v.weight", lay["wv"][i].T)
        add(f"{b}.attn_output.weight", lay["wo"][i].T)
        if "bq" in lay:
            add(f"{b}.attn_q.bias", _interleave(lay["bq"][i], Hq), matrix=False)
            add(f"{b}.attn_k.bias", _interleave(lay["bk"][i], Hkv), matrix=False)
            add(f"{b}.attn_v.bias", lay["bv"][i], matrix=False)
        if "bo" in lay:
            add(f"{b}.attn_output.bias", lay["bo"][i], matrix=False)
        add(f"{b}.ffn_norm.weight", lay["mlp_norm"][i], matrix=False)
        add(f"{b}.ffn_gate.weight", lay["w_gate"][i].T)
        add(f"{b}.ffn_up.weight", lay["w_up"][i].T)
        add(f"{b}.ffn_down.weight", lay["w_down"][i].T)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg


def _interleave(t: np.ndarray, heads: int) -> np.ndarray:
    """Rows [heads * D, ...] in halves-per-head order -> adjacent-pair order (see module doc)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    """llama.cpp divides each RoPE frequency by rope_freqs[i]: default / scaled reproduces
    linear and llama3 scaling exactly. YaRN also scales cos/sin, which rope_freqs cannot say."""
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind in ("default", "dynamic"):  # dynamic is plain RoPE in ponder (see rope_frequencies)
        return None
    if kind not in ("linear", "llama3"):
        msg = f"rope_scaling type {kind!r} cannot be exported to GGUF (supported: linear, llama3)"
        raise NotImplementedError(msg)
    default, _ = rope_frequencies(cfg.replace(rope_scaling=None))
    scaled, _ = rope_frequencies(cfg)
    return (default / scaled).astype(np.float32)


def _vocab(tk: Tokenizer, cfg: ModelConfig) -> tuple[str, list[str], list[int], list[str]]:
    """(pre-tokenizer name, one token per embedding row, their types, merges) for llama.cpp."""
    import gguf

    spec = json.loads(tk.tk.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise NotImplementedError("only byte-level BPE tokenizers can be exported to GGUF")
    if tk.vocab_size > cfg.vocab_size:
        msg = f"the tokenizer has {tk.vocab_size} tokens but the embedding only {cfg.vocab_size} rows"
        raise ValueError(msg)
    by_id = {i: t for t, i in tk.tk.get_vocab(with_added_tokens=True).items()}
    added = tk.tk.get_added_tokens_decoder()  # {id: AddedToken}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (Qwen2.5 has 271 of them)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # CONTROL: llama.cpp parses its text only with special=True
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return _pre_tokenizer(spec.get("pre_tokenizer")), tokens, types, merges


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for tokenizer.json's: ByteLevel with its own (GPT-2)
    regex, or a Split on a known regex followed by ByteLevel without one."""
    steps = [] if pre is None else pre.get("pretokenizers", [pre])
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    regexes += [_GPT2_REGEX for s in byte_level if s.get("use_regex", True)]
    prefix_space = any(s.get("add_prefix_space") for s in byte_level)
    if len(regexes) == 1 and regexes[0] in _PRE_TOKENIZERS and not prefix_space:
        return _PRE_TOKENIZERS[regexes[0]]
    msg = f"no llama.cpp pre-tokenizer is known to match this tokenizer.json's: {json.dumps(pre)}"
    raise NotImplementedError(msg)

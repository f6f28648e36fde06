"""Tokenizer: tokenizer.json through `tokenizers`, the chat template through jinja2.

Also trains the byte-level BPE that `checkpoint.init_model` ships with its random checkpoints,
on synthetic telemetry, JSON decisions and English-ish text generated here from a seed.
"""

from __future__ import annotations

import json
import random
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["Tokenizer", "train_bpe", "write_tokenizer_files", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2

# Qwen2's chat template (without tools), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache
def _compile(template: str):
    """The environment transformers renders chat templates in (utils/chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: no HTML escaping, options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts
    return value.get("content") if isinstance(value, dict) else value


@lru_cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted: vocab character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json, templates."""

    def __init__(self, tk: tokenizers.Tokenizer, config: dict[str, Any], eos_token_ids: tuple[int, ...]):
        self.tk = tk
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.chat_template: str | None = config.get("chat_template")
        self.special_tokens = {a: t for a in _SPECIAL_ATTRS if (t := _token_text(config.get(a))) is not None}
        added = tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").exists():  # transformers v5 layout
            template = (path / "chat_template.jinja").read_text()
        config["chat_template"] = template

        # eos: generation_config.json, then config.json, then the tokenizer's eos_token
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            ids = _read_json(path / name).get("eos_token_id")
            eos += ids if isinstance(ids, list) else [] if ids is None else [ids]
        if (text := _token_text(config.get("eos_token"))) and tk.token_to_id(text) is not None:
            eos.append(tk.token_to_id(text))
        return cls(tk, config, tuple(dict.fromkeys(eos)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's embedding may have more rows)."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text in it (e.g. "<|im_end|>") becomes that token,
        as in transformers. No BOS is added by default: a rendered chat already carries its own."""
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` does:
        same jinja environment, None-valued message keys dropped, the special tokens
        (bos_token, eos_token, ...) and `kwargs` (tools, documents, ...) as template variables.

        Unlike transformers v5 with `sanitize_control_tokens=True`, text that spells a control
        token (e.g. "<|im_end|>" inside an event payload) is rendered as is and later encodes as
        that token: escape untrusted content before it reaches a template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )

    def vocab(self) -> list[bytes]:
        """Token id -> the bytes it stands for. Special and added tokens give their text in UTF-8;
        ids with no token give b"". Byte-level BPE (GPT-2/Llama 3/Qwen) and SentencePiece-style
        vocabularies (Llama 2/Mistral: "▁" for space, "<0xNN>" byte fallback) are understood."""
        spec = json.loads(self.tk.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        byte_map = _byte_decoder()
        out = [b""] * (max(self.tk.get_vocab(with_added_tokens=True).values()) + 1)
        for token, i in self.tk.get_vocab(with_added_tokens=False).items():
            if byte_level:
                known = all(c in byte_map for c in token)
                out[i] = bytes(byte_map[c] for c in token) if known else token.encode()
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("▁", " ").encode()
        for i, t in self.tk.get_added_tokens_decoder().items():
            out[i] = t.content.encode()
        return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


# --- training the tokenizer for random checkpoints ---------------------------------------------

_WORDS = (
    "the a an of to in and or for on with at by from is are was be has have not no this that it "
    "device sensor reading value temperature vibration pressure humidity level rate drift spike "
    "stuck dropout shift window mean baseline deviation alert warning normal anomaly incident "
    "escalate ignore observe notify throttle restart inspect schedule maintenance operator "
    "rising falling stable above below within expected unexpected since last hour minute second "
    "because therefore however while after before during until high low medium critical minor "
    "summary context event events decision action severity reason confidence evidence model "
    "pump motor valve fan compressor boiler line station site zone north south east west"
).split()
_FIELDS = ("temperature", "vibration", "pressure", "humidity")
_ACTIONS = ("ignore", "observe", "notify", "escalate", "inspect", "restart")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
    return " ".join(words).capitalize() + rng.choice(".?!.")


def _line(rng: random.Random) -> str:
    key = f"{rng.choice(('device', 'sensor', 'pump', 'line'))}-{rng.randint(0, 9999):04d}"
    kind = rng.randrange(5)
    if kind == 0:
        fields = rng.sample(_FIELDS, rng.randint(1, 4))
        values = {f: round(rng.uniform(-50, 150), rng.randint(0, 3)) for f in fields}
        return json.dumps({"key": key, "ts": round(rng.uniform(1.6e9, 1.8e9), 3), **values})
    if kind == 1:
        decision = {
            "action": rng.choice(_ACTIONS),
            "severity": rng.choice(("low", "medium", "high", "critical")),
            "reason": _sentence(rng),
            "confidence": round(rng.random(), 2),
        }
        return json.dumps(decision, indent=rng.choice((None, 2)))
    if kind == 2:
        h, m, s = rng.randrange(24), rng.randrange(60), rng.randrange(60)
        f = rng.choice(_FIELDS)
        value, mean, z = rng.uniform(-50, 150), rng.uniform(0, 100), rng.gauss(0, 3)
        return f"{h:02d}:{m:02d}:{s:02d} {key} {f}={value:.2f} (mean {mean:.1f}, z={z:+.2f})"
    if kind == 3:
        return " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    # a little of everything else: punctuation, accents, Cyrillic
    ranges = ((32, 126), (160, 0x2FF), (0x400, 0x4FF))
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(5, 40)))


def corpus(seed: int, n_lines: int = 20_000):
    """Deterministic training text: telemetry, decisions, event lines and prose."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        yield _line(rng)


def train_bpe(vocab_size: int, seed: int = 0, n_lines: int = 20_000) -> tokenizers.Tokenizer:
    """A byte-level BPE with SPECIAL_TOKENS at ids 0..2 and all 256 bytes, so any text encodes.
    The trained vocabulary can come out smaller than `vocab_size` when the text runs out of pairs."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus(seed, n_lines), trainer=trainer)
    return tk


def write_tokenizer_files(path: str | Path, tk: tokenizers.Tokenizer, model_max_length: int) -> None:
    """tokenizer.json and a Qwen-style tokenizer_config.json that transformers' AutoTokenizer loads."""
    path = Path(path)
    tk.save(str(path / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(tk.token_to_id(t)): {"content": t, **flags} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

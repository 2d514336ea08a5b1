"""Tokenizer, chat template and streaming detokenization.

Hugging Face directories bring a `tokenizer.json`, which the `tokenizers` library reads as is. A
GGUF brings its vocabulary and merges as metadata; we rebuild the same byte-level BPE from them,
with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`. Chat templates are rendered with
jinja2 the way transformers renders them (sandboxed, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from shoal.weights.errors import ModelFileError

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: set[int],
        add_bos: bool = False,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            # A base model without a template: the conversation as plain text.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # As transformers does: the template writes any BOS itself, so none is added here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # -- construction

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise ModelFileError(path, "no tokenizer.json in the model directory")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelFileError(tj, f"unreadable tokenizer.json ({e})") from None
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        model_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        eos_ids = _as_id_set(model_cfg.get("eos_token_id"))
        gen_cfg = path / "generation_config.json"
        if gen_cfg.exists():
            eos_ids |= _as_id_set(json.loads(gen_cfg.read_text()).get("eos_token_id"))
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.add(backend.token_to_id(eos))
        add_bos = bool(cfg.get("add_bos_token", False))
        return cls(backend, template, bos, eos, eos_ids, add_bos)

    @classmethod
    def from_gguf(cls, ckpt) -> "Tokenizer":
        model = ckpt.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelFileError(ckpt.path, f"GGUF tokenizer type {model!r} is not supported yet (byte-level BPE 'gpt2' is)")
        tokens: list[str] = ckpt.field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in ckpt.field("tokenizer.ggml.merges")]
        types = ckpt.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
        pre = ckpt.metadata.get("tokenizer.ggml.pre", "default")
        if pre in _SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        elif pre == "smollm":  # llama.cpp: one pre-token per digit, then GPT-2's split
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens(specials)
        md = ckpt.metadata

        def tok(key):
            i = md.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eos_ids = {md["tokenizer.ggml.eos_token_id"]} if "tokenizer.ggml.eos_token_id" in md else set()
        if "tokenizer.ggml.eot_token_id" in md:
            eos_ids.add(md["tokenizer.ggml.eot_token_id"])
        # Chat models end a turn with their template's end marker, often not the file's EOS.
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            if marker in vocab and types[vocab[marker]] == _CONTROL:
                eos_ids.add(vocab[marker])
        return cls(
            backend,
            md.get("tokenizer.chat_template"),
            tok("tokenizer.ggml.bos_token_id"),
            tok("tokenizer.ggml.eos_token_id"),
            eos_ids,
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
        )


class StreamingDetokenizer:
    """Turns tokens into text one at a time, never emitting half a UTF-8 character.

    Decodes a short window (from the last emitted boundary) rather than the whole text each step,
    and holds text back while the window ends in a replacement character (an incomplete byte run)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens before this are emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self._decode
        before = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def flush(self) -> str:
        decode = self._decode
        text = decode(self.ids[self.prefix :])
        before = decode(self.ids[self.prefix : self.read])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


def _as_id_set(x) -> set[int]:
    if x is None:
        return set()
    return set(x) if isinstance(x, list) else {int(x)}

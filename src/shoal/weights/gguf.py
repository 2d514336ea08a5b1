"""GGUF checkpoints: llama.cpp's single-file format.

The file is memory-mapped by the `gguf` package's reader; a tensor's bytes are touched only when a
shard asks for it, so a stage holding layers [a, b) reads only those. This module renames GGUF
tensors to the Hugging Face names the model files use, turns GGUF metadata into config.json keys,
and undoes the one layout change llama.cpp's converter makes (the q/k row permutation of the llama
architecture, which switches RoPE to the interleaved layout).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from shoal.quant.formats import QuantizedWeight, from_gguf
from shoal.weights.errors import ModelFileError
from shoal.weights.gguf_file import GGUFFile, GGUFFormatError

# GGUF tensor name (per block) -> Hugging Face name.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


class GGUFCheckpoint:
    """A GGUF file opened lazily. `config` uses config.json keys; `load(names)` reads only those."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_header(self.path)
        try:
            self._file = GGUFFile(self.path)
        except GGUFFormatError as e:
            raise ModelFileError(self.path, str(e)) from None
        except (OSError, ValueError, struct.error) as e:
            raise ModelFileError(self.path, f"corrupt GGUF ({e})") from None
        self._tensors = {name: t for gname, t in self._file.tensors.items() if (name := hf_name(gname)) is not None}
        self.arch = str(self._file.field("general.architecture", "?"))
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelFileError(self.path, f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        try:
            self.config = self._config()
        except (TypeError, ValueError, KeyError) as e:
            raise ModelFileError(self.path, f"missing or bad model metadata ({e})") from None
        self.rope_freqs = None
        if "rope_freqs.weight" in self._file.tensors:  # Llama 3.1's RoPE scaling, stored as divisors
            self.rope_freqs = np.frombuffer(self._file.raw("rope_freqs.weight").tobytes(), dtype=np.float32).copy()

    @property
    def metadata(self) -> _Metadata:
        return _Metadata(self._file)

    def field(self, key: str) -> Any:
        return self._file.field(key)

    def _config(self) -> dict[str, Any]:
        a, f = self.arch, self._file.field

        def get(key, default=None):
            v = f(f"{a}.{key}", default)
            if v is None:
                raise KeyError(f"{a}.{key}")
            return v

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = f(f"{a}.vocab_size")
        if vocab is None:
            tokens = f("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else self._tensors["model.embed_tokens.weight"].shape[0]
        return {
            "model_type": a,
            "hidden_size": hidden,
            "num_hidden_layers": int(get("block_count")),
            "intermediate_size": int(get("feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
            "head_dim": int(get("attention.key_length", hidden // n_heads)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(get("context_length", 4096)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "bos_token_id": f("tokenizer.ggml.bos_token_id"),
            "eos_token_id": f("tokenizer.ggml.eos_token_id"),
        }

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def stored_dtype(self, name: str) -> str:
        """The GGML type a tensor is stored in, as "ggml:<type>" (every GGUF tensor is converted at
        load: none is held as stored)."""
        t = self._tensors.get(name)
        return "" if t is None else f"ggml:{GGMLQuantizationType(t.ggml_type).name}"

    def tensor_nbytes(self, name: str) -> int:
        return self._tensors[name].nbytes

    def load(self, names: list[str]) -> dict[str, np.ndarray | QuantizedWeight]:
        out = {}
        for name in names:
            t = self._tensors.get(name)
            if t is None:
                raise ModelFileError(self.path, f"missing tensor {name}")
            try:
                w = from_gguf(self._file.raw(t.name), GGMLQuantizationType(t.ggml_type), t.shape)
            except ValueError as e:
                raise ModelFileError(self.path, f"tensor {t.name}: {e}") from None
            if isinstance(w, np.ndarray) and w.base is not None:
                w = w.copy()  # never keep a view of the memory map: it would pin the file's pages
            out[name] = self._undo_permute(name, w)
        return out

    def _undo_permute(self, name: str, w):
        # llama.cpp's converter interleaves the two RoPE halves of q and k rows for `llama`
        # (not for qwen); put them back in the rotate-half order the HF layout uses.
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return w
        heads = self.config["num_attention_heads"] if "q_proj" in name else self.config["num_key_value_heads"]
        n = w.shape[0]
        rows = np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)
        if isinstance(w, QuantizedWeight):
            biases = None if w.biases is None else w.biases[rows]
            return dataclasses.replace(w, codes=w.codes[rows], scales=w.scales[rows], biases=biases)
        return np.ascontiguousarray(w[rows])

    def close(self) -> None:
        # Drop the memory map so pages of tensors we copied out no longer count as ours.
        self._file = None
        self._tensors = {}


class _Metadata:
    """Dict-like read access to GGUF metadata (what the tokenizer builder reads)."""

    def __init__(self, file: GGUFFile):
        self._file = file

    def get(self, key: str, default: Any = None) -> Any:
        return self._file.field(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._file.keys()

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return self._file.field(key)


def _check_header(path: Path) -> None:
    # The container reader checks the magic, the version and every length; this only gives a
    # missing file its own plain message.
    if not path.is_file():
        raise ModelFileError(path, "no such file")

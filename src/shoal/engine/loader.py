"""From a model reference (catalog id, GGUF file or Hugging Face directory) to a ready shard."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
from shoal.engine.tokenizer import Tokenizer
from shoal.models import deepseek, llama, mixtral
from shoal.weights.errors import ModelFileError
from shoal.weights.gguf import GGUFCheckpoint
from shoal.weights.hf import HFCheckpoint

@dataclass(frozen=True)
class Architecture:
    """What the loader needs of a model file: its config type, its shard type, its tensor list."""

    args: type
    model: type
    required_weights: Callable


_LLAMA = Architecture(llama.ModelArgs, llama.LlamaShard, llama.required_weights)
_DEEPSEEK = Architecture(deepseek.ModelArgs, deepseek.DeepseekShard, deepseek.required_weights)
_MIXTRAL = Architecture(mixtral.ModelArgs, mixtral.MixtralShard, mixtral.required_weights)

# config.json model_type -> how to build it (a literal table: grep-able, no registry magic).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "deepseek_v3": _DEEPSEEK, "kimi_k2": _DEEPSEEK,  # Kimi-K2 is the DeepSeek-V3 architecture
    "qwen3_moe": _MIXTRAL, "mixtral": _MIXTRAL,
}


class ModelNotFound(Exception):
    pass


def resolve_model(ref: str | None) -> Path:
    """A catalog id or a path -> the file or directory holding the weights."""
    ref = ref or DEFAULT_MODEL
    if ref in CATALOG:
        entry = CATALOG[ref]
        path = bundled_path(entry)
        if path is not None:
            return path
        from shoal.weights.download import cached_model_path

        path = cached_model_path(entry)
        if path is not None:
            return path
        raise ModelNotFound(f"model {ref!r} is not downloaded yet (run `shoal download {ref}`)")
    path = Path(os.path.expanduser(ref))
    if path.exists():
        return path
    raise ModelNotFound(f"unknown model {ref!r}: not a catalog id ({', '.join(CATALOG)}) and no such file or directory")


def open_checkpoint(path: Path) -> GGUFCheckpoint | HFCheckpoint:
    if path.is_dir():
        return HFCheckpoint(path)
    if path.suffix == ".gguf" or path.is_file():
        return GGUFCheckpoint(path)
    raise ModelFileError(path, "neither a GGUF file nor a model directory")


def load_tokenizer(ckpt) -> Tokenizer:
    return Tokenizer.from_gguf(ckpt) if isinstance(ckpt, GGUFCheckpoint) else Tokenizer.from_hf_dir(ckpt.path)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    args: "llama.ModelArgs"
    spec: "llama.ShardSpec"
    tokenizer: Tokenizer | None


def load_model(ref: str | None = None, start: int | None = None, end: int | None = None, with_tokenizer: bool = True) -> LoadedModel:
    """Load layers [start, end) of a model (the whole model by default), reading only their tensors."""
    path = resolve_model(ref)
    ckpt = open_checkpoint(path)
    try:
        arch = ARCHITECTURES.get(ckpt.config.get("model_type"))
        if arch is None:
            raise ModelFileError(path, f"unsupported architecture {ckpt.config.get('model_type')!r} (supported: {', '.join(ARCHITECTURES)})")
        try:
            args = arch.args.from_dict(ckpt.config)
        except (TypeError, KeyError, ValueError) as e:
            raise ModelFileError(path, f"bad model config ({e})") from None
        n = args.num_hidden_layers
        spec = llama.ShardSpec(start or 0, n if end is None else end, n)
        if not (0 <= spec.start < spec.end <= n):
            raise ValueError(f"layer range [{spec.start}, {spec.end}) is outside the model's {n} layers")
        weights = ckpt.load(arch.required_weights(args, spec, ckpt.tensor_names()))
        try:
            model = arch.model(args, spec, weights)
        except KeyError as e:
            raise ModelFileError(path, f"missing tensor {e}") from None
        rope_freqs = getattr(ckpt, "rope_freqs", None)
        if rope_freqs is not None:
            model.rope.rescale(torch.from_numpy(rope_freqs))
        tokenizer = load_tokenizer(ckpt) if with_tokenizer else None
    finally:
        ckpt.close()
    model.eval()
    name = ref or DEFAULT_MODEL
    return LoadedModel(name, path, model, args, spec, tokenizer)

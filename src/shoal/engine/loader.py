"""From a model reference (catalog id, GGUF file or Hugging Face directory) to a ready shard: one
loader, `load_shard(ref, part)`, for a whole model in one process (`Part()`), a pipeline stage, a
tensor-parallel rank and an expert-parallel rank alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from shoal.catalog import CATALOG, DEFAULT_MODEL, bundled_path
from shoal.engine.device import Device, to_device
from shoal.engine.tokenizer import Tokenizer
from shoal.models import deepseek, llama, mixtral
from shoal.models.base import Part, Shard, Weight
from shoal.placement.spec import FLOAT_MATRICES
from shoal.quant.formats import quantize_sym8
from shoal.weights.errors import ModelFileError
from shoal.weights.gguf import GGUFCheckpoint
from shoal.weights.hf import HFCheckpoint


@dataclass(frozen=True)
class Architecture:
    """What the loader needs of an architecture: its config type, its shard type, the tensors a
    part needs, how a tensor is cut to a part, and which parallel split its layers take."""

    args: type
    model: Callable[[Any, Part, dict[str, Weight]], Shard]
    required_weights: Callable[[Any, Part, list[str]], list[str]]
    slice_weight: Callable[[Any, Part, str, Weight], Weight]
    split: Literal["tensor", "expert"]
    tensor_moe: bool = False  # an MoE whose groups may also split heads and every expert's columns (Part.expert_cols)


_LLAMA = Architecture(llama.ModelArgs, llama.LlamaShard, llama.required_weights, llama.slice_weight, "tensor")
_DEEPSEEK = Architecture(deepseek.ModelArgs, deepseek.DeepseekShard, deepseek.required_weights, deepseek.slice_weight, "expert",
                         tensor_moe=True)
_MIXTRAL = Architecture(mixtral.ModelArgs, mixtral.MixtralShard, mixtral.required_weights, mixtral.slice_weight, "expert",
                        tensor_moe=True)

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
    from shoal.weights.download import models_dir

    path = Path(os.path.expanduser(ref))
    if not path.is_absolute() and (models_dir() / path).exists():
        return models_dir() / path  # a name under the models folder: what a reference from the network means
    if path.exists():
        return path
    raise ModelNotFound(f"unknown model {ref!r}: not a catalog id ({', '.join(CATALOG)}) and no such file or directory")


def check_network_reference(ref: str) -> None:
    """Admit a model reference that came from the network: a catalog id, or a file or folder under
    this machine's models folder (`shoal download`'s, $SHOAL_MODELS), by a relative name or an
    absolute path inside it. Anything else — another path, `..`, `~`, a file that is not there —
    raises the same ModelNotFound, so the answer says nothing about which files exist. Paths
    anywhere stay allowed on the command line, which does not come through here."""
    from shoal.weights.download import models_dir

    if ref in CATALOG:
        return
    unknown = ModelNotFound(f"unknown model {ref!r}: give a catalog id ({', '.join(CATALOG)}) "
                            f"or the name of a file or folder in the nodes' models folder")
    root = Path(os.path.abspath(models_dir()))
    path = Path(ref)
    if not ref or "\0" in ref or ".." in path.parts or ref.startswith("~"):
        raise unknown
    # Lexical, not resolved: a link the owner put in the models folder is theirs to follow, and a
    # resolved path would let a name probe where links lead.
    full = Path(os.path.normpath(path if path.is_absolute() else root / path))
    if full == root or not full.is_relative_to(root) or not full.exists():
        raise unknown


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
    model: Shard
    args: Any  # the architecture's ModelArgs
    part: Part  # resolved: the layer range and count filled in
    tokenizer: Tokenizer | None


def load_shard(ref: str | None, part: Part | None = None, with_tokenizer: bool = False, device: Device | None = None,
               weights: str = "stored") -> LoadedModel:
    """Load the part of a model a process holds (the whole model by default).

    Tensors are read one at a time, each cut to the part as it arrives (see the architecture's
    `slice_weight`), so the process never holds more than its share plus one whole tensor; a
    part with some of the routed experts reads only theirs (safetensors are memory-mapped: the
    other experts' bytes are never touched). A parallel rank then joins its group with
    `model.shard(group)`. With a torch `device` (engine/device.py) the shard computes there; with
    `mlx` it is an MLXShard built from mlx-lm's model files (engine/mlx_backend.py). `weights="q8"`
    holds the float matrices as 8-bit codes (`held_as_q8`; placement/contract.HeldAs)."""
    path = resolve_model(ref)
    ckpt = open_checkpoint(path)
    try:
        model_type = ckpt.config.get("model_type")
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise ModelFileError(path, f"unsupported architecture {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
        try:
            args = arch.args.from_dict(ckpt.config)
        except (TypeError, KeyError, ValueError) as e:
            raise ModelFileError(path, f"bad model config ({e})") from None
        part = (part or Part()).resolve(args.num_hidden_layers, args.vocab_size)
        if device is not None and device.is_mlx:  # mlx-lm's model files, its own reading of the part's tensors
            from shoal.engine.mlx_backend import MLXShard

            model = MLXShard.load(ckpt, args, part)
            tokenizer = load_tokenizer(ckpt) if with_tokenizer else None
            return LoadedModel(ref or DEFAULT_MODEL, path, model, args, part, tokenizer)
        _check_split(model_type, arch, part)
        tensors = {}
        for name in arch.required_weights(args, part, ckpt.tensor_names()):
            w = arch.slice_weight(args, part, name, ckpt.load([name])[name])
            tensors[name] = held_as_q8(name, w) if weights == "q8" else w
        try:
            model = arch.model(args, part, tensors)
        except KeyError as e:
            raise ModelFileError(path, f"missing tensor {e}") from None
        del tensors
        rope_freqs = getattr(ckpt, "rope_freqs", None)
        if rope_freqs is not None:
            model.rope.rescale(torch.from_numpy(rope_freqs))
        if device is not None:
            to_device(model, device)
        tokenizer = load_tokenizer(ckpt) if with_tokenizer else None
    finally:
        ckpt.close()
    return LoadedModel(ref or DEFAULT_MODEL, path, model.eval(), args, part, tokenizer)


def held_as_q8(name: str, w: Weight) -> Weight:
    """A float matrix (placement/spec.FLOAT_MATRICES, the names the planner prices so) as 8-bit codes
    with a float32 scale per 32 of a row (quant/formats.quantize_sym8), for a placement that asked
    for it; anything else (quantized, a vector, rows not in whole groups of 32) as it is."""
    if not (name.endswith(FLOAT_MATRICES) and getattr(w, "ndim", 0) == 2 and w.shape[1] % 32 == 0):
        return w
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return quantize_sym8(w.float().numpy(), 32)
    if isinstance(w, np.ndarray) and w.dtype.kind == "f":
        return quantize_sym8(w, 32)
    return w


def _check_split(model_type: str, arch: Architecture, part: Part) -> None:
    """A rank of a group must hold the kind of slice its architecture's layers are split by:
    otherwise every rank would hold everything and the group's sums would count it several times."""
    if part.size == 1:
        return
    if part.expert_cols is not None and not (arch.tensor_moe and part.kv_heads is not None):
        raise ValueError(f"{model_type}: tensor parallel inside an MoE group is not supported for this family "
                         "(place it with strategy expert, pipeline or hybrid)" if not arch.tensor_moe else
                         f"{model_type}: a rank of a tensor group inside an MoE holds KV heads and expert columns")
    if arch.split == "expert" and part.experts is None:
        raise ValueError(f"{model_type} is a mixture of experts: place it with strategy expert, pipeline or hybrid")
    if arch.split == "tensor" and (part.kv_heads is None or part.experts is not None):
        raise ValueError(f"{model_type} is not a mixture of experts: a rank of its group holds KV heads and MLP columns")


def load_model(ref: str | None = None, start: int | None = None, end: int | None = None, with_tokenizer: bool = True,
               device: Device | None = None, weights: str = "stored") -> LoadedModel:
    """Load layers [start, end) of a model (the whole model by default), with its tokenizer."""
    return load_shard(ref, Part(start or 0, end), with_tokenizer=with_tokenizer, device=device, weights=weights)

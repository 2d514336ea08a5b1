"""Hugging Face checkpoint directories: config.json + safetensors (one file, or sharded with
model.safetensors.index.json), in fp32/fp16/bf16 — and MLX-community quantized ones, which add
`<name>.scales` / `<name>.biases` beside a uint32-packed `<name>.weight`.

safetensors files are memory-mapped; `load(names)` copies out only the tensors asked for, so a
pipeline stage never touches the bytes of another stage's layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.quant.formats import QuantizedWeight, from_mlx
from shoal.weights import hf_quant
from shoal.weights.errors import ModelFileError


class HFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise ModelFileError(self.path, "no config.json in the model directory")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(cfg_path, f"config.json is not valid JSON ({e})") from None
        self.quantization = self.config.get("quantization") or self.config.get("quantization_config")
        if self.quantization and "bits" not in self.quantization:
            self.quantization = None  # a quantization_config of another kind (e.g. fp8) is handled elsewhere
        # FP8 / compressed-tensors / MLX-stacked experts appear under their plain names (hf_quant.py).
        stored = self._index()
        self._store = hf_quant.TensorStore(stored)
        self._files = hf_quant.logical_index(stored, self.config)

    def _index(self) -> dict[str, Path]:
        """tensor name -> the file that holds it."""
        from safetensors import SafetensorError, safe_open

        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelFileError(index, f"bad safetensors index ({e})") from None
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in set(files.values()):
                if not f.exists():
                    raise ModelFileError(f, "missing shard named in model.safetensors.index.json")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise ModelFileError(self.path, "no *.safetensors files in the model directory")
        files = {}
        for f in shards:
            try:
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():
                        files[name] = f
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelFileError(f, f"corrupt safetensors file ({e})") from None
        return files

    def tensor_names(self) -> list[str]:
        # A quantized layer appears under its weight name only; scales/biases travel with it.
        return [n for n in self._files if not (self.quantization and n.endswith((".scales", ".biases")))]

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype a tensor is stored in ("BF16", "F32", ...); "quantized" for the
        formats hf_quant reads (FP8 blocks, packed INT4); "" for a name the checkpoint lacks."""
        from safetensors import safe_open

        if hf_quant.stored_nbytes(self._store, name) is not None or (self.quantization and f"{name.removesuffix('.weight')}.scales" in self._files):
            return "quantized"
        if name not in self._files:
            return ""
        with safe_open(self._files[name], framework="pt") as st:
            return st.get_slice(name).get_dtype()

    def tensor_nbytes(self, name: str) -> int:
        from safetensors import safe_open

        special = hf_quant.stored_nbytes(self._store, name)
        if special is not None:
            return special
        with safe_open(self._files[name], framework="pt") as st:
            sl = st.get_slice(name)
            shape, dtype = sl.get_shape(), sl.get_dtype()
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F64": 8, "I64": 8}.get(dtype, 4)
        return int(np.prod(shape)) * itemsize

    def load(self, names: list[str]) -> dict[str, torch.Tensor | QuantizedWeight]:
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self._files:
                raise ModelFileError(self.path, f"missing tensor {n}")
            by_file.setdefault(self._files[n], []).append(n)
        out = {}
        for f, file_names in by_file.items():
            try:
                with safe_open(f, framework="pt") as st:
                    keys = set(st.keys())
                    for n in file_names:
                        out[n] = self._read_one(st, keys, n)
            except (SafetensorError, OSError) as e:
                raise ModelFileError(f, f"corrupt safetensors file ({e})") from None
        return out

    def _read_one(self, st, keys: set[str], name: str) -> torch.Tensor | QuantizedWeight:
        special = hf_quant.read_tensor(self._store, name, self.config)
        if special is not None:
            return special
        base = name.removesuffix(".weight")
        if self.quantization and name.endswith(".weight") and f"{base}.scales" in keys:
            q = self.quantization
            return from_mlx(
                st.get_tensor(name).numpy(),
                st.get_tensor(f"{base}.scales").float().numpy(),
                st.get_tensor(f"{base}.biases").float().numpy(),
                bits=int(q["bits"]),
                group_size=int(q["group_size"]),
            )
        t = st.get_tensor(name)
        # bf16 stays bf16 (its linear layers compute from it as stored: quant/linear.BF16Linear);
        # float16 and float32 become float32.
        return t if not t.is_floating_point() or t.dtype == torch.bfloat16 else t.float()

    def close(self) -> None:
        self._store.close()

"""Where a shard computes: the numba engine on CPU cores, or torch on any torch device.

The model files are the same for every device; what differs lives in the linear layers, the
norms and activations, attention and the caches, and `to_device` switches a loaded shard over:

- ``cpu``        the numba engine: quantized weights stay packed and go through shoal's kernels,
                 decode attention is one kernel call per layer (kernels/attention.py).
- ``torch-cpu``  the torch backend on CPU cores, in float32: every op is a torch op, as it will be
                 on a card. For tests (its logits are checked against transformers) and for
                 platforms numba does not serve.
- ``cuda[:N]``   the torch backend on an NVIDIA card, bf16 (the checkpoints' own GPU format).
- ``mps``        the torch backend on an Apple GPU, float16, for correctness (Apple's fast path is MLX).
- ``mlx``        Apple's MLX with mlx-lm's model files (engine/mlx_backend.py): a shard of its own
                 kind, built by the loader rather than switched over; the default on Apple Silicon
                 where mlx is installed. On Linux it runs on `mlx[cpu]`, for the tests.

A torch-device shard takes its inputs from the host and gives its outputs back to the host in
float32 (`Shard.forward`), so the runner, the sampler and the wire between stages see the same
tensors whatever a stage computes on: a pipeline may mix devices freely.

Limits of this first torch backend: quantized weights (GGUF Q4/Q8, MLX, INT4) are dequantized to
the device's dtype at load, not held packed with a GPU matmul kernel, and decode runs op by op
(no CUDA graphs yet). Both are for the card to measure; the CPU tests fix the numbers.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is used, not by a node that only names one
    import torch
    from torch import nn

DEVICE_CHOICES = "auto, cpu, torch-cpu, cuda, cuda:N, mps, mlx"
# The families whose MLX ranks join tensor and expert groups (engine/mlx_backend.py cuts their
# layers). An MLX node holds whole stages of any other model; the planner places it so.
MLX_GROUP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3", "kimi_k2")
CARD_USABLE = 0.9  # of a card's memory, for shards: the rest is the CUDA context, allocator slack, activations


def collectives(device: str) -> list[str]:
    """The transports beside shoal's own that a node computing on `device` offers its groups
    (NodeProfile.collectives, placement/contract.Collective): MLX's ring, where this MLX has it."""
    if device != "mlx":
        return []
    import mlx.core as mx

    return ["mlx-ring"] if mx.distributed.is_available("ring") else []


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" (numba), "torch-cpu", "cuda", "cuda:1", "mps", "mlx"

    @property
    def is_torch(self) -> bool:
        return self.name not in ("cpu", "mlx")

    @property
    def is_mlx(self) -> bool:
        return self.name == "mlx"

    @property
    def kind(self) -> str:
        """cpu, cuda, mps or mlx: what the planner and the dashboard call it."""
        return self.name.split(":")[0].replace("torch-cpu", "cpu")

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device("cpu" if self.name in ("cpu", "torch-cpu") else self.name)

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(self.kind, torch.float32)


def parse_device(text: str) -> Device:
    """A device from `--device`; `auto` is MLX on Apple Silicon where it is installed, else the
    accelerator torch sees, else the numba engine. Raises ValueError naming the choices, or saying
    which device is not there."""
    text = text.strip().lower()
    if text == "auto":
        # Looked for without importing torch (a second of a node's start) where there is nothing to find.
        if sys.platform == "darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx") is not None:
            return Device("mlx")
        if os.path.exists("/dev/nvidiactl") and _cuda_available():
            return Device("cuda")
        if sys.platform == "darwin" and _mps_available():
            return Device("mps")
        return Device("cpu")
    if text in ("cpu", "torch-cpu"):
        return Device(text)
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: torch sees no CUDA device here (a CUDA build of torch and a driver are needed)")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices (0-based)")
        return Device(text)
    if text == "mlx":
        try:
            import mlx.core  # noqa: F401
            import mlx_lm  # noqa: F401
        except (ImportError, OSError) as e:
            raise ValueError(f"--device mlx: MLX is not usable here ({e}); install it with "
                             "`pip install mlx-lm` on macOS, `pip install 'mlx-lm[cpu]'` on Linux") from None
        return Device("mlx")
    if text == "mps":
        if not _mps_available():
            raise ValueError("--device mps: torch sees no Apple GPU here")
        return Device("mps")
    raise ValueError(f"unknown device {text!r} (choose from {DEVICE_CHOICES})")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def card_memory(name: str) -> int | None:
    """The memory a node computing on `name` offers for shards, where that is a card's own (CUDA):
    its total times CARD_USABLE.
    None for the CPU and for Apple's unified memory, which is the host's RAM."""
    if not name.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(name[5:]) if ":" in name else 0
    return int(torch.cuda.get_device_properties(index).total_memory * CARD_USABLE)


def to_device(model: nn.Module, device: Device) -> nn.Module:
    """Switch a loaded shard (models/base.Shard) to `device`'s torch backend, in place; the numba
    engine (`cpu`) leaves it as it is (an `mlx` shard is built as one by the loader)."""
    if not device.is_torch:
        return model
    import torch

    from shoal.models.base import Embedding, as_tensor
    from shoal.quant.linear import BF16Linear, QuantLinear

    target, dtype = device.torch_device, device.dtype
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (QuantLinear, BF16Linear)):
                setattr(module, name, _dense_linear(child))
        if isinstance(module, Embedding) and module.quantized is not None:
            module.weight, module.quantized = as_tensor(module.quantized), None
        if isinstance(module, Embedding) and module.weight is not None:
            module.weight = module.weight.float()
        if hasattr(module, "kernels"):
            module.kernels = False  # the module's own numba calls give way to torch ops
        # Tensors kept as plain attributes (not parameters or buffers), which `Module.to` skips.
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):
                setattr(module, name, value.to(target, dtype) if value.is_floating_point() else value.to(target))
    model.to(device=target, dtype=dtype)
    model.torch_device, model.compute_dtype = target, dtype
    return model


def _dense_linear(q: nn.Module) -> nn.Linear:
    import torch
    from torch import nn

    from shoal.quant.kernels import dequantize
    from shoal.quant.linear import QuantLinear

    weight = torch.from_numpy(dequantize(q.qweight)) if isinstance(q, QuantLinear) else q.weight.float()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=q.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if q.bias is not None:
        linear.bias = nn.Parameter(q.bias.clone(), requires_grad=False)
    return linear.requires_grad_(False)


__all__ = ["DEVICE_CHOICES", "Device", "card_memory", "parse_device", "to_device"]

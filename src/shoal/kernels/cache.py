"""The KV cache of one sequence in one layer. Kept apart from the weights (one object per layer,
made by the model, passed into forward) so that sequences can come and go between steps."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens seen so far, (kv_heads, offset, head_dim) each.

    Storage grows by doubling, so appending one token is a copy of one row, not of the history."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32, capacity: int = 256,
                 device: torch.device | None = None):
        self.keys = torch.empty(n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty(n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.offset = 0
        # A torch-device shard's cache (engine/device.py), never handed to the numba attention kernel.
        self.torch_only = device is not None

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (T, kv_heads, head_dim); return all keys and values (kv_heads, offset, head_dim)."""
        n = k.shape[0]
        end = self.offset + n
        self.reserve(n)
        self.keys[:, self.offset : end] = k.transpose(0, 1)
        self.values[:, self.offset : end] = v.transpose(0, 1)
        self.offset = end
        return self.keys[:, :end], self.values[:, :end]

    def reserve(self, n: int) -> None:
        """Make room for n more tokens (the decode-attention kernel writes into it by address)."""
        if self.offset + n > self.keys.shape[1]:
            self._grow(self.offset + n)

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.keys.shape[1])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[0], capacity, old.shape[2], dtype=old.dtype, device=old.device)
            new[:, : self.offset] = old[:, : self.offset]
            setattr(self, name, new)

    def trim(self, n: int) -> None:
        """Forget the last n tokens (used when a request is replayed or a draft is rejected)."""
        self.offset = max(0, self.offset - n)

    @property
    def bytes_per_token(self) -> int:
        """What one more token costs this cache (keys and values of all its heads)."""
        return 2 * self.keys.shape[0] * self.keys.shape[2] * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.element_size() * self.keys.numel() * 2

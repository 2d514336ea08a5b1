"""The compressed KV cache of multi-head latent attention (DeepSeek-V3, Kimi-K2): one object per
sequence per layer, like `KVCache`, but holding what MLA actually needs to rebuild keys and
values — the normalised latent (kv_lora_rank values) and the shared rotary key (qk_rope_head_dim
values) of every token, not full per-head K and V. For DeepSeek-V3 that is 576 values per token per
layer instead of 128 heads × (192 + 128) = 40,960.
"""

from __future__ import annotations

import torch


class MLACache:
    """`kv` is (capacity, kv_lora_rank + rope_dim): row t = [latent_t | rope key_t]; `offset` rows used.

    Latent and rope key share one buffer so that the absorbed attention scores of every head are one
    matmul against it ([q_latent | q_rope] @ kv.T). Storage grows by doubling."""

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype = torch.float32, capacity: int = 256,
                 device: torch.device | None = None):
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.kv = torch.empty(capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.offset = 0

    def update_and_fetch(self, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Append latent (T, kv_lora_rank) and rope key (T, rope_dim); return all rows (offset, r + rope)."""
        n = latent.shape[0]
        end = self.offset + n
        if end > self.kv.shape[0]:
            new = torch.empty(max(end, 2 * self.kv.shape[0]), self.kv.shape[1], dtype=self.kv.dtype, device=self.kv.device)
            new[: self.offset] = self.kv[: self.offset]
            self.kv = new
        self.kv[self.offset : end, : self.kv_lora_rank] = latent
        self.kv[self.offset : end, self.kv_lora_rank :] = k_rope
        self.offset = end
        return self.kv[:end]

    def trim(self, n: int) -> None:
        """Forget the last n tokens (a replayed request, a rejected draft)."""
        self.offset = max(0, self.offset - n)

    @property
    def values_per_token(self) -> int:
        return self.kv.shape[1]

    @property
    def bytes_per_token(self) -> int:
        return self.kv.shape[1] * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.element_size() * self.kv.numel()

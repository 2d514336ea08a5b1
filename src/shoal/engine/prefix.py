"""Prompt prefix reuse: the KV of recent prompts, so a prompt that begins like one of them skips
prefilling what they share.

Chat clients resend the same system prompt with every request and the whole conversation with
every turn, so most of a prompt is usually a prefix some earlier prompt had. Keys and values of a
token depend only on the tokens before it, so that part of the cache can be copied instead of
recomputed (equal up to the rounding of a different batch shape).

The store keeps whole prompts, least recently used first out, within a token budget; a lookup
takes the longest common prefix with any stored prompt. *Where* a prompt's K/V is kept is the
`PrefixKeeper`'s business: `CopyKeeper` clones a sequence's per-layer caches in this process
(per-head K/V, or MLA's compressed latents); a distributed model's entry keeps nothing itself and
has every rank keep its own layers' share (runner/entry.py `DistributedModel`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from shoal.kernels.cache import KVCache
from shoal.kernels.mla_cache import MLACache

# Shorter matches are not worth the copy and the lookup (a BOS token and a role marker).
MIN_REUSE_TOKENS = 16


class PrefixKeeper(Protocol):
    def can_keep(self, caches: Any) -> bool:
        """Whether this sequence's caches can be kept and filled (else it gets no reuse)."""
        ...

    def keep(self, caches: Any, n: int) -> Any:
        """A copy of the first n tokens of a sequence's caches; what `load` and `drop` take."""
        ...

    def load(self, caches: Any, kept: Any, n: int) -> None:
        """Fill a new sequence's empty caches with the first n tokens of a kept prefix."""
        ...

    def drop(self, kept: Any) -> None: ...


class CopyKeeper:
    """Prefixes kept as clones of per-layer cache tensors, in this process."""

    def can_keep(self, caches: Any) -> bool:
        return bool(caches) and (all(type(c) in (KVCache, MLACache) for c in caches) or all(map(_is_mlx, caches)))

    def keep(self, caches: list, n: int) -> list:
        if _is_mlx(caches[0]):
            from shoal.engine.mlx_backend import keep_prefix

            return keep_prefix(caches, n)
        return [(c.keys[:, :n].clone(), c.values[:, :n].clone()) if type(c) is KVCache else c.kv[:n].clone()
                for c in caches]

    def load(self, caches: list, kept: list, n: int) -> None:
        if _is_mlx(caches[0]):
            from shoal.engine.mlx_backend import load_prefix

            return load_prefix(caches, kept, n)
        for cache, saved in zip(caches, kept, strict=True):
            if type(cache) is KVCache:
                k, v = saved
                cache.update_and_fetch(k[:, :n].transpose(0, 1), v[:, :n].transpose(0, 1))  # (n, kv_heads, head_dim)
            else:
                cache.update_and_fetch(saved[:n, : cache.kv_lora_rank], saved[:n, cache.kv_lora_rank :])

    def drop(self, kept: list) -> None:
        pass  # the clones go with the last reference


def _is_mlx(cache: Any) -> bool:
    """mlx-lm's KVCache (engine/mlx_backend.py), named rather than imported: mlx is loaded only by
    a process whose shard computes with it."""
    return type(cache).__module__ == "mlx_lm.models.cache" and type(cache).__name__ == "KVCache"


class PrefixStore:
    def __init__(self, max_tokens: int, keeper: PrefixKeeper | None = None):
        self.max_tokens = max_tokens
        self.keeper: PrefixKeeper = keeper or CopyKeeper()
        # prompt -> (its ids as an array, for a vectorised prefix compare; what the keeper kept)
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, Any]] = OrderedDict()
        self._tokens = 0
        self.hits = 0

    def store(self, prompt: list[int], caches: Any) -> None:
        """Keep the K/V of a prompt whose prefill just completed (its caches hold exactly it)."""
        n = len(prompt)
        key = tuple(prompt)
        if n < MIN_REUSE_TOKENS or n > self.max_tokens or not self.keeper.can_keep(caches):
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (np.asarray(prompt, dtype=np.int64), self.keeper.keep(caches, n))
        self._tokens += n
        while self._tokens > self.max_tokens:
            old, (_, kept) = self._entries.popitem(last=False)
            self._tokens -= len(old)
            self.keeper.drop(kept)

    def reuse(self, prompt: list[int], caches: Any) -> int:
        """Fill empty caches with the longest stored prefix of `prompt` (always leaving its last
        token to compute, whose logits the first sample needs); returns how many tokens."""
        if not self._entries or not self.keeper.can_keep(caches):
            return 0
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_key = 0, None
        for key, (stored, _) in self._entries.items():
            n = _common_prefix(stored, ids)
            if n > best:
                best, best_key = n, key
        best = min(best, len(prompt) - 1)
        if best < MIN_REUSE_TOKENS or best_key is None:
            return 0
        self._entries.move_to_end(best_key)
        self.keeper.load(caches, self._entries[best_key][1], best)
        self.hits += 1
        return best

    @property
    def tokens(self) -> int:
        return self._tokens


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n

"""Prompt prefix reuse: the KV of recent prompts, so a prompt that begins like one of them skips
prefilling what they share.

Chat clients resend the same system prompt with every request and the whole conversation with
every turn, so most of a prompt is usually a prefix some earlier prompt had. Keys and values of a
token depend only on the tokens before it, so that part of the cache can be copied instead of
recomputed (equal up to the rounding of a different batch shape).

The store keeps whole prompts (their per-layer K/V, cloned when their prefill completes), least
recently used first out, within a token budget; a lookup takes the longest common prefix with any
stored prompt. Only per-sequence `KVCache`s are copied: other caches (a distributed model's
handles, MLA's compressed cache) simply get no reuse.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from shoal.engine.cache import KVCache

# Shorter matches are not worth the copy and the lookup (a BOS token and a role marker).
MIN_REUSE_TOKENS = 16


class PrefixStore:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        # prompt -> (its ids as an array, for a vectorised prefix compare; per-layer (K, V) (Hkv, n, D))
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._tokens = 0
        self.hits = 0

    @staticmethod
    def usable(caches: list) -> bool:
        return bool(caches) and all(type(c) is KVCache for c in caches)

    def store(self, prompt: list[int], caches: list[KVCache]) -> None:
        """Keep the K/V of a prompt whose prefill just completed (its caches hold exactly it)."""
        n = len(prompt)
        key = tuple(prompt)
        if n < MIN_REUSE_TOKENS or n > self.max_tokens or not self.usable(caches):
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (np.asarray(prompt, dtype=np.int64), [(c.keys[:, :n].clone(), c.values[:, :n].clone()) for c in caches])
        self._tokens += n
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def reuse(self, prompt: list[int], caches: list[KVCache]) -> int:
        """Fill empty caches with the longest stored prefix of `prompt` (always leaving its last
        token to compute, whose logits the first sample needs); returns how many tokens."""
        if not self._entries or not self.usable(caches):
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
        for cache, (k, v) in zip(caches, self._entries[best_key][1]):
            cache.update_and_fetch(k[:, :best].transpose(0, 1), v[:, :best].transpose(0, 1))
        self.hits += 1
        return best

    @property
    def tokens(self) -> int:
        return self._tokens


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n

"""Modules called straight through to `forward`.

`nn.Module.__call__` checks for hooks (forward, pre-forward, global ones) before calling
`forward`: ~2 µs a call here. A decode step of a Llama layer calls nine modules (the block, its
two norms, attention and MLP, four projections), so for the bundled model's 30 layers that is
~0.6 ms of a ~14 ms single-sequence step spent finding out that there are no hooks. shoal
registers none, so the per-layer modules skip the check. (A hook registered on one of them would
be ignored: do not rely on hooks there.)
"""

from __future__ import annotations

import torch


class DirectModule(torch.nn.Module):
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


__all__ = ["DirectModule"]

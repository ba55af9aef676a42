"""Plain torch references for the ops in `kernels/`: the specification, the oracle of the tests, and the CPU path.

Dimension letters: T tokens (sorted by group), K contraction, N output features, E groups (experts).
"""

from __future__ import annotations

import torch


def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped matmul: rows `offsets[e-1]:offsets[e]` of `x` are multiplied by `w[e]`.

    Args:
        x: `[T, K]`, rows sorted by group.
        w: `[E, K, N]`.
        offsets: `[E]` int32, cumulative row counts (the end of each group's rows; `offsets[-1] == T`).

    Returns:
        `[T, N]` in the dtype of `x`, computed in fp32.
    """
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = (x[start:end].float() @ w[e].float()).to(x.dtype)
        start = end
    return out

"""Grouped GEMM for the routed experts: one call multiplies every expert's token rows by that expert's weight.

Dimension letters: T tokens (sorted by expert), K contraction, N output features, E experts.
References: DESIGN.md §4 (tokens sorted by expert, one grouped GEMM per projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GroupedMM(torch.autograd.Function):
    """`torch.nn.functional.grouped_mm` with a backward that accepts any gradient layout.

    torch's own backward rejects gradients with zero strides (e.g. from `y.sum().backward()`), so the gradient is
    made contiguous first and both gradients are computed as grouped GEMMs themselves.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        return F.grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_out, w.transpose(-2, -1), offs=offsets)  # [T, K]
        if ctx.needs_input_grad[1]:
            grad_w = F.grouped_mm(x.t(), grad_out, offs=offsets)  # [E, K, N]: per group x_e^T · dy_e
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped matmul, `out[rows of e] = x[rows of e] @ w[e]`, differentiable in `x` and `w`.

    Args:
        x: `[T, K]`, rows sorted by group.
        w: `[E, K, N]` (any strides, e.g. a transposed view of a stacked `[E, N, K]` weight).
        offsets: `[E]` int32 cumulative row counts; `offsets[-1] == T`.

    Returns:
        `[T, N]` in the dtype of `x`.

    Raises:
        ValueError: on mismatched shapes or dtypes.

    Example:
        >>> out = grouped_mm(x_sorted, experts.up_proj.transpose(1, 2), offsets)
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: expected x [T, K] and w [E, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if offsets.shape != (w.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(f"grouped_mm: offsets must be int32 of shape [{w.shape[0]}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_mm: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    return _GroupedMM.apply(x, w, offsets)

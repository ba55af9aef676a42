"""Grouped GEMMs for the routed experts: one call multiplies every expert's token rows by that expert's weight.

Triton kernels (`moe_gemm.py`) for CUDA tensors, torch's `grouped_mm` elsewhere; both differentiable.
Dimension letters: T tokens (sorted by expert), K contraction, N output features, E experts.
References: docs/design.md, DeepSeekMoE (tokens sorted by expert, one grouped GEMM per projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import check_grouped_mm_args


def _matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from .moe_gemm import grouped_mm_triton

        return grouped_mm_triton(x, w, offsets)
    return F.grouped_mm(x, w, offs=offsets)


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`[E, K, N]`: per group `x_eᵀ · dy_e`."""
    if x.is_cuda:
        from .moe_gemm import grouped_mm_wgrad_triton

        return grouped_mm_wgrad_triton(x, grad_out, offsets)
    return F.grouped_mm(x.t(), grad_out, offs=offsets)


class _GroupedMM(torch.autograd.Function):
    """Grouped GEMM with a backward that accepts any gradient layout.

    torch's own backward rejects gradients with zero strides (e.g. from `y.sum().backward()`), so the gradient is
    made contiguous first and both gradients are computed as grouped GEMMs themselves.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        return _matmul(x, w, offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_out, w.transpose(-2, -1), offsets)  # [T, K]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad_out, offsets)  # [E, K, N]
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
    check_grouped_mm_args(x, w, offsets)
    return _GroupedMM.apply(x, w, offsets)


def grouped_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The gate and up projections of SwiGLU experts, `silu(x·w_gate[e]) * (x·w_up[e])` per group, differentiable.
    On CUDA one fused kernel computes both (x is read once, neither projection is written); elsewhere two grouped
    GEMMs.

    Args:
        x: `[T, K]`, rows sorted by group.
        w_gate, w_up: `[E, K, N]` with the same strides (e.g. transposed views of stacked `[E, N, K]` weights).
        offsets: `[E]` int32 cumulative row counts; `offsets[-1] == T`.

    Returns:
        `[T, N]` in the dtype of `x`.

    Raises:
        ValueError: on mismatched shapes or dtypes.

    Example:
        >>> gate, up = experts.gate_proj.transpose(1, 2), experts.up_proj.transpose(1, 2)
        >>> hidden = grouped_swiglu(x_sorted, gate, up, offsets)
    """
    if x.is_cuda:
        from .moe_gemm import grouped_swiglu_triton

        return grouped_swiglu_triton(x, w_gate, w_up, offsets)
    return F.silu(grouped_mm(x, w_gate, offsets)) * grouped_mm(x, w_up, offsets)

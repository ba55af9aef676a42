"""Grouped GEMMs for the routed experts: one call multiplies every expert's token rows by that expert's weight.

Triton kernels (`moe_gemm.py`) for CUDA tensors, torch's `grouped_mm` elsewhere; both differentiable, both through
the custom operators of `custom_ops.py`, so that `torch.compile` takes them in fp32 too.
Dimension letters: T tokens (sorted by expert), K contraction, N output features, E experts.
References: docs/design.md, DeepSeekMoE (tokens sorted by expert, one grouped GEMM per projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .custom_ops import grouped_mm_impl, grouped_mm_op, grouped_mm_wgrad_op, grouped_swiglu_op
from .dispatch import count_launch, use_triton
from .reference import check_grouped_mm_args


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
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grouped_mm_op(x, w, offsets)
    # eager inference needs neither the operator's autograd nor its fake kernel: its implementation, called directly,
    # skips the dispatch through torch.library (several µs a call; a decode step of the routed experts makes 3 a layer)
    return grouped_mm_impl(x, w, offsets)


def grouped_mm_wgrad(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm` (what its backward computes): per group `x_eᵀ · grad_out_e`, `[E, K, N]`,
    for a backward written by hand (the FP8 training recipe quantises both operands first).

    Args:
        x: `[T, K]`, grad_out: `[T, N]`, rows sorted by group; offsets: `[E]` int32 cumulative row counts.
    """
    return grouped_mm_wgrad_op(x, grad_out, offsets)


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
    if use_triton(x):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate, w_up))
        if torch.compiler.is_compiling() and not needs_grad:
            return grouped_swiglu_op(x, w_gate, w_up, offsets)  # one opaque call in the compiled graph
        from .moe_gemm import grouped_swiglu_triton

        count_launch("grouped_swiglu")
        return grouped_swiglu_triton(x, w_gate, w_up, offsets)
    return F.silu(grouped_mm(x, w_gate, offsets)) * grouped_mm(x, w_up, offsets)

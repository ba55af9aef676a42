"""Triton grouped GEMMs for the routed experts: rows sorted by expert, one launch for all experts of a projection.

* `grouped_gemm_kernel`: `out[rows of e] = x[rows of e] · w[e]` in bf16 / fp16 / fp32, or block-scaled FP8 (1×128
  activation tiles, 128×128 weight blocks, fp32 accumulation with the scales applied per 128-wide K block, as
  `fp8_gemm`); with a second weight, the fused SwiGLU `silu(x·w_gate) * (x·w_up)`, which reads x once for both
  projections and writes neither to memory (unless training keeps them for the backward).
* `grouped_mm_wgrad_kernel`: the weight gradient `dw[e] = x_eᵀ · dy_e`, a reduction over each expert's rows.
Row tiles never straddle two experts: every program finds its expert and rows from `offsets` on the device (a cumulative
count of row tiles per expert), so nothing is read back to the host and a decode step never synchronises.

Dimension letters: T rows (tokens × top-k, sorted by expert), K contraction, N output features, E experts.
References: docs/design.md (DeepSeekMoE, FP8, Kernels); MegaBlocks (Gale et al. 2022: grouped GEMM over
expert-sorted tokens, tiles within one expert); DeepSeek-V3 report §3.3 (fine-grained FP8 quantisation); Triton
tutorial 03 (blocked matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8_BLOCK, check_fp8_grouped_gemm_args, check_grouped_mm_args
from .tuning import Tuned

# Autotuned for CUDA tensors (`tuning.Tuned`); the Triton interpreter runs the first config of each list.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in ((64, 128, 4, 4), (128, 128, 8, 3), (32, 128, 4, 4))
]
# FP8: BLOCK_K is the 128-wide quantisation block, so one activation scale per row and one weight scale per column
FP8_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": FP8_BLOCK}, num_warps=warps, num_stages=stages)
    for block_m, warps, stages in ((64, 4, 3), (128, 8, 3))
]
WGRAD_CONFIGS = [
    triton.Config({"BLOCK_K": block_k, "BLOCK_N": block_n, "BLOCK_T": 64}, num_warps=warps, num_stages=stages)
    for block_k, block_n, warps, stages in ((128, 128, 8, 3), (64, 128, 4, 4))
]


@triton.jit
def _expert_row_tile(offsets_ptr, E, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """The expert of row tile `pid_m` (counting each expert's ceil(rows / BLOCK_M) tiles in turn) and the tile's first
    row and its expert's end row; the expert is E past the last tile."""
    offs_e = tl.arange(0, BLOCK_E)
    in_range = offs_e < E
    ends = tl.load(offsets_ptr + offs_e, mask=in_range, other=0)
    starts = tl.load(offsets_ptr + offs_e - 1, mask=in_range & (offs_e > 0), other=0)
    tiles = tl.where(in_range, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)  # experts without rows own no tile and are passed
    mine = offs_e == expert
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, tl.sum(tl.where(mine, ends, 0), axis=0)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, w2_ptr, out_ptr, gate_ptr, up_ptr, xs_ptr, ws_ptr, offsets_ptr,
    N, K, E, ROWS_BUCKET,
    stride_xt, stride_we, stride_wk, stride_wn, stride_ot, stride_xst, stride_wse, stride_wsn,
    SWIGLU: tl.constexpr, STORE_GATE_UP: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tl.static_assert(not (FP8 and SWIGLU), "the FP8 grouped GEMM has no fused SwiGLU")
    # output tiles vary fastest along N: the programs of one row tile run together and share its x rows in L2
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    expert, row_start, row_end = _expert_row_tile(offsets_ptr, E, pid_m, BLOCK_M, BLOCK_E)
    if expert >= E:  # the grid is an upper bound on the row tiles
        return
    offs_m = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows × stride can pass 2^31
    mask_m = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn  # [1, BLOCK_N]
    ws_base = expert.to(tl.int64) * stride_wse + (offs_n // BLOCK_K) * stride_wsn  # the 128-row block of each column
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K  # a partial last K block reads zeros, which add nothing
        a = tl.load(x_ptr + offs_m[:, None] * stride_xt + k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w_offs = w_base + k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
        w_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        if FP8:
            a_s = tl.load(xs_ptr + offs_m * stride_xst + kb, mask=mask_m, other=0.0)  # [BLOCK_M]
            w_s = tl.load(ws_ptr + ws_base + kb, mask=mask_n, other=0.0)  # [BLOCK_N]
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                w_up = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
                acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    out_offs = offs_m[:, None] * stride_ot + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SWIGLU:
        if STORE_GATE_UP:  # training: the backward needs both projections
            tl.store(gate_ptr + out_offs, acc.to(gate_ptr.dtype.element_ty), mask=out_mask)
            tl.store(up_ptr + out_offs, acc_up.to(up_ptr.dtype.element_ty), mask=out_mask)
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) · up from the fp32 accumulators
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def grouped_mm_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, N,
    stride_xt, stride_dyt, stride_we, stride_wk, stride_wn,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_kn, expert = tl.program_id(0), tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_k = (pid_kn // n_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = (pid_kn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k, mask_n = offs_k < K, offs_n < N
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # an expert without rows gets a zero gradient
    for t0 in range(start, end, BLOCK_T):
        rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = rows < end
        x_t = tl.load(x_ptr + rows[None, :] * stride_xt + offs_k[:, None], mask=mask_k[:, None] & mask_t[None, :],
                      other=0.0)  # [BLOCK_K, BLOCK_T]: x_eᵀ
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :],
                     other=0.0)  # [BLOCK_T, BLOCK_N]
        acc = tl.dot(x_t, dy, acc, input_precision=DOT_PRECISION)
    dw_offs = expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


GEMM_KEY = ["N", "K", "ROWS_BUCKET", "SWIGLU", "STORE_GATE_UP"]
_gemm = Tuned(grouped_gemm_kernel, GEMM_CONFIGS, GEMM_KEY)
_fp8_gemm = Tuned(grouped_gemm_kernel, FP8_GEMM_CONFIGS, GEMM_KEY)
_wgrad = Tuned(grouped_mm_wgrad_kernel, WGRAD_CONFIGS, key=["N", "K"])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs multiply exactly (as torch does with TF32 off); other dtypes ignore the setting
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(x, w, offsets, out_dtype, w_up=None, store_gate_up=False, x_s=None, w_s=None):
    """`grouped_gemm_kernel` over x `[T, K]` and w `[E, K, N]` (any strides): `(out, gate, up)`, each `[T, N]`;
    gate and up are written only with `store_gate_up` (else they alias `out`)."""
    t, k = x.shape
    e, _, n = w.shape
    out = torch.empty(t, n, dtype=out_dtype, device=x.device)
    gate, up = (torch.empty_like(out), torch.empty_like(out)) if store_gate_up else (out, out)
    if t == 0:
        return out, gate, up
    fp8 = x_s is not None
    kernel = _fp8_gemm if fp8 else _gemm
    # one tile per BLOCK_M rows, plus at most one partial tile per expert that has rows
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(t, meta["BLOCK_M"]) + min(e, t))  # noqa: E731
    kernel[grid](
        x.device, x, w, w if w_up is None else w_up, out, gate, up, x_s if fp8 else x, w_s if fp8 else w, offsets,
        n, k, e, min(triton.next_power_of_2(max(1, t // e)), 256),  # rows per expert: the autotune key's row measure
        x.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        x_s.stride(0) if fp8 else 0, w_s.stride(0) if fp8 else 0, w_s.stride(1) if fp8 else 0,
        SWIGLU=w_up is not None, STORE_GATE_UP=store_gate_up, FP8=fp8, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_E=triton.next_power_of_2(e),
    )  # fmt: skip
    return out, gate, up


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped matmul on the GPU (or in the Triton interpreter), forward only; same contract as `grouped_mm_ref`.

    Args:
        x: `[T, K]`, rows sorted by group; w: `[E, K, N]`, any strides; offsets: `[E]` int32 cumulative row counts.

    Returns:
        `[T, N]` in the dtype of `x`.

    Raises:
        ValueError: on mismatched shapes or dtypes.
    """
    check_grouped_mm_args(x, w, offsets)
    return _launch(_row_major(x), w, offsets, x.dtype)[0]


def grouped_mm_wgrad_triton(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm`: `dw[e] = x_eᵀ · dy_e` over each group's rows, fp32 accumulation.

    Args:
        x: `[T, K]` and dy: `[T, N]`, rows sorted by group; offsets: `[E]` int32 cumulative row counts.

    Returns:
        `[E, K, N]` in the dtype of `dy`, laid out as a transposed `[E, N, K]` (the storage of stacked expert weights,
        so the gradient lands in `.grad` without a copy); zeros for a group without rows.

    Raises:
        ValueError: on mismatched shapes or dtypes.
    """
    if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0] or x.dtype != dy.dtype:
        raise ValueError(f"grouped_mm_wgrad: expected x [T, K] and dy [T, N] of one dtype, got {x.dtype} "
                         f"{tuple(x.shape)} and {dy.dtype} {tuple(dy.shape)}")
    if offsets.dim() != 1 or offsets.dtype != torch.int32:
        raise ValueError(f"grouped_mm_wgrad: offsets must be int32 [E], got {offsets.dtype} {tuple(offsets.shape)}")
    x, dy = _row_major(x), _row_major(dy)
    k, n, e = x.shape[1], dy.shape[1], offsets.shape[0]
    dw = torch.empty(e, n, k, dtype=dy.dtype, device=dy.device).transpose(1, 2)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), e)  # noqa: E731
    _wgrad[grid](
        x.device, x, dy, dw, offsets, k, n, x.stride(0), dy.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        DOT_PRECISION=_dot_precision(x.dtype),
    )  # fmt: skip
    return dw


class _GroupedSwiGLU(torch.autograd.Function):
    """`silu(x·w_gate) * (x·w_up)` per group: the fused kernel forward (keeping both projections), Triton GEMMs back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor):
        out, gate, up = _launch(x, w_gate, offsets, x.dtype, w_up=w_up, store_gate_up=True)
        ctx.save_for_backward(x, w_gate, w_up, offsets, gate, up)
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        x, w_gate, w_up, offsets, gate, up = ctx.saved_tensors
        g, u, d_out = gate.float(), up.float(), d_out.float()
        sig = torch.sigmoid(g)
        d_up = (d_out * g * sig).to(x.dtype)  # ∂/∂up of silu(g)·up
        d_gate = (d_out * u * sig * (1 + g * (1 - sig))).to(x.dtype)  # silu'(g) = σ(g)(1 + g(1 - σ(g)))
        dx = dw_gate = dw_up = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm_triton(d_gate, w_gate.transpose(1, 2), offsets)
            dx += grouped_mm_triton(d_up, w_up.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:
            dw_gate = grouped_mm_wgrad_triton(x, d_gate, offsets)
        if ctx.needs_input_grad[2]:
            dw_up = grouped_mm_wgrad_triton(x, d_up, offsets)
        return dx, dw_gate, dw_up, None


def grouped_swiglu_triton(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Fused `silu(x·w_gate[e]) * (x·w_up[e])` per group on the GPU (or in the Triton interpreter), differentiable;
    same contract as `grouped_swiglu_ref`.

    Args:
        x: `[T, K]`, rows sorted by group; w_gate, w_up: `[E, K, N]` with the same strides; offsets: `[E]` int32.

    Returns:
        `[T, N]` in the dtype of `x`.

    Raises:
        ValueError: on mismatched shapes, dtypes or weight strides.
    """
    check_grouped_mm_args(x, w_gate, offsets, "grouped_swiglu")
    check_grouped_mm_args(x, w_up, offsets, "grouped_swiglu")
    if w_gate.shape != w_up.shape or w_gate.stride() != w_up.stride():
        raise ValueError(f"grouped_swiglu: w_gate and w_up must have one shape and one layout, got "
                         f"{tuple(w_gate.shape)} strides {w_gate.stride()} and {tuple(w_up.shape)} strides "
                         f"{w_up.stride()}")
    x = _row_major(x)
    if torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad):
        return _GroupedSwiGLU.apply(x, w_gate, w_up, offsets)
    return _launch(x, w_gate, offsets, x.dtype, w_up=w_up)[0]


def fp8_grouped_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 grouped GEMM on the GPU (or in the Triton interpreter); same contract as
    `fp8_grouped_gemm_ref`.

    Args:
        a: `[T, K]` e4m3, rows sorted by group; a_s: `[T, ceil(K/128)]` fp32 (1×128 tiles, `act_quant`).
        w: `[E, N, K]` e4m3; w_s: `[E, ceil(N/128), ceil(K/128)]` fp32 (128×128 blocks).
        offsets: `[E]` int32 cumulative row counts.

    Returns:
        `[T, N]` in `out_dtype` (bf16 or fp32).

    Raises:
        ValueError: on dtypes or shapes that do not match.
    """
    check_fp8_grouped_gemm_args(a, a_s, w, w_s, offsets, out_dtype)
    a, a_s, w_s = _row_major(a), a_s.contiguous(), w_s.contiguous()
    return _launch(a, w.transpose(1, 2), offsets, out_dtype, x_s=a_s, w_s=w_s)[0]

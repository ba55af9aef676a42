"""Compute kernels of modeling_deepseek_v3: each op has a torch reference (`*_ref`, the oracle and the CPU path) and,
where it pays, a Triton kernel (`*_triton`, the CUDA path). The public ops below dispatch by device (`dispatch.py`):
Triton for CUDA tensors (and CPU tensors inside `triton_on_cpu()`), the reference otherwise; `kernel_launches` counts
the Triton launches per op. Kernels know nothing of models or configs: they are functions of tensors.

Submodule names differ from the op names on purpose: importing `kernels.x` binds `x` on this package, which would
replace a function of the same name.
"""

from __future__ import annotations

import torch

from .custom_ops import mla_decode_op
from .dispatch import count_launch, kernel_launches, triton_on_cpu, use_triton
from .grouped_gemm import grouped_mm, grouped_mm_wgrad, grouped_swiglu
from .reference import (
    FP8_BLOCK,
    FP8_E4M3_MAX,
    act_dequant_ref,
    act_quant_colwise_ref,
    act_quant_ref,
    fp8_gemm_ref,
    fp8_grouped_gemm_ref,
    grouped_mm_ref,
    grouped_swiglu_ref,
    mla_decode_fp8_ref,
    mla_decode_paged_fp8_ref,
    mla_decode_paged_ref,
    mla_decode_ref,
    sparse_mla_decode_ref,
    weight_dequant_ref,
    weight_quant_ref,
)


def act_quant(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 1×128 activation tiles along the last dim: `(q [..., K] e4m3, s [..., ceil(K/128)] fp32)`."""
    if use_triton(x):
        from .fp8_quant import act_quant_triton

        count_launch("act_quant")
        return act_quant_triton(x, scale_fmt)
    return act_quant_ref(x, scale_fmt=scale_fmt)


def act_quant_colwise(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 128×1 tiles of `x` `[M, K]` (for weight gradients): `(q [M, K] e4m3, s [ceil(M/128), K] fp32)`."""
    if use_triton(x):
        from .fp8_quant import act_quant_colwise_triton

        count_launch("act_quant_colwise")
        return act_quant_colwise_triton(x, scale_fmt)
    return act_quant_colwise_ref(x, scale_fmt=scale_fmt)


def weight_quant(w: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 128×128 weight blocks: `(q [N, K] e4m3, s [ceil(N/128), ceil(K/128)] fp32)`."""
    if use_triton(w):
        from .fp8_quant import weight_quant_triton

        count_launch("weight_quant")
        return weight_quant_triton(w, scale_fmt)
    return weight_quant_ref(w, scale_fmt=scale_fmt)


def weight_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`q · s` per 128×128 block, in `dtype`."""
    if use_triton(q):
        from .fp8_quant import weight_dequant_triton

        count_launch("weight_dequant")
        return weight_dequant_triton(q, s, dtype)
    return weight_dequant_ref(q, s, dtype=dtype)


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Block-scaled FP8 GEMM `A·B^T` with fp32 accumulation per 128-wide K block (see `fp8_gemm_ref`)."""
    if use_triton(a):
        from .block_fp8_gemm import fp8_gemm_triton

        count_launch("fp8_gemm")
        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return fp8_gemm_ref(a, a_s, b, b_s, out_dtype=out_dtype)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 grouped GEMM for stacked experts: the rows of group e (`a` `[T, K]` e4m3 with 1×128 scales)
    times `w[e]ᵀ` (`w` `[E, N, K]` e4m3 with 128×128 block scales `[E, ceil(N/128), ceil(K/128)]`), see
    `fp8_grouped_gemm_ref`."""
    if use_triton(a):
        from .moe_gemm import fp8_grouped_gemm_triton

        count_launch("fp8_grouped_gemm")
        return fp8_grouped_gemm_triton(a, a_s, w, w_s, offsets, out_dtype)
    return fp8_grouped_gemm_ref(a, a_s, w, w_s, offsets, out_dtype=out_dtype)


MLA_DECODE_MAX_QUERIES = 8  # new tokens per row that the latent decode kernel serves (speculative verification)


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """Absorbed MLA attention of new queries over the latent cache: `q_lat` `[b, s, h, c]`, `q_pe` `[b, s, h, r]`,
    `c_kv` `[b, t, c]`, `k_pe` `[b, t, r]`, `mask` `[b, s, t]` bool or None (causal) -> `o_lat` `[b, s, h, c]` (see
    `mla_decode_ref`). The Triton kernel serves CUDA tensors (see `use_triton`) of up to `MLA_DECODE_MAX_QUERIES`
    queries that need no gradient (it has no backward); the reference serves everything else."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_lat, q_pe, c_kv, k_pe))
    if use_triton(q_lat) and q_lat.shape[1] <= MLA_DECODE_MAX_QUERIES and not needs_grad:
        if torch.compiler.is_compiling():
            return mla_decode_op(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)  # one opaque call, counted when it runs
        from .latent_decode import mla_decode_triton

        count_launch("mla_decode")
        return mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)
    return mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)


def mla_decode_fp8(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    c_kv_scales: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """`mla_decode` over an FP8 latent cache: `c_kv` `[b, t, c]` float8_e4m3fn with `c_kv_scales`
    `[b, t, ceil(c/128)]` fp32, one per 1×128 tile (see `mla_decode_fp8_ref`). The Triton kernel dequantises the
    tiles it loads in registers; the reference dequantises a chunk of tokens at a time. Inference only (no gradient
    flows into a quantised cache)."""
    if use_triton(q_lat) and q_lat.shape[1] <= MLA_DECODE_MAX_QUERIES:
        from .latent_decode import mla_decode_fp8_triton

        count_launch("mla_decode_fp8")
        return mla_decode_fp8_triton(q_lat, q_pe, c_kv, c_kv_scales, k_pe, mask, softmax_scale)
    return mla_decode_fp8_ref(q_lat, q_pe, c_kv, c_kv_scales, k_pe, mask, softmax_scale)


def mla_decode_paged(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """`mla_decode` over a paged latent pool: `c_kv_pages` `[num_pages, P, c]`, `k_pe_pages` `[num_pages, P, r]`,
    row b's keys in the pages `block_table[b]` (int32 `[b, m]`), `seq_lens` (int32 `[b]`) keys per row, query i of row
    b at position `seq_lens[b] - s + i` -> `o_lat` `[b, s, h, c]` (see `mla_decode_paged_ref`)."""
    if use_triton(q_lat):
        from .latent_decode import mla_decode_paged_triton

        count_launch("mla_decode_paged")
        return mla_decode_paged_triton(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, softmax_scale)
    return mla_decode_paged_ref(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, softmax_scale)


def mla_decode_paged_fp8(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    c_kv_scale_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """`mla_decode_paged` over FP8 pages: `c_kv_pages` `[num_pages, P, c]` float8_e4m3fn with `c_kv_scale_pages`
    `[num_pages, P, ceil(c/128)]` fp32 (see `mla_decode_paged_fp8_ref`); the kernel dequantises in registers."""
    if use_triton(q_lat):
        from .latent_decode import mla_decode_paged_fp8_triton

        count_launch("mla_decode_paged_fp8")
        return mla_decode_paged_fp8_triton(q_lat, q_pe, c_kv_pages, c_kv_scale_pages, k_pe_pages, block_table,
                                           seq_lens, softmax_scale)  # fmt: skip
    return mla_decode_paged_fp8_ref(q_lat, q_pe, c_kv_pages, c_kv_scale_pages, k_pe_pages, block_table, seq_lens,
                                    softmax_scale)  # fmt: skip


def sparse_mla_decode(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, indices: torch.Tensor,
    valid: torch.Tensor, softmax_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Absorbed MLA attention of each query over its chosen latent rows only (DeepSeek-V3.2): `q_lat` `[b, s, h, c]`,
    `q_pe` `[b, s, h, r]`, `c_kv` `[b, t, c]`, `k_pe` `[b, t, r]`, `indices` / `valid` `[b, s, k]` (the indexer's
    selection) -> `o_lat` `[b, s, h, c]` (see `sparse_mla_decode_ref`). The Triton kernel, which gathers the chosen
    rows by pointer, serves CUDA tensors (see `use_triton`) that need no gradient (it has no backward), outside
    `torch.compile` (no custom op wraps it yet: a compiled graph traces the reference); the reference serves everything
    else."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_lat, q_pe, c_kv, k_pe))
    if use_triton(q_lat) and not needs_grad and not torch.compiler.is_compiling():
        from .sparse_latent_decode import sparse_mla_decode_triton

        count_launch("sparse_mla_decode")
        return sparse_mla_decode_triton(q_lat, q_pe, c_kv, k_pe, indices, valid, softmax_scale)
    return sparse_mla_decode_ref(q_lat, q_pe, c_kv, k_pe, indices, valid, softmax_scale)


__all__ = [
    "FP8_BLOCK",
    "FP8_E4M3_MAX",
    "MLA_DECODE_MAX_QUERIES",
    "act_quant",
    "act_dequant_ref",
    "act_quant_colwise",
    "act_quant_colwise_ref",
    "act_quant_ref",
    "fp8_gemm",
    "fp8_gemm_ref",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_ref",
    "grouped_mm",
    "grouped_mm_ref",
    "grouped_mm_wgrad",
    "grouped_swiglu",
    "grouped_swiglu_ref",
    "kernel_launches",
    "mla_decode",
    "mla_decode_fp8",
    "mla_decode_fp8_ref",
    "mla_decode_paged",
    "mla_decode_paged_fp8",
    "mla_decode_paged_fp8_ref",
    "mla_decode_paged_ref",
    "mla_decode_ref",
    "sparse_mla_decode",
    "sparse_mla_decode_ref",
    "triton_on_cpu",
    "use_triton",
    "weight_dequant",
    "weight_dequant_ref",
    "weight_quant",
    "weight_quant_ref",
]

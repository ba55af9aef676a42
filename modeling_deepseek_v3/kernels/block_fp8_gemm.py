"""Triton block-scaled FP8 GEMM: `C = Σ_kb (A[:, kb] · B[:, kb]^T) · a_s[:, kb] · b_s[·, kb]`.

Each 128-wide K block is multiplied in FP8 with fp32 accumulation, then scaled and added to an fp32 accumulator:
the report's promotion to CUDA cores every N_C = 128. B's scales are either 128×128 blocks (weights) or 1×128 tiles
per row (the weight gradient, whose B is an activation). Dimension letters: M, N output, K contraction.
References: DeepSeek-V3 report §3.3.2 (increasing accumulation precision); DeepSeek-V3 `inference/kernel.py`
(`fp8_gemm_kernel`); docs/design.md (FP8, Kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8_BLOCK, check_fp8_gemm_args


@triton.jit
def fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
    stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
    B_SCALE_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows × stride can pass 2^31
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    if B_SCALE_PER_ROW:
        bs_rows = offs_n
    else:
        bs_rows = offs_n // BLOCK_K  # the 128-row weight block of each output column
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        mask_k = k < K  # a partial last K block reads zeros, which add nothing
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mask_m, other=0.0)  # [BLOCK_M]
        b_s = tl.load(bs_ptr + bs_rows * stride_bsn + kb, mask=mask_n, other=0.0)  # [BLOCK_N]
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]  # [BLOCK_M, BLOCK_N]
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], c, mask=mask_m[:, None] & mask_n[None, :])


def fp8_gemm_triton(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Block-scaled FP8 GEMM on the GPU (or in the Triton interpreter); same contract as `fp8_gemm_ref`.

    Args:
        a: `[M, K]` e4m3; a_s: `[M, ceil(K/128)]` fp32.
        b: `[N, K]` e4m3; b_s: `[ceil(N/128), ceil(K/128)]` (weight blocks) or `[N, ceil(K/128)]` (per-row tiles).

    Returns:
        `[M, N]` in `out_dtype` (bf16 or fp32).

    Raises:
        ValueError: on dtypes or shapes that do not match.
    """
    check_fp8_gemm_args(a, a_s, b, b_s, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    a, b, a_s, b_s = a.contiguous(), b.contiguous(), a_s.contiguous(), b_s.contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    block_m = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 128))
    fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, m, n, k, a.stride(0), b.stride(0), c.stride(0), a_s.stride(0), b_s.stride(0),
        B_SCALE_PER_ROW=b_s.shape[0] == n and n != 1, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=FP8_BLOCK,
        num_warps=8 if block_m == 128 else 4, num_stages=3,
    )  # fmt: skip
    return c

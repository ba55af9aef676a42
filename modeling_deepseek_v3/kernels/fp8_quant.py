"""Triton kernels for FP8 (E4M3) block quantisation: activations in 1×128 tiles (any row/column strides, so 128×1
tiles are the same kernel on a transposed view), weights in 128×128 blocks, and block dequantisation.

Numerics equal `reference.py` bit for bit: scale `max(amax, 1e-4) · (1/448)` in fp32 (optionally rounded up to a
power of two, `ue8m0`), payload `x / scale` cast to e4m3, divided with IEEE round-to-nearest (`div_rn`): Triton's
default `/` on the GPU is an approximate division that changes a few payloads.
Dimension letters: M rows, K columns, B = 128.
References: DeepSeek-V3 report §3.3 (fine-grained quantisation); DeepSeek-V3 `inference/kernel.py`
(`act_quant_kernel`, `weight_dequant_kernel`); docs/design.md (FP8, Kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8_BLOCK, INV_FP8_E4M3_MAX, SCALE_EPS

ROWS_PER_PROGRAM = 16


@triton.jit
def act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K,
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sk,
    INV_FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows × stride can pass 2^31
    offs_k = (pid_k * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)  # [BLOCK_M, BLOCK]
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS) * INV_FP8_MAX  # [BLOCK_M]
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    q = tl.math.div_rn(x, scale[:, None])
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * stride_sm + pid_k * stride_sk, scale, mask=mask_m)


def _act_quant_strided(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, scale_fmt: str | None) -> None:
    m, k = x.shape
    grid = (triton.cdiv(m, ROWS_PER_PROGRAM), triton.cdiv(k, FP8_BLOCK))
    act_quant_kernel[grid](
        x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        INV_FP8_MAX=INV_FP8_E4M3_MAX, EPS=SCALE_EPS, UE8M0=scale_fmt == "ue8m0",
        BLOCK_M=ROWS_PER_PROGRAM, BLOCK=FP8_BLOCK,
    )  # fmt: skip


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def act_quant_triton(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 tiles along the last dim of `x` `[..., K]`; returns `(q [..., K] e4m3, s [..., ceil(K/128)] fp32)`."""
    _check_scale_fmt(scale_fmt)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"act_quant: x must be a non-empty tensor with a last (K) dim, got shape {tuple(x.shape)}")
    flat = x.reshape(-1, x.shape[-1])
    q = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(flat.shape[0], triton.cdiv(flat.shape[1], FP8_BLOCK), dtype=torch.float32, device=x.device)
    _act_quant_strided(flat, q, s, scale_fmt)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def act_quant_colwise_triton(x: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """128×1 tiles (128 rows of one column) of `x` `[M, K]`; returns `(q [M, K] e4m3, s [ceil(M/128), K] fp32)`."""
    _check_scale_fmt(scale_fmt)
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"act_quant_colwise: x must be a non-empty [M, K] matrix, got shape {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(triton.cdiv(m, FP8_BLOCK), k, dtype=torch.float32, device=x.device)
    _act_quant_strided(x.t(), q.t(), s.t(), scale_fmt)  # tiles along M of x = tiles along the last dim of x^T
    return q, s


@triton.jit
def weight_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K, KB, INV_FP8_MAX: tl.constexpr, EPS: tl.constexpr, UE8M0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    offs_k = (pid_k * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)  # [B, B]
    scale = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), EPS) * INV_FP8_MAX
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    q = tl.math.div_rn(w, scale)
    tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * KB + pid_k, scale)


def weight_quant_triton(w: torch.Tensor, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 blocks of `w` `[N, K]`; returns `(q [N, K] e4m3, s [ceil(N/128), ceil(K/128)] fp32)`."""
    _check_scale_fmt(scale_fmt)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight_quant: w must be a non-empty [N, K] matrix, got shape {tuple(w.shape)}")
    w = w.contiguous()
    n, k = w.shape
    nb, kb = triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(nb, kb, dtype=torch.float32, device=w.device)
    weight_quant_kernel[(nb, kb)](w, q, s, n, k, kb, INV_FP8_MAX=INV_FP8_E4M3_MAX, EPS=SCALE_EPS,
                                  UE8M0=scale_fmt == "ue8m0", BLOCK=FP8_BLOCK)
    return q, s


@triton.jit
def weight_dequant_kernel(q_ptr, s_ptr, w_ptr, N, K, KB, BLOCK: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    offs_k = (pid_k * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)  # [B, B]
    scale = tl.load(s_ptr + pid_n * KB + pid_k)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], (q * scale).to(w_ptr.dtype.element_ty), mask=mask)


def weight_dequant_triton(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`w = q · s[n // 128, k // 128]` for `q` `[N, K]` e4m3 and `s` `[ceil(N/128), ceil(K/128)]` fp32."""
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight_dequant: q must be an [N, K] float8_e4m3fn matrix, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    nb, kb = triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)
    if tuple(s.shape) != (nb, kb) or s.dtype != torch.float32:
        raise ValueError(f"weight_dequant: s must be fp32 of shape {(nb, kb)} for q {(n, k)}, got {s.dtype} "
                         f"{tuple(s.shape)}")
    q, s = q.contiguous(), s.contiguous()
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    weight_dequant_kernel[(nb, kb)](q, s, w, n, k, kb, BLOCK=FP8_BLOCK)
    return w

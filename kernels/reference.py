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


# ---- FP8 (E4M3) block quantisation, DESIGN.md §6 --------------------------------------------------------------------
# Dimension letters: M rows (tokens), N output features, K contraction; B = 128, the block size.

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_BLOCK = 128
SCALE_EPS = 1e-4  # amax floor: an all-zero tile gets a finite scale


# Scales multiply by the fp32 reciprocal of 448 instead of dividing: torch divides by a scalar that way on CUDA, and
# IEEE division elsewhere, so a product is the one form every device and Triton compute bit for bit alike.
INV_FP8_E4M3_MAX = 1.0 / FP8_E4M3_MAX


def fp8_scale_ref(amax: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """The dequantisation scale of a tile: `max(amax, 1e-4) · (1/448)`, rounded up to a power of two for `ue8m0`."""
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    scale = amax.float().clamp(min=SCALE_EPS) * torch.tensor(INV_FP8_E4M3_MAX, dtype=torch.float32)
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def act_quant_ref(x: torch.Tensor, scale_fmt: str | None = None, block: int = FP8_BLOCK):
    """Quantise `x` `[..., K]` in 1×`block` tiles along its last dim.

    Returns:
        `(q [..., K] float8_e4m3fn, s [..., ceil(K/block)] fp32)` with `x ≈ q · s` per tile.
    """
    k = x.shape[-1]
    kb = -(-k // block)
    padded = torch.nn.functional.pad(x.float(), (0, kb * block - k)).unflatten(-1, (kb, block))  # [..., kb, B]
    scale = fp8_scale_ref(padded.abs().amax(dim=-1), scale_fmt)  # [..., kb]
    q = (padded / scale[..., None]).flatten(-2)[..., :k].to(torch.float8_e4m3fn)
    return q, scale


def act_quant_colwise_ref(x: torch.Tensor, scale_fmt: str | None = None, block: int = FP8_BLOCK):
    """Quantise `x` `[M, K]` in `block`×1 tiles (128 rows of one column), as the weight gradient needs.

    Returns:
        `(q [M, K] float8_e4m3fn, s [ceil(M/block), K] fp32)`.
    """
    q_t, s_t = act_quant_ref(x.t(), scale_fmt, block)  # tiles along M of x are tiles along the last dim of x^T
    return q_t.t().contiguous(), s_t.t().contiguous()


def weight_quant_ref(w: torch.Tensor, block: int | tuple[int, int] = FP8_BLOCK):
    """Quantise `w` `[..., N, K]` (a matrix or stacked experts) in `block`×`block` tiles; the last row / column
    block may be partial.

    Returns:
        `(q [..., N, K] float8_e4m3fn, s [..., ceil(N/block), ceil(K/block)] fp32)`, the checkpoint's
        `weight_scale_inv`.
    """
    n, k = w.shape[-2:]
    block_n, block_k = (block, block) if isinstance(block, int) else block
    nb, kb = -(-n // block_n), -(-k // block_k)
    padded = torch.nn.functional.pad(w.float(), (0, kb * block_k - k, 0, nb * block_n - n))
    tiles = padded.unflatten(-1, (kb, block_k)).unflatten(-3, (nb, block_n))  # [..., nb, Bn, kb, Bk]
    scale = fp8_scale_ref(tiles.abs().amax(dim=(-3, -1)))  # [..., nb, kb]
    q = (tiles / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :n, :k].to(torch.float8_e4m3fn)
    return q, scale


def weight_dequant_ref(
    q: torch.Tensor, s: torch.Tensor, dtype=torch.bfloat16, block: int | tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """`w = q · s[..., n // block_n, k // block_k]`, in `dtype`, for `q` `[..., N, K]` (stacked experts too);
    partial edge blocks use their block's scale."""
    n, k = q.shape[-2:]
    block_n, block_k = (block, block) if isinstance(block, int) else block
    if n % block_n == 0 and k % block_k == 0:  # whole blocks: broadcast the scales over a tiled view, in place
        tiles = q.float().unflatten(-1, (k // block_k, block_k)).unflatten(-3, (n // block_n, block_n))
        return tiles.mul_(s[..., :, None, :, None]).flatten(-4, -3).flatten(-2).to(dtype)
    scale = s.repeat_interleave(block_n, dim=-2)[..., :n, :].repeat_interleave(block_k, dim=-1)[..., :k]
    return (q.float() * scale).to(dtype)


def fp8_gemm_ref(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype=torch.bfloat16
) -> torch.Tensor:
    """Block-scaled FP8 GEMM `C = Σ_kb (A[:, kb] · B[:, kb]^T) · a_s[:, kb] · b_s[·, kb]`, fp32 accumulation
    (blocks of 128, the block size of the FP8 recipe and of the Triton kernel).

    Args:
        a: `[M, K]` fp8; a_s: `[M, ceil(K/128)]` (1×128 tiles).
        b: `[N, K]` fp8; b_s: `[ceil(N/128), ceil(K/128)]` (128×128 tiles) or `[N, ceil(K/128)]` (1×128 tiles, as
            in the weight gradient).

    Returns:
        `[M, N]` in `out_dtype`.
    """
    check_fp8_gemm_args(a, a_s, b, b_s, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    per_row = b_s.shape[0] == n  # (for n == 1 the two layouts coincide)
    block = FP8_BLOCK
    out = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(-(-k // block)):
        cols = slice(kb * block, min((kb + 1) * block, k))
        partial = a[:, cols].float() @ b[:, cols].float().t()  # exact products, fp32 sums within the block
        col_scale = b_s[:, kb] if per_row else b_s[:, kb].repeat_interleave(block)[:n]
        out += partial * a_s[:, kb, None] * col_scale[None, :]
    return out.to(out_dtype)


def check_fp8_gemm_args(a, a_s, b, b_s, out_dtype) -> None:
    """Shared argument checks of the FP8 GEMM (reference and Triton)."""
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemm: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: expected a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    kb = -(-k // FP8_BLOCK)
    if tuple(a_s.shape) != (m, kb):
        raise ValueError(f"fp8_gemm: a_s must have shape {(m, kb)}, got {tuple(a_s.shape)}")
    if b_s.dim() != 2 or b_s.shape[1] != kb or b_s.shape[0] not in (n, -(-n // FP8_BLOCK)):
        raise ValueError(f"fp8_gemm: b_s must have shape {(-(-n // FP8_BLOCK), kb)} (128x128 blocks) or {(n, kb)} "
                         f"(per-row tiles), got {tuple(b_s.shape)}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise ValueError(f"fp8_gemm: scales must be fp32, got {a_s.dtype} and {b_s.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_gemm: out_dtype must be bfloat16 or float32, got {out_dtype}")

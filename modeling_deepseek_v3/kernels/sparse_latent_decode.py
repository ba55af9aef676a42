"""Triton sparse latent attention (DeepSeek-V3.2): each query attends, in the absorbed form, only to the `k` rows of
the latent cache its lightning indexer chose. The rows are gathered by pointer, a tile of `BLOCK_N` chosen rows at a
time, straight from the cache: no dense mask over all keys and no gathered copy of the rows is ever written.

A program owns one query of one batch row and BLOCK_H of its heads (the heads of a query share its chosen rows). Each
gathered `c_kv` tile [BLOCK_N, c] is used twice, as the keys (`q_lat · c_kvᵀ`) and as the values (`P · c_kv`), as in
`latent_decode.py`; an online softmax (fp32, base 2, log2(e) folded into the scale) runs over the tiles. A slot marked
invalid is never read (its index may be anything, -1 included) and gets no weight; a query without a valid slot gets
zeros. The chosen keys are few (DeepSeek-V3.2 keeps 2048), so the keys are not split across programs.

Dimension letters: b batch, s queries, h heads, k chosen keys per query, t cached keys, c kv_lora_rank, r rope dim.
References: DeepSeek-V3.2 report (DeepSeek Sparse Attention); FlashMLA's sparse decoding (deepseek-ai/FlashMLA,
top-k indices per query); docs/v32.md (Decoding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .latent_decode import online_softmax_step
from .reference import check_sparse_mla_decode_args

# Head rows per program: 64 fills a Hopper warpgroup MMA; fp32 inputs (no tensor cores) use 16. tl.dot needs 16 rows.
MAX_BLOCK_H = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 16}
BLOCK_N = 32  # chosen rows gathered per tile


# the number of chosen keys changes with the cache length until it reaches index_topk: not specialised on
@triton.jit(do_not_specialize=["K"])
def sparse_mla_decode_kernel(
    q_ptr, qpe_ptr, ckv_ptr, kpe_ptr, idx_ptr, valid_ptr, o_ptr, H, K, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_cb, stride_ct, stride_kb, stride_kt,
    stride_ib, stride_is, stride_ik, stride_vb, stride_vs, stride_vk, stride_ob, stride_os, stride_oh,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_h, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, query = pid_b.to(tl.int64), pid_s.to(tl.int64)  # int64: b × stride passes 2^31 for long caches
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_c, offs_r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    mask_c, mask_r = offs_c < C, offs_r < R
    q_rows = b * stride_qb + query * stride_qs + offs_h * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0)
    pe_rows = b * stride_pb + query * stride_ps + offs_h * stride_ph
    q_pe = tl.load(qpe_ptr + pe_rows[:, None] + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    idx_row = idx_ptr + b * stride_ib + query * stride_is
    valid_row = valid_ptr + b * stride_vb + query * stride_vs

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_k = offs_n < K  # the last tile is partial when k is not a multiple of BLOCK_N
        chosen = (tl.load(valid_row + offs_n * stride_vk, mask=in_k, other=0) != 0) & in_k
        rows = tl.load(idx_row + offs_n * stride_ik, mask=chosen, other=0).to(tl.int64)  # [BLOCK_N] cache rows
        kv = tl.load(ckv_ptr + b * stride_cb + rows[:, None] * stride_ct + offs_c[None, :],
                     mask=chosen[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]: keys, values
        k_pe = tl.load(kpe_ptr + b * stride_kb + rows[:, None] * stride_kt + offs_r[None, :],
                       mask=chosen[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        scores = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
        scores = tl.where(chosen[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, kv, m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no valid slot: acc is 0, the output too
    o_rows = b * stride_ob + query * stride_os + offs_h * stride_oh
    tl.store(o_ptr + o_rows[:, None] + offs_c[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_h[:, None] & mask_c[None, :])


def sparse_mla_decode_triton(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, indices: torch.Tensor,
    valid: torch.Tensor, softmax_scale: float,
) -> torch.Tensor:  # fmt: skip
    """Sparse absorbed MLA attention on the GPU (or in the Triton interpreter); same contract as
    `sparse_mla_decode_ref`, without the probabilities.

    Args:
        q_lat: `[b, s, h, c]`; q_pe: `[b, s, h, r]` (any strides; a last dim that is not contiguous is copied).
        c_kv: `[b, t, c]`; k_pe: `[b, t, r]` (views of a cache are read in place), all four of one dtype.
        indices: `[b, s, k]` int32/int64; valid: `[b, s, k]` bool (broadcast views read in place). The indices of
            valid slots must lie in [0, t): not checked (reading them back would stall the GPU).
        softmax_scale: the score scale.

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`; zeros for a query without a valid slot.

    Raises:
        ValueError: on shapes, dtypes or a scale that do not fit.

    Example:
        >>> o_lat = sparse_mla_decode_triton(q_lat, q_pe, cache_c_kv, cache_k_pe, indices, valid, softmax_scale)
    """
    check_sparse_mla_decode_args(q_lat, q_pe, c_kv, k_pe, indices, valid, softmax_scale)
    q_lat, q_pe, c_kv, k_pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_lat, q_pe, c_kv, k_pe))
    b, s, h, c = q_lat.shape
    r, k = k_pe.shape[-1], indices.shape[-1]
    block_h = min(MAX_BLOCK_H[q_lat.dtype], max(16, triton.next_power_of_2(h)))
    out = torch.empty(b, s, h, c, dtype=q_lat.dtype, device=q_lat.device)
    valid_bytes = valid.view(torch.uint8)  # a bool tensor read as bytes; `view` keeps the strides of a broadcast
    sparse_mla_decode_kernel[(triton.cdiv(h, block_h), s, b)](
        q_lat, q_pe, c_kv, k_pe, indices, valid_bytes, out, h, k, softmax_scale * math.log2(math.e),
        *q_lat.stride()[:3], *q_pe.stride()[:3], *c_kv.stride()[:2], *k_pe.stride()[:2], *indices.stride(),
        *valid_bytes.stride(), *out.stride()[:3],
        C=c, R=r, BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_H=block_h, BLOCK_N=BLOCK_N, DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out

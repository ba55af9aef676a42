"""Triton latent-attention (absorbed MLA) decode: a few new queries attend over the latent cache, split-KV
(flash-decoding) with a log-sum-exp merge.

A program owns BLOCK_H query rows of one batch row (heads × new tokens, flattened, all heads of a token together) and
one split of the keys. Each `c_kv` tile [BLOCK_N, c] is loaded once and used twice, as the keys (`q_lat · c_kvᵀ`) and
as the values (`P · c_kv`), for every head of the block: the point of MLA decoding, where all heads share one latent.
Scores and the softmax are fp32 in base 2 (log2(e) folded into the scale, so exponentials are `exp2`). Every split
writes its normalised output and its log-sum-exp; a second kernel merges the splits. With one split the first kernel
writes the output directly. The same kernel reads paged keys (continuous batching): each row's keys lie in pages of
a shared latent pool, found through the row's block table, and each row has its own key count. Over an FP8 cache
(`FP8_TILE` > 0) `c_kv` arrives as float8_e4m3fn with one fp32 scale per 1×FP8_TILE tile: each loaded tile is
dequantised in registers (value × its tile's scale, then the queries' dtype), so no full-precision copy of the cache
is ever written.

Dimension letters: b batch, s new tokens, h heads, m = s·h query rows (row m is query m // h of head m % h), t keys,
c kv_lora_rank, r rope dim.
References: DeepSeek-V2 report §2.1.2 (absorbing W_UK and W_UV); FlashMLA (deepseek-ai/FlashMLA, latent decode with all
heads of a token per block, paged cache); PagedAttention (Kwon et al. 2023, block tables); flash-decoding (Dao et al.
2023, split-KV with a log-sum-exp merge); docs/design.md (Multi-head Latent Attention, Kernels).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import FP8_BLOCK, check_mla_decode_args, check_mla_decode_fp8_args, check_mla_decode_paged_args
from .tuning import Tuned

# Query rows per program: 64 fills a Hopper warpgroup MMA and keeps the fp32 accumulator [64, 512] in registers over 8
# warps; fp32 inputs (no tensor cores, twice the operand bytes) use 16.
MAX_BLOCK_H = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 16}
MIN_TOKENS_PER_SPLIT = 256  # below this a split writes nearly as many partial-output bytes as it reads cache bytes
SPLIT_ALIGN = 64  # split boundaries on multiples of every BLOCK_N, so only the last tile of the last split is partial

# Autotuned for CUDA tensors (`tuning.Tuned`); the Triton interpreter runs the first config of each list.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_n, warps, stages in ((32, 8, 2), (64, 8, 2), (32, 4, 3))
]


@triton.jit
def online_softmax_step(scores, kv, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One tile of an online softmax in base 2: the base-2 scores `[BLOCK_H, BLOCK_N]` (-inf where masked) of the
    value rows `kv` `[BLOCK_N, BLOCK_C]` update the running max `m_i`, the running sum `l_i` of exp2(score - m_i) and
    the unnormalised output `acc` `[BLOCK_H, BLOCK_C]` (fp32); returns the three."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # a row that has seen no key yet keeps m = -inf; subtracting 0 instead gives exp2(-inf) = 0, never NaN
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# the key count, the split length and a [b, s, t] mask's strides change every decoding step: not specialised on (as
# multiples of 16), so a growing cache does not recompile the kernel
@triton.jit(do_not_specialize=["T", "tokens_per_split", "stride_mb", "stride_ms"])
def mla_decode_kernel(
    q_ptr, qpe_ptr, ckv_ptr, kpe_ptr, mask_ptr, block_table_ptr, seq_lens_ptr, o_ptr, lse_ptr, scales_ptr,
    H, M, S, T, tokens_per_split, scale_log2, SPLIT_BUCKET,
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
    stride_cb, stride_ct, stride_kb, stride_kt, stride_mb, stride_ms, stride_mt, stride_btb,
    stride_ob, stride_osplit, stride_lb, stride_lsplit, stride_sb, stride_st,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, HAS_MASK: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    # PAGE_SIZE > 0: the keys of row b are paged, key j at token j % PAGE_SIZE of page block_table[b, j // PAGE_SIZE]
    # (c_kv / k_pe are [pages, PAGE_SIZE, c / r], "b" strides are the page strides), and row b has seq_lens[b] keys
    # head blocks vary fastest, so the programs that read the same c_kv tiles run together and share them in L2
    pid_h, pid_split, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_b.to(tl.int64)  # int64: b × stride passes 2^31 for long caches
    offs_m = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_m = offs_m < M
    query, head = offs_m // H, offs_m % H
    offs_c, offs_r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    mask_c, mask_r = offs_c < C, offs_r < R
    q_rows = b * stride_qb + query * stride_qs + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    pe_rows = b * stride_pb + query * stride_ps + head * stride_ph
    q_pe = tl.load(qpe_ptr + pe_rows[:, None] + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if PAGE_SIZE > 0:
        T = tl.load(seq_lens_ptr + b)
    last_key = T - S + query  # without a mask: causal, query i sits at position t - s + i

    start = pid_split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, T)  # a paged row shorter than the longest may leave a split empty
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        keys = offs_n.to(tl.int64)
        if PAGE_SIZE > 0:
            page = tl.load(block_table_ptr + b * stride_btb + keys // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            c_rows = page * stride_cb + (keys % PAGE_SIZE) * stride_ct  # [BLOCK_N]
            k_rows = page * stride_kb + (keys % PAGE_SIZE) * stride_kt
            s_rows = page * stride_sb + (keys % PAGE_SIZE) * stride_st  # read only over an FP8 cache
        else:
            c_rows = b * stride_cb + keys * stride_ct
            k_rows = b * stride_kb + keys * stride_kt
            s_rows = b * stride_sb + keys * stride_st
        kv = tl.load(ckv_ptr + c_rows[:, None] + offs_c[None, :],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]: keys and values
        if FP8_TILE > 0:  # each value times the scale of its 1×FP8_TILE tile (scale rows are laid out as c_kv's)
            tile_scale = tl.load(scales_ptr + s_rows[:, None] + (offs_c // FP8_TILE)[None, :],
                                 mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            kv = (kv.to(tl.float32) * tile_scale).to(q.dtype)
        k_pe = tl.load(kpe_ptr + k_rows[:, None] + offs_r[None, :],
                       mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        scores = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
        if HAS_MASK:
            attend = tl.load(mask_ptr + b * stride_mb + query[:, None] * stride_ms + keys[None, :] * stride_mt,
                             mask=mask_m[:, None] & mask_n[None, :], other=0) != 0
        else:
            attend = offs_n[None, :] <= last_key[:, None]
        scores = tl.where(attend & mask_n[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, kv, m_i, l_i, acc, DOT_PRECISION)

    has_keys = l_i > 0.0  # false for a row whose keys are all masked in this split
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    o_rows = b * stride_ob + pid_split * stride_osplit + offs_m.to(tl.int64) * C
    tl.store(o_ptr + o_rows[:, None] + offs_c[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])
    tl.store(lse_ptr + b * stride_lb + pid_split * stride_lsplit + offs_m, lse, mask=mask_m)


@triton.jit
def mla_decode_merge_kernel(
    part_ptr, lse_ptr, o_ptr, M, SPLITS, stride_pb, stride_psplit, stride_lb, stride_lsplit, stride_ob,
    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    b = pid_b.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(lse_ptr + b * stride_lb + offs_s * stride_lsplit + pid_m, mask=offs_s < SPLITS,
                  other=float("-inf"))  # [BLOCK_SPLITS]
    lse_max = tl.max(lse, axis=0)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split saw a key: all weights 0, output 0
    total = tl.sum(tl.exp2(lse - lse_ref), axis=0)
    inv_total = 1.0 / tl.where(total > 0.0, total, float("inf"))
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for split in range(0, SPLITS):
        weight = tl.exp2(tl.load(lse_ptr + b * stride_lb + split * stride_lsplit + pid_m) - lse_ref) * inv_total
        part = tl.load(part_ptr + b * stride_pb + split * stride_psplit + pid_m * C + offs_c, mask=mask_c, other=0.0)
        acc += weight * part
    tl.store(o_ptr + b * stride_ob + pid_m * C + offs_c, acc.to(o_ptr.dtype.element_ty), mask=mask_c)


_mla_decode = Tuned(mla_decode_kernel, DECODE_CONFIGS, key=["M", "C", "R", "SPLIT_BUCKET", "PAGE_SIZE", "FP8_TILE"])


def _num_splits(programs_per_split: int, t: int, device: torch.device) -> int:
    """Splits of the keys that bring the programs up to one per streaming multiprocessor (a program of 64 query rows
    fills an SM's registers) without splits shorter than MIN_TOKENS_PER_SPLIT."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(sms // programs_per_split, t // MIN_TOKENS_PER_SPLIT))


def mla_decode_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention on the GPU (or in the Triton interpreter); same contract as `mla_decode_ref`.

    Args:
        q_lat: `[b, s, h, c]` (any strides with a contiguous last dim); q_pe: `[b, s, h, r]`.
        c_kv: `[b, t, c]`; k_pe: `[b, t, r]`.
        mask: `[b, s, t]` bool (True = attend; broadcast views such as `expand` are read in place), or None (causal,
            query i at position `t - s + i`).
        softmax_scale: the score scale.
        num_splits: how many parts the keys are split into (None: enough to fill the GPU).

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`; zeros for a query that may attend to no key.

    Raises:
        ValueError: on shapes, dtypes, a scale or a split count that do not fit.

    Example:
        >>> o_lat = mla_decode_triton(q_lat, q_pe, cache_c_kv, cache_k_pe, None, softmax_scale)
    """
    check_mla_decode_args(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)
    return _launch(q_lat, q_pe, c_kv, k_pe, c_kv.shape[1], mask, None, softmax_scale, num_splits)


def mla_decode_fp8_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    c_kv_scales: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`mla_decode_triton` over an FP8 latent cache; same contract as `mla_decode_fp8_ref`.

    Args:
        c_kv: `[b, t, c]` float8_e4m3fn; c_kv_scales: `[b, t, ceil(c/128)]` fp32 (contiguous last dims); the rest as
            in `mla_decode_triton`.

    Example:
        >>> o_lat = mla_decode_fp8_triton(q_lat, q_pe, cache_c_kv, cache_scales, cache_k_pe, None, softmax_scale)
    """
    check_mla_decode_fp8_args(q_lat, q_pe, c_kv, c_kv_scales, k_pe, mask, softmax_scale)
    return _launch(q_lat, q_pe, c_kv, k_pe, c_kv.shape[1], mask, None, softmax_scale, num_splits, c_kv_scales)


def mla_decode_paged_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention over a paged latent pool (continuous batching); same contract as
    `mla_decode_paged_ref`. Each program reads its row's pages through the block table: nothing is gathered.

    Args:
        q_lat: `[b, s, h, c]`; q_pe: `[b, s, h, r]`; query i of row b sits at position `seq_lens[b] - s + i`.
        c_kv_pages: `[num_pages, P, c]`; k_pe_pages: `[num_pages, P, r]` (contiguous last dims; views of one
            interleaved pool are read in place).
        block_table: `[b, m]` int32 page ids; seq_lens: `[b]` int32 keys per row (at most `m · P`, not checked here:
            reading them back would stall the GPU).
        softmax_scale: the score scale.
        num_splits: how many parts the longest row's keys are split into (None: enough to fill the GPU).

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`.

    Raises:
        ValueError: on shapes, dtypes, a scale or a split count that do not fit.

    Example:
        >>> o_lat = mla_decode_paged_triton(q_lat, q_pe, pages[..., :c], pages[..., c:], block_table, seq_lens, scale)
    """
    check_mla_decode_paged_args(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, softmax_scale)
    max_keys = block_table.shape[1] * c_kv_pages.shape[1]
    return _launch(q_lat, q_pe, c_kv_pages, k_pe_pages, max_keys, None, (block_table, seq_lens), softmax_scale,
                   num_splits)


def mla_decode_paged_fp8_triton(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    c_kv_scale_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`mla_decode_paged_triton` over FP8 pages (`c_kv_pages` e4m3 with `c_kv_scale_pages` fp32, views of one pool
    read in place); same contract as `mla_decode_paged_fp8_ref`."""
    stand_in = q_lat.new_empty(1, 1, 1).expand(c_kv_pages.shape)  # the pages' checks in the queries' dtype
    check_mla_decode_paged_args(q_lat, q_pe, stand_in, k_pe_pages, block_table, seq_lens, softmax_scale)
    max_keys = block_table.shape[1] * c_kv_pages.shape[1]
    return _launch(q_lat, q_pe, c_kv_pages, k_pe_pages, max_keys, None, (block_table, seq_lens), softmax_scale,
                   num_splits, c_kv_scale_pages)  # fmt: skip


def _launch(q_lat, q_pe, c_kv, k_pe, t, mask, paging, softmax_scale, num_splits, scales=None) -> torch.Tensor:
    """Launches the split kernel (and the merge) over dense `[b, t, *]` keys, or paged keys when `paging` is
    `(block_table, seq_lens)`, with `t` the longest row's key count; `scales` are the 1×128 tile scales of an FP8
    `c_kv`, laid out as its rows."""
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"mla_decode: num_splits must be a positive integer or None, got {num_splits}")
    q_lat, q_pe, c_kv, k_pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_lat, q_pe, c_kv, k_pe))
    if scales is not None and scales.stride(-1) != 1:
        scales = scales.contiguous()
    b, s, h, c = q_lat.shape
    r = k_pe.shape[-1]
    m = s * h
    block_h = min(MAX_BLOCK_H[q_lat.dtype], max(16, triton.next_power_of_2(m)))  # tl.dot needs at least 16 rows
    head_blocks = triton.cdiv(m, block_h)
    if num_splits is None:
        num_splits = _num_splits(b * head_blocks, t, q_lat.device)
    tokens_per_split = triton.cdiv(triton.cdiv(t, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(t, tokens_per_split)  # no empty split (for the longest row)

    out = torch.empty(b, s, h, c, dtype=q_lat.dtype, device=q_lat.device)
    lse = torch.empty(b, num_splits, m, dtype=torch.float32, device=q_lat.device)
    part = out if num_splits == 1 else torch.empty(b, num_splits, m, c, dtype=torch.float32, device=q_lat.device)
    # a bool mask is read as bytes; `view` keeps its strides, so a broadcast [s, t] -> [b, s, t] mask is not copied
    mask_bytes = mask.view(torch.uint8) if mask is not None else q_lat
    mask_strides = mask_bytes.stride() if mask is not None else (0, 0, 0)
    block_table, seq_lens = paging if paging is not None else (q_lat, q_lat)  # unread placeholders when dense
    page_size = c_kv.shape[1] if paging is not None else 0
    # keys per program in powers of two up to 4096: in the autotune key (the kernel does not read it), so a config
    # tuned on a short context is not reused for a long one, while a growing cache retunes only a few times
    split_bucket = min(triton.next_power_of_2(tokens_per_split), 4096)
    _mla_decode[(head_blocks, num_splits, b)](
        q_lat.device, q_lat, q_pe, c_kv, k_pe, mask_bytes, block_table, seq_lens, part, lse,
        scales if scales is not None else q_lat,
        h, m, s, t, tokens_per_split, softmax_scale * math.log2(math.e), split_bucket,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        c_kv.stride(0), c_kv.stride(1), k_pe.stride(0), k_pe.stride(1), *mask_strides,
        block_table.stride(0) if paging is not None else 0,
        part.stride(0), 0 if num_splits == 1 else part.stride(1), lse.stride(0), lse.stride(1),
        *(scales.stride()[:2] if scales is not None else (0, 0)),
        C=c, R=r, BLOCK_C=max(16, triton.next_power_of_2(c)), BLOCK_R=max(16, triton.next_power_of_2(r)),
        HAS_MASK=mask is not None, PAGE_SIZE=page_size, FP8_TILE=FP8_BLOCK if scales is not None else 0,
        BLOCK_H=block_h,
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if num_splits > 1:
        mla_decode_merge_kernel[(m, b)](
            part, lse, out, m, num_splits, part.stride(0), part.stride(1), lse.stride(0), lse.stride(1), out.stride(0),
            C=c, BLOCK_C=triton.next_power_of_2(c), BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out

"""Plain torch references for the ops in `kernels/`: the specification, the oracle of the tests, and the CPU path.

Dimension letters: T tokens (sorted by group), K contraction, N output features, E groups (experts); for latent
attention b batch, s new tokens, h heads, t keys, c kv_lora_rank, r rope dim.
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


def grouped_swiglu_ref(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """`silu(x·w_gate[e]) * (x·w_up[e])` for the rows of each group, in fp32 (the gate and up projections of
    SwiGLU experts).

    Args:
        x: `[T, K]`, rows sorted by group; w_gate, w_up: `[E, K, N]`; offsets: `[E]` int32 cumulative row counts.

    Returns:
        `[T, N]` in the dtype of `x`.
    """
    gate = grouped_mm_ref(x.float(), w_gate.float(), offsets)
    up = grouped_mm_ref(x.float(), w_up.float(), offsets)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def check_grouped_mm_args(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, op: str = "grouped_mm") -> None:
    """Shared argument checks of the grouped GEMMs: x `[T, K]`, w `[E, K, N]`, offsets int32 `[E]`."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: expected x [T, K] and w [E, K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    if offsets.shape != (w.shape[0],) or offsets.dtype != torch.int32:
        raise ValueError(f"{op}: offsets must be int32 of shape [{w.shape[0]}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"{op}: x and w must share a dtype, got {x.dtype} and {w.dtype}")


# ---- Latent attention decode (absorbed MLA), docs/design.md ----------------------------------------------------------


def mla_decode_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention of `s` new queries over the latent cache, in fp32:
    `o_lat = softmax((q_lat·c_kvᵀ + q_pe·k_peᵀ)·scale) · c_kv`.

    Args:
        q_lat: `[b, s, h, c]`, the no-rope query already multiplied by W_UK.
        q_pe: `[b, s, h, r]`, the rotated rope query.
        c_kv: `[b, t, c]`, the normalised latent cache (keys and values at once).
        k_pe: `[b, t, r]`, the rotated rope key shared by all heads.
        mask: `[b, s, t]` bool, True = attend (left padding, speculative queries, empty static-cache slots), or None:
            causal, query i sits at position `t - s + i`.
        softmax_scale: the score scale.
        return_probs: also return the attention probabilities.

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat` (the caller multiplies by W_UV). A query that may attend to no
        key gets zeros. With `return_probs`, `(o_lat, probs)`, probs `[b, s, h, t]` fp32 (zeros for such a query).

    Raises:
        ValueError: on shapes, dtypes or a scale that do not fit.
    """
    check_mla_decode_args(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)
    b, s, h, c = q_lat.shape
    t = c_kv.shape[1]
    # the s·h query rows of a batch row against its keys, one bmm each (what einsum would run, without its overhead:
    # this is the CPU path of every decode step)
    scores = torch.bmm(q_lat.float().reshape(b, s * h, c), c_kv.float().transpose(1, 2))  # [b, s·h, t]
    scores = (scores + torch.bmm(q_pe.float().reshape(b, s * h, -1), k_pe.float().transpose(1, 2))) * softmax_scale
    scores = scores.view(b, s, h, t)
    if mask is None and s == 1:
        probs = scores.softmax(dim=-1)  # the one new query, the last key, sees every key: nothing to mask
    else:
        if mask is None:
            mask = torch.arange(t, device=c_kv.device) <= torch.arange(t - s, t, device=c_kv.device)[:, None]  # [s, t]
        mask = mask.expand(b, s, t)[:, :, None, :]  # [b, s, 1, t]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        probs = torch.where(mask.any(dim=-1, keepdim=True), probs, 0.0)  # a row without keys: 0, not NaN
    o_lat = torch.bmm(probs.view(b, s * h, t), c_kv.float()).view(b, s, h, c).to(q_lat.dtype)
    return (o_lat, probs) if return_probs else o_lat


MLA_DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_mla_decode_args(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale) -> None:
    """Shared argument checks of the latent decode attention (reference and Triton)."""
    if q_lat.dim() != 4 or q_pe.dim() != 4 or c_kv.dim() != 3 or k_pe.dim() != 3:
        raise ValueError(f"mla_decode: expected q_lat [b, s, h, c], q_pe [b, s, h, r], c_kv [b, t, c], k_pe [b, t, r], "
                         f"got {tuple(q_lat.shape)}, {tuple(q_pe.shape)}, {tuple(c_kv.shape)}, {tuple(k_pe.shape)}")
    b, s, h, c = q_lat.shape
    t, r = c_kv.shape[1], k_pe.shape[-1]
    if tuple(q_pe.shape) != (b, s, h, r) or tuple(c_kv.shape) != (b, t, c) or tuple(k_pe.shape) != (b, t, r):
        raise ValueError(f"mla_decode: shapes disagree: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"c_kv {tuple(c_kv.shape)}, k_pe {tuple(k_pe.shape)} (b, s, h, c, t, r must match)")
    if t == 0 or s == 0:
        raise ValueError(f"mla_decode: needs at least one query and one key, got s={s}, t={t}")
    dtypes = {q_lat.dtype, q_pe.dtype, c_kv.dtype, k_pe.dtype}
    if len(dtypes) != 1 or q_lat.dtype not in MLA_DECODE_DTYPES:
        raise ValueError(f"mla_decode: q_lat, q_pe, c_kv and k_pe must share one of {MLA_DECODE_DTYPES}, "
                         f"got {q_lat.dtype}, {q_pe.dtype}, {c_kv.dtype}, {k_pe.dtype}")
    if mask is None and s > t:
        raise ValueError(f"mla_decode: without a mask the s={s} queries are the last of t={t} keys, so s <= t")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, s, t)):
        raise ValueError(f"mla_decode: mask must be bool of shape {(b, s, t)}, got {mask.dtype} {tuple(mask.shape)}")
    if not softmax_scale > 0:
        raise ValueError(f"mla_decode: softmax_scale must be positive, got {softmax_scale}")


def mla_decode_paged_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """`mla_decode_ref` for rows whose latent cache lies in fixed-size pages of a shared pool (continuous batching):
    row b's key j is token `j % P` of page `block_table[b, j // P]`.

    Args:
        q_lat: `[b, s, h, c]`; q_pe: `[b, s, h, r]` (see `mla_decode_ref`). Query i of row b sits at position
            `seq_lens[b] - s + i`: a row with fewer new tokens than `s` has its first query slots as padding (they see
            fewer keys, or none, and get zeros then).
        c_kv_pages: `[num_pages, P, c]`; k_pe_pages: `[num_pages, P, r]` (views of one latent pool may interleave).
        block_table: `[b, m]` int32 page ids; entries past `ceil(seq_lens[b] / P)` are not read.
        seq_lens: `[b]` int32 keys of each row (cached + new), at most `m · P`.
        softmax_scale: the score scale.

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`.

    Raises:
        ValueError: on shapes, dtypes, page ids or key counts that do not fit.
    """
    check_mla_decode_paged_args(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, softmax_scale)
    (c_kv, k_pe), mask = gather_pages(block_table, seq_lens, q_lat.shape[1], c_kv_pages, k_pe_pages)
    return mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)


def mla_decode_paged_fp8_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv_pages: torch.Tensor,
    c_kv_scale_pages: torch.Tensor,
    k_pe_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """`mla_decode_paged_ref` over FP8 pages: `c_kv_pages` `[num_pages, P, c]` float8_e4m3fn with
    `c_kv_scale_pages` `[num_pages, P, ceil(c/128)]` fp32 (see `mla_decode_fp8_ref`)."""
    stand_in = q_lat.new_empty(1, 1, 1).expand(c_kv_pages.shape)  # the pages' checks in the queries' dtype
    check_mla_decode_paged_args(q_lat, q_pe, stand_in, k_pe_pages, block_table, seq_lens, softmax_scale)
    s = q_lat.shape[1]
    (c_kv, scales, k_pe), mask = gather_pages(block_table, seq_lens, s, c_kv_pages, c_kv_scale_pages, k_pe_pages)
    return mla_decode_fp8_ref(q_lat, q_pe, c_kv, scales, k_pe, mask, softmax_scale)


def gather_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, s: int, *pages: torch.Tensor):
    """The keys of each row gathered from `pages` (tensors `[num_pages, P, *]`) into `[b, t, *]`, t the block table's
    pages × P, and the mask `[b, s, t]` of query i of row b at position `seq_lens[b] - s + i`."""
    num_pages, page_size = pages[0].shape[:2]
    t = block_table.shape[1] * page_size
    if (seq_lens > t).any() or (seq_lens < 0).any():
        raise ValueError(f"mla_decode_paged: seq_lens must lie in [0, {t}] (the block table's pages × {page_size})")
    pages_read = torch.arange(block_table.shape[1], device=block_table.device) * page_size < seq_lens[:, None]
    if (block_table[pages_read] < 0).any() or (block_table[pages_read] >= num_pages).any():
        raise ValueError(f"mla_decode_paged: block_table holds page ids outside [0, {num_pages})")
    ids = block_table.masked_fill(~pages_read, 0).long()  # unread entries may hold anything
    positions = seq_lens[:, None].long() - s + torch.arange(s, device=seq_lens.device)  # [b, s]
    mask = torch.arange(t, device=seq_lens.device) <= positions[:, :, None]  # [b, s, t]
    return tuple(x[ids].flatten(1, 2) for x in pages), mask


def check_mla_decode_paged_args(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, seq_lens, softmax_scale) -> None:
    """Argument checks of the paged latent decode attention (reference and Triton) that need no read-back."""
    pages_agree = c_kv_pages.dim() == k_pe_pages.dim() == 3 and c_kv_pages.shape[:2] == k_pe_pages.shape[:2]
    if q_lat.dim() != 4 or not pages_agree:
        raise ValueError(f"mla_decode_paged: expected q_lat [b, s, h, c], c_kv_pages [num_pages, P, c] and k_pe_pages "
                         f"[num_pages, P, r], got {tuple(q_lat.shape)}, {tuple(c_kv_pages.shape)} and "
                         f"{tuple(k_pe_pages.shape)}")
    b, s = q_lat.shape[:2]
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise ValueError(f"mla_decode_paged: block_table must be int32 [b={b}, pages], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if tuple(seq_lens.shape) != (b,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"mla_decode_paged: seq_lens must be int32 [b={b}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    # the dense checks, run on one-element stand-ins expanded to the shapes the pages are read into (no copy)
    t = block_table.shape[1] * c_kv_pages.shape[1]
    c_kv, k_pe = (x.new_empty(1, 1, 1).expand(b, t, x.shape[2]) for x in (c_kv_pages, k_pe_pages))
    check_mla_decode_args(q_lat, q_pe, c_kv, k_pe, torch.ones(1, 1, 1, dtype=torch.bool).expand(b, s, t), softmax_scale)


FP8_DECODE_CHUNK = 256  # cached tokens dequantised at a time by `mla_decode_fp8_ref`: fits a CPU cache, unlike 1024


def mla_decode_fp8_ref(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    c_kv_scales: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    chunk: int = FP8_DECODE_CHUNK,
) -> torch.Tensor:
    """`mla_decode_ref` over an FP8 latent cache, `chunk` cached tokens at a time: each chunk of `c_kv` is
    dequantised (`act_dequant_ref`), scored and folded into a running softmax (the online softmax of flash attention:
    a running max, a running sum and an output rescaled when the max grows), so memory stays at one chunk in fp32
    however long the cache is; nothing the size of the whole cache is materialised in full precision.

    Args:
        q_lat, q_pe, k_pe, mask, softmax_scale: as in `mla_decode_ref` (q_lat, q_pe and k_pe share a dtype).
        c_kv: `[b, t, c]` float8_e4m3fn; c_kv_scales: `[b, t, ceil(c/128)]` fp32, one scale per 1×128 tile.
        chunk: cached tokens per chunk.

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`; zeros for a query that may attend to no key.
    """
    check_mla_decode_fp8_args(q_lat, q_pe, c_kv, c_kv_scales, k_pe, mask, softmax_scale)
    b, s, h, c = q_lat.shape
    t = c_kv.shape[1]
    q = q_lat.float().reshape(b, s * h, c)
    q_rope = q_pe.float().reshape(b, s * h, -1)
    if mask is None:  # causal: query i sits at position t - s + i
        mask = torch.arange(t, device=c_kv.device) <= torch.arange(t - s, t, device=c_kv.device)[:, None]
    mask = mask.expand(b, s, t)
    running_max = torch.full((b, s * h, 1), float("-inf"), device=q.device)
    running_sum = torch.zeros(b, s * h, 1, device=q.device)
    acc = torch.zeros(b, s * h, c, device=q.device)
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        kv = act_dequant_ref(c_kv[:, start:end], c_kv_scales[:, start:end])  # [b, n, c] fp32
        scores = torch.bmm(q, kv.transpose(1, 2)) + torch.bmm(q_rope, k_pe[:, start:end].float().transpose(1, 2))
        attend = mask[:, :, None, start:end].expand(b, s, h, end - start).reshape(b, s * h, end - start)
        scores = (scores * softmax_scale).masked_fill(~attend, float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        # a row that has seen no key yet keeps max = -inf; subtracting 0 then gives exp(-inf) = 0, never NaN
        reference = torch.where(new_max == float("-inf"), 0.0, new_max)
        rescale = torch.exp(running_max - reference)
        weights = torch.exp(scores - reference)
        running_sum = running_sum * rescale + weights.sum(dim=-1, keepdim=True)
        acc = acc * rescale + torch.bmm(weights, kv)
        running_max = new_max
    o_lat = torch.where(running_sum > 0, acc / running_sum.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return o_lat.view(b, s, h, c).to(q_lat.dtype)


def check_mla_decode_fp8_args(q_lat, q_pe, c_kv, c_kv_scales, k_pe, mask, softmax_scale) -> None:
    """Argument checks of the latent decode attention over an FP8 cache (reference and Triton)."""
    if c_kv.dtype != torch.float8_e4m3fn or c_kv.dim() != 3:
        raise ValueError(f"mla_decode_fp8: c_kv must be float8_e4m3fn [b, t, c], got {c_kv.dtype} "
                         f"{tuple(c_kv.shape)}")
    tiles = -(-c_kv.shape[-1] // FP8_BLOCK)
    if c_kv_scales.dtype != torch.float32 or tuple(c_kv_scales.shape) != (*c_kv.shape[:2], tiles):
        raise ValueError(f"mla_decode_fp8: c_kv_scales must be float32 {(*c_kv.shape[:2], tiles)} (one scale per "
                         f"1×{FP8_BLOCK} tile of c_kv), got {c_kv_scales.dtype} {tuple(c_kv_scales.shape)}")
    # the dense checks, with a stand-in for c_kv in the queries' dtype expanded to its shape (no copy)
    stand_in = q_lat.new_empty(1, 1, 1).expand(c_kv.shape)
    check_mla_decode_args(q_lat, q_pe, stand_in, k_pe, mask, softmax_scale)


def sparse_mla_decode_ref(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, indices: torch.Tensor,
    valid: torch.Tensor, softmax_scale: float, return_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Absorbed MLA attention of each query over its chosen latent rows only (DeepSeek-V3.2's sparse attention): the
    rows are gathered, never a mask over all keys. Computed in the inputs' dtype (the softmax in fp32).

    Args:
        q_lat: `[b, s, h, c]`; q_pe: `[b, s, h, r]`; c_kv: `[b, t, c]`; k_pe: `[b, t, r]` (one shared dtype).
        indices: `[b, s, k]` integer rows of the cache per query; valid: `[b, s, k]` bool, False for a slot that holds
            no key (as `LightningIndexer.select` returns them). Indices of invalid slots are not attended to (any value
            in [-t, t) may be there).
        softmax_scale: the score scale.
        return_probs: also return the attention probabilities over the k slots.

    Returns:
        `o_lat` `[b, s, h, c]` in the dtype of `q_lat`; zeros for a query without a valid slot (as `mla_decode_ref`
        gives a query that may attend to no key). With `return_probs`, `(o_lat, probs [b, s, h, k] fp32)`.

    Raises:
        ValueError: on shapes, dtypes or a scale that do not fit.
    """
    check_sparse_mla_decode_args(q_lat, q_pe, c_kv, k_pe, indices, valid, softmax_scale)
    batch = torch.arange(c_kv.shape[0], device=c_kv.device)[:, None, None]
    c_sel, pe_sel = c_kv[batch, indices], k_pe[batch, indices]  # [b, s, k, c], [b, s, k, r]
    logits = (torch.einsum("bshc,bskc->bshk", q_lat, c_sel) + torch.einsum("bshr,bskr->bshk", q_pe, pe_sel))
    logits = logits * softmax_scale
    # finfo.min, not -inf: a query with no valid slot (padding) must not put NaN into the softmax or its backward
    logits = logits.masked_fill(~valid[:, :, None, :], torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    probs = torch.where(valid.any(dim=-1)[:, :, None, None], probs, 0.0)
    o_lat = torch.einsum("bshk,bskc->bshc", probs.to(q_lat.dtype), c_sel)
    return (o_lat, probs) if return_probs else o_lat


def check_sparse_mla_decode_args(q_lat, q_pe, c_kv, k_pe, indices, valid, softmax_scale) -> None:
    """Argument checks of the sparse latent attention (reference and Triton); the indices themselves are not read
    (that would stall a GPU)."""
    b, s = q_lat.shape[:2]
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (b, s) or tuple(valid.shape) != tuple(indices.shape):
        raise ValueError(f"sparse_mla_decode: indices and valid must be [b={b}, s={s}, k], got {tuple(indices.shape)} "
                         f"and {tuple(valid.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or valid.dtype != torch.bool:
        raise ValueError(f"sparse_mla_decode: indices must be int32 or int64 and valid bool, got {indices.dtype} and "
                         f"{valid.dtype}")
    # the dense checks (shapes, one shared dtype, scale), with a stand-in mask expanded to [b, s, t] (no copy)
    stand_in = torch.ones((), dtype=torch.bool, device=q_lat.device).expand(b, s, c_kv.shape[1])
    check_mla_decode_args(q_lat, q_pe, c_kv, k_pe, stand_in, softmax_scale)


# ---- FP8 (E4M3) block quantisation, docs/design.md -------------------------------------------------------------------
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


def act_dequant_ref(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                    block: int = FP8_BLOCK) -> torch.Tensor:
    """The value `q · s` of `act_quant_ref`'s output `(q [..., K], s [..., ceil(K/block)])`, in `dtype`."""
    k = q.shape[-1]
    tiles = s.shape[-1]
    padded = torch.nn.functional.pad(q.float(), (0, tiles * block - k)).unflatten(-1, (tiles, block))
    return (padded * s[..., None]).flatten(-2)[..., :k].to(dtype)


def act_quant_colwise_ref(x: torch.Tensor, scale_fmt: str | None = None, block: int = FP8_BLOCK):
    """Quantise `x` `[M, K]` in `block`×1 tiles (128 rows of one column), as the weight gradient needs.

    Returns:
        `(q [M, K] float8_e4m3fn, s [ceil(M/block), K] fp32)`.
    """
    q_t, s_t = act_quant_ref(x.t(), scale_fmt, block)  # tiles along M of x are tiles along the last dim of x^T
    return q_t.t().contiguous(), s_t.t().contiguous()


def weight_quant_ref(w: torch.Tensor, block: int | tuple[int, int] = FP8_BLOCK, scale_fmt: str | None = None):
    """Quantise `w` `[..., N, K]` (a matrix or stacked experts) in `block`×`block` tiles; the last row / column
    block may be partial. Scales as `fp8_scale_ref` (powers of two for `scale_fmt="ue8m0"`).

    Returns:
        `(q [..., N, K] float8_e4m3fn, s [..., ceil(N/block), ceil(K/block)] fp32)`, the checkpoint's
        `weight_scale_inv`.
    """
    n, k = w.shape[-2:]
    block_n, block_k = (block, block) if isinstance(block, int) else block
    nb, kb = -(-n // block_n), -(-k // block_k)
    padded = torch.nn.functional.pad(w.float(), (0, kb * block_k - k, 0, nb * block_n - n))
    tiles = padded.unflatten(-1, (kb, block_k)).unflatten(-3, (nb, block_n))  # [..., nb, Bn, kb, Bk]
    scale = fp8_scale_ref(tiles.abs().amax(dim=(-3, -1)), scale_fmt)  # [..., nb, kb]
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


def fp8_grouped_gemm_ref(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype=torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 grouped GEMM: the rows of group e times `w[e]ᵀ`, each group exactly `fp8_gemm_ref`.

    Args:
        a: `[T, K]` fp8, rows sorted by group; a_s: `[T, ceil(K/128)]` fp32 (1×128 tiles, `act_quant`).
        w: `[E, N, K]` fp8 (stacked expert weights); w_s: `[E, ceil(N/128), ceil(K/128)]` fp32 (128×128 blocks).
        offsets: `[E]` int32 cumulative row counts; `offsets[-1] == T`.

    Returns:
        `[T, N]` in `out_dtype`.
    """
    check_fp8_grouped_gemm_args(a, a_s, w, w_s, offsets, out_dtype)
    out = torch.empty(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = fp8_gemm_ref(a[start:end], a_s[start:end], w[e], w_s[e], out_dtype=out_dtype)
        start = end
    return out


def check_fp8_grouped_gemm_args(a, a_s, w, w_s, offsets, out_dtype) -> None:
    """Shared argument checks of the FP8 grouped GEMM (reference and Triton)."""
    if w.dim() != 3 or w_s.dim() != 3 or w.shape[0] == 0:
        raise ValueError(f"fp8_grouped_gemm: expected w [E, N, K] (E >= 1) and w_s [E, ceil(N/128), ceil(K/128)], got "
                         f"{tuple(w.shape)} and {tuple(w_s.shape)}")
    e, n, k = w.shape
    if tuple(w_s.shape) != (e, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)):
        raise ValueError(f"fp8_grouped_gemm: w_s must have shape {(e, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))} "
                         f"(128x128 blocks), got {tuple(w_s.shape)}")
    if offsets.shape != (e,) or offsets.dtype != torch.int32:
        raise ValueError(f"fp8_grouped_gemm: offsets must be int32 of shape [{e}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    check_fp8_gemm_args(a, a_s, w[0], w_s[0], out_dtype)


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

"""Multi-head latent attention of a continuous-batching forward: the new tokens of many requests in one flat batch,
each request attending to its own keys in the paged latent pool.

transformers' scheduler hands the model the flat batch with cumulative query / key lengths and, per token, the pool
rows to write and to read (`cu_seq_lens_q`, `cu_seq_lens_k`, `write_index`, `read_index`). `PagedBatch` turns them,
once per forward, into groups of requests:
* requests with at most `DECODE_MAX_QUERIES` new tokens (decoding) share one group, their queries left-padded to the
  longest; on CUDA, on the absorbed path, they attend through `kernels.mla_decode_paged`, the Triton kernel reading
  each request's pages through its block table;
* every longer chunk (prefill) is a group of its own;
* elsewhere, a group's keys are gathered from the pages and it goes through the module's own `attend` (expanded or
  absorbed, whichever costs less; torch on the CPU).
The MLA math stays in `attention.py` and `kernels/`, DeepSeek-V3.2's sparse attention in `indexer.py` (`attend_sparse`
hands each group's queries and gathered rows, indexer keys included, to `indexer.attend_chosen_keys`): this module
only arranges queries and pages.

Dimension letters: T tokens of the flat batch, b requests of a group, s query slots, t key slots, h heads,
c kv_lora_rank, r qk_rope_head_dim, v v_head_dim, P page size.
References: docs/design.md (Continuous batching); transformers `generation/continuous_batching/input_outputs.py`
(the batch layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .indexer import SparseQueries, attend_chosen_keys, cached_keys
from .kernels import MLA_DECODE_MAX_QUERIES, mla_decode_paged, mla_decode_paged_fp8, use_triton
from .latent_fp8 import FP8Latent
from .paged_cache import PagedLatentCache

# new tokens per request up to which requests share a padded group (decoding, short chunks): what the kernel serves
DECODE_MAX_QUERIES = MLA_DECODE_MAX_QUERIES


def reads_pages_in_place(x: torch.Tensor) -> bool:
    """Whether decode groups attend with `mla_decode_paged`, whose Triton kernel reads each request's pages in place
    (CUDA, see `kernels.use_triton`), rather than through the module's own absorbed path over keys gathered from the
    pages (elsewhere: the reference of `mla_decode_paged` gathers whole pages and checks the block table, which costs
    more there)."""
    return use_triton(x)


@dataclass
class RequestGroup:
    """Requests attended together: `query_rows` `[b, s]` index the flat batch (left-padded slots repeat the request's
    first token, `real` `[b, s]` marks the others); `token_rows` `[b, t]` are the pool rows of each request's keys
    (padding: an unwritten row); `seq_lens` `[b]` int32 key counts; `mask` `[b, 1, s, t]` additive (0 where a slot
    sees a key); `block_table` `[b, ceil(t / P)]` int32 pages (decode groups, else None)."""

    query_rows: torch.Tensor
    real: torch.Tensor
    token_rows: torch.Tensor
    seq_lens: torch.Tensor
    mask: torch.Tensor
    block_table: torch.Tensor | None


def queries_of(group: RequestGroup, *flat: torch.Tensor) -> list[torch.Tensor]:
    """Each of `flat` `[1, T, ...]` at the group's query slots: `[b, s, ...]`."""
    # index_select, not indexing with [b, s] tensors: several times faster on the CPU
    rows = group.query_rows.flatten()
    return [x[0].index_select(0, rows).unflatten(0, group.query_rows.shape) for x in flat]


def store(out: torch.Tensor, group: RequestGroup, group_out: torch.Tensor) -> None:
    """Writes the group's output `[b, s, ...]` of its real query slots into the flat batch's `out` `[T, ...]`."""
    real = group.real.flatten()
    out.index_copy_(0, group.query_rows.flatten()[real], group_out.flatten(0, 1)[real])


class PagedBatch:
    """The request layout of one continuous-batching forward, shared by every layer.

    Args:
        cache: the paged latent cache the scheduler allocated the requests' pages in.
        cb_kwargs: the model's keyword arguments from transformers' batch (`cu_seq_lens_q`, `cu_seq_lens_k`,
            `read_index`, `write_index`).
        dtype: the activations' dtype (for the additive masks).

    Raises:
        ValueError: when a continuous-batching argument is missing.
    """

    def __init__(self, cache: PagedLatentCache, cb_kwargs: dict, dtype: torch.dtype) -> None:
        missing = [k for k in ("cu_seq_lens_q", "cu_seq_lens_k", "read_index", "write_index") if k not in cb_kwargs]
        if missing:
            raise ValueError(f"a forward over a paged cache needs transformers' batch arguments; missing {missing}")
        self.cache = cache
        allocator = cache.allocator
        cu_q = cb_kwargs["cu_seq_lens_q"].long()
        cu_k = cb_kwargs["cu_seq_lens_k"][allocator.layer_type].long()
        self.write_index = cb_kwargs["write_index"][allocator.index]
        read_index = cb_kwargs["read_index"][allocator.index]
        # a batch of first chunks only reads nothing back: each request's keys are then its own new tokens
        key_rows = read_index if read_index.numel() > 0 else self.write_index

        q_lens = (cu_q[1:] - cu_q[:-1]).tolist()
        requests = [i for i, n in enumerate(q_lens) if n > 0]  # padded batches end with empty sequences
        decode = [i for i in requests if q_lens[i] <= DECODE_MAX_QUERIES]
        self.groups = [self._group(decode, cu_q, cu_k, key_rows, dtype, paged=True)] if decode else []
        self.groups += [self._group([i], cu_q, cu_k, key_rows, dtype) for i in requests if i not in decode]

    def _group(self, requests, cu_q, cu_k, key_rows, dtype, paged: bool = False) -> RequestGroup:
        device = cu_q.device
        index = torch.tensor(requests, device=device)
        q_start, q_len = cu_q[index], cu_q[index + 1] - cu_q[index]  # [b]
        k_start, k_len = cu_k[index], cu_k[index + 1] - cu_k[index]
        b, s, t = len(requests), int(q_len.max()), int(k_len.max())
        slots = torch.arange(s, device=device) - (s - q_len[:, None])  # [b, s]: query index, negative = padding
        real = slots >= 0
        query_rows = q_start[:, None] + slots.clamp(min=0)
        keys = torch.arange(t, device=device)
        has_key = keys < k_len[:, None]  # [b, t]
        token_rows = torch.where(has_key, key_rows[(k_start[:, None] + keys).clamp(max=key_rows.numel() - 1)],
                                 self.cache.allocator.read_trash_index)  # fmt: skip
        # slot j of request b is the token at position k_len[b] - s + j; additive, the form every attention
        # implementation takes (eager_paged adds the mask as it is)
        visible = keys <= (k_len[:, None] - s + torch.arange(s, device=device))[:, None, :, None]  # [b, 1, s, t]
        mask = torch.zeros(b, 1, s, t, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
        block_table = None
        if paged:  # the first key of each page names the page (rows of a page are consecutive, page-aligned)
            page = self.cache.allocator.tokens_per_page
            block_table = (token_rows[:, ::page] // page).to(torch.int32)
        return RequestGroup(query_rows, real, token_rows, k_len.to(torch.int32), mask, block_table)

    def attend(
        self,
        mla: nn.Module,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
    ) -> torch.Tensor:
        """Stores the new latents in the pool and attends every request's queries to its own keys.

        Args:
            mla: the `MultiHeadLatentAttention` module of the layer (its weights, its `attend` and `absorbed` paths).
            q_nope: `[1, T, h, n]`; q_pe: `[1, T, h, r]` (rotated); c_kv: `[1, T, c]` (normalised); k_pe: `[1, T, r]`.

        Returns:
            `[1, T, h, v]`.
        """
        allocator, layer = self.cache.allocator, mla.layer_idx
        allocator.write(layer, c_kv[0], k_pe[0], self.write_index)
        out = q_nope.new_empty(*q_nope.shape[:3], mla.v_head_dim)[0]  # [T, h, v]
        for group in self.groups:
            s, t = group.query_rows.shape[1], group.token_rows.shape[1]
            group_q_nope, group_q_pe = queries_of(group, q_nope, q_pe)  # [b, s, h, *]
            if group.block_table is not None and reads_pages_in_place(q_nope) and mla.use_absorbed(s, t):
                group_out = self._attend_pages(mla, group, group_q_nope, group_q_pe)
            else:
                c_kv, k_pe, _ = allocator.split(self._keys_of(group, layer))
                group_out = mla.attend(group_q_nope, group_q_pe, c_kv, k_pe, group.mask)
            store(out, group, group_out)
        return out[None]

    def attend_sparse(
        self, mla: nn.Module, queries: SparseQueries, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> torch.Tensor:
        """DeepSeek-V3.2's `attend`: stores the new latents (rounded through FP8) and indexer keys in the pool, then
        each request's queries attend to the `index_topk` of its own keys its lightning indexer picks, as over an
        `MLACache` (`indexer.attend_chosen_keys`).

        Args:
            queries: the flat batch's `SparseQueries` (`b = 1`, `s = T`); the others as `attend`'s.

        Returns:
            `[1, T, h, v]`.
        """
        allocator, layer = self.cache.allocator, mla.layer_idx
        c_kv, k8, k_scale = cached_keys(mla, queries, c_kv)
        allocator.write(layer, c_kv[0], k_pe[0], self.write_index, (k8[0], k_scale[0]))
        q_nope = queries.q_nope
        out = q_nope.new_empty(*q_nope.shape[:3], mla.v_head_dim)[0]  # [T, h, v]
        for group in self.groups:
            group_c_kv, group_k_pe, index_keys = allocator.split(self._keys_of(group, layer))
            allowed = group.mask[:, 0] == 0  # [b, s, t]: each slot's own request's keys up to its position
            *group_queries, cos, sin = queries_of(group, *queries[:4], *queries.position_embeddings)
            group_out = attend_chosen_keys(mla, SparseQueries(*group_queries, (cos, sin)), group_c_kv, group_k_pe,
                                           index_keys.values, index_keys.scales[..., 0], allowed)
            store(out, group, group_out)
        return out[None]

    def _keys_of(self, group: RequestGroup, layer: int) -> torch.Tensor:
        """`[b, t, row]`: the rows of each request's keys in layer `layer`'s pages."""
        b, t = group.token_rows.shape
        return self.cache.allocator.rows(layer).index_select(0, group.token_rows.flatten()).view(b, t, -1)

    def _attend_pages(self, mla: nn.Module, group: RequestGroup, q_nope: torch.Tensor, q_pe: torch.Tensor):
        """The absorbed path of a decode group, its latent attention reading each request's pages in place."""
        c_kv, k_pe, _ = self.cache.allocator.split(self.cache.allocator.pages(mla.layer_idx))  # [pages, P, *]
        if isinstance(c_kv, FP8Latent):
            return mla.absorbed(q_nope, lambda q_lat: mla_decode_paged_fp8(
                q_lat, q_pe, c_kv.values, c_kv.scales, k_pe, group.block_table, group.seq_lens, mla.softmax_scale
            ))  # fmt: skip
        return mla.absorbed(q_nope, lambda q_lat: mla_decode_paged(
            q_lat, q_pe, c_kv, k_pe, group.block_table, group.seq_lens, mla.softmax_scale
        ))  # fmt: skip

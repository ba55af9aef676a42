"""Paged latent cache for continuous batching: transformers' scheduler hands out fixed-size pages per request, and a
page holds, for `P` tokens of one layer, only MLA's normalised `c_kv` and rotated `k_pe` (`kv_lora_rank +
qk_rope_head_dim` values per token), never per-head keys and values.

transformers' `PagedAttentionCache` sizes its pool for `num_key_value_heads × head_dim` keys and as many values per
token; `PagedLatentCache` sizes it for one latent row per token and lays the pool out with `LatentPageAllocator`.
Sectors, blocks per request, admission, prefix sharing and freeing stay transformers' own.

Pool layout (one block = one page per layer, L layers): `[L0 rows | L1 rows | ... ]` per block, a row `[c_kv | k_pe]`;
the row of token n of a request is `block_table[n // P] · P·L + layer · P + n % P`. With `cache_dtype="fp8"` a row is
bytes: `[c_kv e4m3 | its 1×128 tile scales fp32 | k_pe in the model's dtype | padding]` (`cache.py`: the rounding),
padded so that transformers' sizing (keys and values of one width) fits it exactly. For DeepSeek-V3.2 a row is bytes
`[c_kv | k_pe in the model's dtype | the indexer key: D e4m3 values | its fp32 scale | padding]`, the key packed as
the FP8 latent is (`fp8_packing`); FP8 latents are refused for it.
Dimension letters: T tokens of the flat batch, P page size, c kv_lora_rank, r qk_rope_head_dim.
References: docs/design.md (Continuous batching); PagedAttention (Kwon et al. 2023); transformers
`generation/continuous_batching/cache.py` and `cache_allocators/full_attention.py`.
"""

from __future__ import annotations

import copy

import torch
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator

from .configuration import DeepseekV3Config, DeepseekV32Config
from .kernels import act_quant
from .latent_fp8 import FP8Latent, check_cache_dtype
from .private_api import init_cache_allocator, register_allocator_tensor


def fp8_packing(n: int) -> tuple[int, int]:
    """Bytes of `n` FP8 e4m3 values packed with the fp32 scales of their 1×128 tiles: `(scales start, end)`, the
    scales starting on a multiple of 4 after the values (fp32 alignment)."""
    scales = -(-n // 4) * 4
    return scales, scales + 4 * -(-n // 128)


def packed_fp8(rows: torch.Tensor, start: int, n: int) -> FP8Latent:
    """The `FP8Latent` view of `n` values packed at byte `start` of rows `[..., row bytes]` (`fp8_packing`)."""
    scales, end = fp8_packing(n)
    return FP8Latent(rows[..., start : start + n].view(torch.float8_e4m3fn),
                     rows[..., start + scales : start + end].view(torch.float32))  # fmt: skip


def fp8_row_layout(config: DeepseekV3Config, dtype: torch.dtype) -> tuple[int, int, int]:
    """Byte offsets in an FP8 row: `(scales start, k_pe start, row bytes)`. The `c` e4m3 values and their scales
    (`fp8_packing`), `k_pe` after them, and the row rounded up to whole pairs of `dtype` elements (transformers sizes a
    token as a key and a value of one width) and to 4 bytes (the next row's scales stay aligned)."""
    c, r = config.kv_lora_rank, config.qk_rope_head_dim
    scales, rope = fp8_packing(c)
    return scales, rope, row_unit_bytes(rope + r * dtype.itemsize, dtype)


def row_unit_bytes(n: int, dtype: torch.dtype) -> int:
    """`n` bytes rounded up to whole pairs of `dtype` elements and to 4 bytes."""
    unit = max(2 * dtype.itemsize, 4)
    return -(-n // unit) * unit


def indexed(config: DeepseekV3Config) -> bool:
    """Whether a row also holds the token's DeepSeek-V3.2 indexer key (the config of a `deepseek_v32` model)."""
    return isinstance(config, DeepseekV32Config)


def index_key_start(config: DeepseekV3Config, dtype: torch.dtype) -> int:
    """Byte where a DeepSeek-V3.2 row's indexer key starts: after `[c_kv | k_pe]` in `dtype`, on a multiple of 4."""
    return -(-(config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize // 4) * 4


def row_bytes(config: DeepseekV3Config, dtype: torch.dtype, cache_dtype: str | None) -> int:
    """Bytes of one token's row of one layer: `(c + r) × element size`, or an FP8 row's (`fp8_row_layout`); for
    DeepSeek-V3.2 (full-precision latent only), `[c_kv | k_pe | indexer key: D e4m3 values | its fp32 scale]`."""
    if indexed(config):
        check_cache_dtype(cache_dtype, None, config)  # FP8 latents are refused for DeepSeek-V3.2
        return row_unit_bytes(index_key_start(config, dtype) + fp8_packing(config.index_head_dim)[1], dtype)
    if cache_dtype is None:
        return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize
    return fp8_row_layout(config, dtype)[2]


class LatentPageAllocator(FullAttentionCacheAllocator):
    """transformers' full-attention allocator (blocks per request, read/write indices, prefix sharing) over pages of
    one latent row per token instead of a key row and a value row."""

    rows_per_token = 1

    def __init__(
        self, index: int, config: DeepseekV3Config, cache_dtype: torch.dtype, page_size: int, layer_indices: list[int],
        allow_block_sharing: bool, latent_dtype: str | None = None, scale_fmt: str | None = None,
    ) -> None:  # fmt: skip
        self.kv_lora_rank = config.kv_lora_rank
        self.rope_dim = config.qk_rope_head_dim
        self.cache_dtype = cache_dtype  # the model's dtype: the rows' own, or k_pe's in FP8 rows
        self.latent_dtype, self.scale_fmt = latent_dtype, scale_fmt
        _, self.rope_start, _ = fp8_row_layout(config, cache_dtype)
        # DeepSeek-V3.2: the indexer key (`index_head_dim` e4m3 values and a scale) follows the latent
        self.index_head_dim = config.index_head_dim if indexed(config) else None
        self.index_start = index_key_start(config, cache_dtype)
        # a row's elements: values of the model's dtype, or bytes for FP8 values in the row
        packs_fp8 = latent_dtype is not None or self.index_head_dim is not None
        self.row_dtype = torch.uint8 if packs_fp8 else cache_dtype
        self.latent_dim = row_bytes(config, cache_dtype, latent_dtype) // self.row_dtype.itemsize
        self.peak_blocks = 0
        bytes_per_page = self.latent_dim * self.row_dtype.itemsize * page_size
        init_cache_allocator(self, index, layer_indices, page_size, bytes_per_page, allow_block_sharing)

    def register_cache_tensor(self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor: torch.Tensor, pool):
        self.bytes_per_sector = bytes_per_sector
        total_rows = (non_trash_bytes + 2 * bytes_per_sector) // (self.latent_dim * self.row_dtype.itemsize)
        rows = cache_tensor.view(self.row_dtype)[: total_rows * self.latent_dim].view(total_rows, self.latent_dim)
        register_allocator_tensor(self, cache_tensor, rows, non_trash_bytes, bytes_per_sector, pool)
        # layer i's rows start at its page of block 0, so row `block · P·L + n % P` is token n of that block's page
        page = self.tokens_per_page
        self.layer_rows = {layer: rows[i * page :] for i, layer in enumerate(self.layer_indices)}

    def rows(self, layer_idx: int) -> torch.Tensor:
        """`[rows, c + r]`: layer `layer_idx`'s view of the pool, indexed by transformers' read / write indices."""
        return self.layer_rows[layer_idx]

    def pages(self, layer_idx: int) -> torch.Tensor:
        """`[pages, P, c + r]`: the same view by whole pages; page `block · L` is the block's page of this layer."""
        rows = self.layer_rows[layer_idx]
        page = self.tokens_per_page
        return rows[: rows.shape[0] // page * page].view(-1, page, self.latent_dim)

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, write_index: torch.Tensor,
              index_keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Stores `c_kv` `[T, c]` and `k_pe` `[T, r]` at the rows `write_index` `[T]` (`c_kv` rounded to FP8 in FP8
        rows), and for DeepSeek-V3.2 `index_keys`: the indexer's FP8 keys `[T, D]` and their scales `[T]`."""
        if (index_keys is None) != (self.index_head_dim is None):
            raise ValueError(f"index_keys are written with the rows of DeepSeek-V3.2 pages only: this pool holds "
                             f"{'no' if self.index_head_dim is None else 'the'} indexer keys")  # fmt: skip
        if self.row_dtype != torch.uint8:
            rows = torch.cat([c_kv, k_pe], dim=-1).to(self.cache_dtype)
        else:
            rows = torch.zeros(len(c_kv), self.latent_dim, dtype=torch.uint8, device=c_kv.device)
            c_kv_part, k_pe_part, index_part = self.split(rows)
            if self.latent_dtype is None:
                c_kv_part.copy_(c_kv)
            else:
                c_kv_part.values[:], c_kv_part.scales[:] = act_quant(c_kv.contiguous(), self.scale_fmt)
            k_pe_part.copy_(k_pe)
            if index_keys is not None:
                index_part.values.copy_(index_keys[0])
                index_part.scales.copy_(index_keys[1][:, None])
        self.layer_rows[layer_idx].index_copy_(0, write_index, rows)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor | FP8Latent, torch.Tensor, FP8Latent | None]:
        """`(c_kv, k_pe, index keys)` views of rows `[..., row]` of this pool (whole rows, as `rows` or `pages` give
        them): `c_kv` `[..., c]`, or an `FP8Latent` of FP8 rows, `k_pe` `[..., r]`, and for DeepSeek-V3.2 the indexer
        keys as an `FP8Latent` (values `[..., D]`, scales `[..., 1]`), else None."""
        c = self.kv_lora_rank
        if self.row_dtype != torch.uint8:
            return rows[..., :c], rows[..., c : c + self.rope_dim], None
        index_keys = None if self.index_head_dim is None else packed_fp8(rows, self.index_start, self.index_head_dim)
        if self.latent_dtype is None:
            latent = rows[..., : self.index_start].view(self.cache_dtype)
            return latent[..., :c], latent[..., c : c + self.rope_dim], index_keys
        rope = self.rope_start
        rope_end = rope + self.rope_dim * self.cache_dtype.itemsize
        return packed_fp8(rows, 0, c), rows[..., rope:rope_end].view(self.cache_dtype), index_keys

    def used_blocks(self) -> int:
        """Blocks held by live requests (shared ones once); blocks kept only for prefix reuse are not counted."""
        sectors = self.pool.num_sectors - self.pool.num_free_sectors  # one allocator: every taken sector is ours
        free = self.pool.count_free_blocks(self.index) + len(self.ledger.cached_blocks)
        return sectors * self.blocks_per_sector - free

    def allocate_cache_to_request(self, request_id: str, past_length: int, query_length: int) -> None:
        super().allocate_cache_to_request(request_id, past_length, query_length)
        self.peak_blocks = max(self.peak_blocks, self.used_blocks())


def latent_sizing_config(config: DeepseekV3Config, dtype: torch.dtype, cache_dtype: str | None,
                         drafter_layers: int = 0) -> DeepseekV3Config:
    """A copy of `config` through which transformers sizes pages for the latent: its page holds keys and values of
    `num_key_value_heads × head_dim` each per token (or a latent of `kv_lora_rank + qk_rope_head_dim`), so one "head"
    of half a row (`row_bytes`) gives exactly a row (as does a latent of a row); and `drafter_layers` more layers
    after the decoder's (the MTP module that drafts inside continuous batching, layer `num_hidden_layers`)."""
    latent_dim = config.kv_lora_rank + config.qk_rope_head_dim
    if cache_dtype is None and not indexed(config) and latent_dim % 2:
        raise ValueError(
            f"continuous batching: kv_lora_rank + qk_rope_head_dim = {latent_dim} must be even (transformers sizes "
            "cache pages as keys and values of one width, here half the latent each)"
        )
    sizing = copy.copy(config)
    row = row_bytes(config, dtype, cache_dtype) // dtype.itemsize  # in elements of the model's dtype
    sizing.num_key_value_heads, sizing.head_dim = 1, row // 2
    # transformers' own latent sizing (for configs with kv_lora_rank) counts `kv_lora_rank + qk_rope_head_dim` values
    sizing.kv_lora_rank = row - config.qk_rope_head_dim
    sizing.num_hidden_layers = config.num_hidden_layers + drafter_layers
    return sizing


class PagedLatentCache(PagedAttentionCache):
    """transformers' paged cache whose pages hold the MLA latent (`c_kv`, `k_pe`) of each token and layer.

    Built by `generate_batch` / `init_continuous_batching` of `DeepseekV3ForCausalLM` (same arguments as
    `PagedAttentionCache`); the attention writes and reads it through `paged_attention.PagedBatch`.

    Example:
        >>> with model.continuous_batching_context_manager(continuous_batching_config=cb_config) as manager:
        ...     cache = manager.batch_processor.cache
        ...     cache.allocated_bytes(), cache.used_bytes(), cache.bytes_per_token()
    """

    cache_dtype: str | None = None  # "fp8": FP8 rows (`with_options`)
    scale_fmt: str | None = None

    @classmethod
    def with_options(cls, cache_dtype: str | None = None, scale_fmt: str | None = None) -> type[PagedLatentCache]:
        """This class with FP8 rows (`cache_dtype="fp8"`, `scale_fmt` as `MLACache`'s), for transformers to build."""
        check_cache_dtype(cache_dtype, scale_fmt)
        return type(cls.__name__, (cls,), {"cache_dtype": cache_dtype, "scale_fmt": scale_fmt})

    drafter_layers = 0  # pages per block beyond the decoder's (see `PagedLatentCacheWithDrafter`)

    def __init__(self, config: DeepseekV3Config, continuous_batching_config, device, distributed_helper,
                 dtype: torch.dtype = torch.float16, model_supports_logits_to_keep: bool = False) -> None:  # fmt: skip
        sizing = latent_sizing_config(config, dtype, self.cache_dtype, self.drafter_layers)
        super().__init__(sizing, continuous_batching_config, device, distributed_helper, dtype,
                         model_supports_logits_to_keep)  # fmt: skip
        self.config = config
        # transformers laid the pool out for key and value rows; the same bytes become latent rows
        (name, sized), *others = self.cache_allocators.items()
        if others:
            raise ValueError(f"continuous batching: expected one attention type, got {list(self.cache_allocators)}")
        allocator = LatentPageAllocator(
            sized.index, config, dtype, sized.tokens_per_page, sized.layer_indices, self.allow_block_sharing,
            self.cache_dtype, self.scale_fmt,
        )  # fmt: skip
        if allocator.bytes_per_block != sized.bytes_per_block:
            raise RuntimeError(f"latent block of {allocator.bytes_per_block} bytes where transformers sized "
                               f"{sized.bytes_per_block}: its cache sizing changed")  # fmt: skip
        allocator.register_cache_tensor(
            self.bytes_per_sector, self.num_sectors * self.bytes_per_sector, self.cache_tensor, self.pool
        )
        self.cache_allocators[name] = allocator
        self.layer_to_allocator = dict.fromkeys(allocator.layer_indices, allocator)
        self.allocator = allocator

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers: `L · (kv_lora_rank + qk_rope_head_dim) · element size`, or
        `L · row_bytes` with FP8 rows."""
        return self.allocator.bytes_per_block // self.allocator.tokens_per_page

    def allocated_bytes(self) -> int:
        """Bytes of the whole pool, reserved up front (two never-allocated padding sectors included)."""
        return self.cache_tensor.nbytes

    def used_bytes(self) -> int:
        """Bytes of the blocks held by live requests now."""
        return self.allocator.used_blocks() * self.allocator.bytes_per_block

    def peak_used_bytes(self) -> int:
        """The most bytes live requests held at once since the cache was built."""
        return self.allocator.peak_blocks * self.allocator.bytes_per_block

    def max_request_tokens(self) -> int:
        """The longest request (prompt + new tokens) the pool can hold: every block of it."""
        return self.allocator.num_blocks * self.allocator.tokens_per_page


class PagedLatentCacheWithDrafter(PagedLatentCache):
    """The paged latent cache of continuous batching with MTP drafting: each block also holds a page for MTP module 1
    (decoder layer `num_hidden_layers`), whose latents of a request's positions sit at the same rows as the main
    layers' (`speculative_batching.py`)."""

    drafter_layers = 1

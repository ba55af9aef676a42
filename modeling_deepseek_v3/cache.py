"""Latent KV cache of Multi-head Latent Attention: per layer only the normalised `c_kv` and the rotated `k_pe`.

The latents are kept as the keys (`c_kv`, `[b, 1, t, c]`) and values (`k_pe`, `[b, 1, t, r]`) of transformers cache
layers, so everything `generate()` does with a cache (masks, beam reordering, cropping, batch selection) works
unchanged. The dynamic layer grows into pre-allocated storage (capacity doubles), so a decode step writes one token
instead of re-allocating the whole cache as `torch.cat` would. Each token's `c_kv` and `k_pe` sit side by side in one
row of that storage (when their dtypes agree), so the absorbed decode step can read the cache as one `[t, c + r]`
tensor, keys and values at once (`attention.side_by_side`).

With `cache_dtype="fp8"` (`MLACache`, `MLAStaticCache`) `c_kv` is stored as float8_e4m3fn with one fp32 scale per
1×128 tile (`kernels.act_quant`: scale = max(amax, 1e-4)/448, a power of two above that with `scale_fmt="ue8m0"`), as
DeepSeek-V3.2 serves it; `k_pe` stays in the model's dtype. The layers then return an `FP8Latent` (values and scales)
in place of `c_kv`, which the attention decodes without dequantising the whole cache (`kernels.mla_decode_fp8`).
A kv_lora_rank that is not a multiple of 128 has a partial last tile, scaled by the amax of its own values.
For DeepSeek-V3.2 each layer also keeps its lightning indexer's keys beside the latents (`IndexedLatentCacheLayer`,
`IndexedStaticLayer` in the static cache): one FP8 e4m3 key `[D]` and its fp32 scale per token, as DeepSeek's code
keeps `k_cache` and `k_scale_cache`.
Dimension letters: b batch, t cached tokens, c kv_lora_rank, r qk_rope_head_dim, D index_head_dim.
References: DeepSeek-V3 report §2.1.1 (only c_kv and k_pe are cached); DeepSeek-V3.2 inference `model.py` (the FP8
latent cache); docs/design.md (Multi-head Latent Attention); docs/inference.md (FP8 latent cache).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticCache, StaticLayer

from .configuration import DeepseekV3Config, DeepseekV32Config
from .kernels import act_quant
from .latent_fp8 import FP8Latent, check_cache_dtype

MIN_CAPACITY = 256  # also the room left after a prompt, so that the decode steps after it do not copy it


def latent_token_bytes(layer) -> int:
    """Bytes of one token in one row of a cache layer: its `c_kv` and `k_pe`, the tile scales of an FP8 layer, and
    the indexer key and scale of a DeepSeek-V3.2 layer."""
    fp8 = isinstance(layer, (FP8LatentCacheLayer, FP8StaticLayer))
    stored = [layer.keys, layer.values, *([layer.scales] if fp8 else [])]
    latent = sum(x.shape[-1] * x.element_size() for x in stored)
    if getattr(layer, "_index_keys", None) is None:
        return latent
    return latent + layer._index_keys.shape[-1] * layer._index_keys.element_size() + layer._index_scales.element_size()


def new_index_keys(cache_kwargs: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens' indexer keys a DeepSeek-V3.2 layer passes to its cache: `(FP8 values [b, s, D],
    scales [b, s])`."""
    if not cache_kwargs or "index_keys" not in cache_kwargs or "index_scales" not in cache_kwargs:
        raise ValueError("a DeepSeek-V3.2 cache layer's update needs cache_kwargs with 'index_keys' and 'index_scales' "
                         "(the indexer's keys of the new tokens)")
    return cache_kwargs["index_keys"], cache_kwargs["index_scales"]


class LatentCacheLayer(DynamicLayer):
    """A dynamic cache layer holding `c_kv` as keys and `k_pe` as values in geometrically grown storage."""

    _layer_type = "mla_latent"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._c_kv: torch.Tensor | None = None  # [b, 1, capacity, c]
        self._k_pe: torch.Tensor | None = None  # [b, 1, capacity, r]
        self._rows: torch.Tensor | None = None  # [b, 1, capacity, c + r]: both above as views, when dtypes agree
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states, 0)
        self.length = 0
        self._publish()
        self.is_initialized = True

    def _allocate(self, c_kv: torch.Tensor, k_pe: torch.Tensor, capacity: int) -> None:
        """Empty storage for `capacity` tokens of rows like `c_kv` and `k_pe`: one buffer of `[c_kv | k_pe]` rows
        when their dtypes agree (under autocast they may not), two buffers otherwise."""
        b, c, r = c_kv.shape[0], c_kv.shape[-1], k_pe.shape[-1]
        if c_kv.dtype == k_pe.dtype:
            self._set_rows(c_kv.new_empty(b, 1, capacity, c + r), c)
        else:
            self._rows = None
            self._c_kv = c_kv.new_empty(b, 1, capacity, c)
            self._k_pe = k_pe.new_empty(b, 1, capacity, r)

    def _set_rows(self, rows: torch.Tensor, c: int) -> None:
        self._rows, self._c_kv, self._k_pe = rows, rows[..., :c], rows[..., c:]

    def _publish(self) -> None:
        # `keys` / `values` are what transformers reads (offload, iteration): views of the filled part.
        self.keys = self._c_kv[:, :, : self.length]
        self.values = self._k_pe[:, :, : self.length]

    def _grow(self, needed: int) -> None:
        # the first fill (a prompt) gets MIN_CAPACITY tokens of room; later ones double
        capacity = max(needed + MIN_CAPACITY if self.length == 0 else needed, 2 * self._c_kv.shape[2])
        old_c_kv, old_k_pe = self._c_kv[:, :, : self.length], self._k_pe[:, :, : self.length]
        self._allocate(old_c_kv, old_k_pe, capacity)
        self._c_kv[:, :, : self.length] = old_c_kv
        self._k_pe[:, :, : self.length] = old_k_pe

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `c_kv` `[b, 1, s, c]` and `k_pe` `[b, 1, s, r]`; return all cached latents."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self._c_kv.shape[2]:
            self._grow(end)
        self._c_kv[:, :, self.length : end] = key_states
        self._k_pe[:, :, self.length : end] = value_states
        self.length = end
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


    def reset(self) -> None:
        self._c_kv = self._k_pe = self._rows = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        self._publish()

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        if self._rows is None:
            self._c_kv, self._k_pe = fn(self._c_kv), fn(self._k_pe)
        else:
            self._set_rows(fn(self._rows), self._c_kv.shape[-1])
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class IndexedLatentCacheLayer(LatentCacheLayer):
    """A `LatentCacheLayer` that also keeps the DeepSeek-V3.2 indexer's keys of the cached tokens: FP8 e4m3 values
    `[b, t, D]` and their power-of-two scales `[b, t]` fp32, grown, cropped and batch-mapped with the latents."""

    _layer_type = "mla_latent_indexed"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._index_keys: torch.Tensor | None = None  # [b, capacity, D] float8_e4m3fn
        self._index_scales: torch.Tensor | None = None  # [b, capacity] fp32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the latents as `LatentCacheLayer.update`, and the new tokens' indexer keys from `cache_kwargs`:
        `"index_keys"` `[b, s, D]` (FP8) and `"index_scales"` `[b, s]`. Read them back with `index_keys()`."""
        index_keys, index_scales = new_index_keys(cache_kwargs)
        start = self.length
        keys, values = super().update(key_states, value_states)
        if self._index_keys is None or self.length > self._index_keys.shape[1]:
            self._grow_index(index_keys, index_scales, start)
        self._index_keys[:, start : self.length] = index_keys
        self._index_scales[:, start : self.length] = index_scales
        return keys, values

    def _grow_index(self, index_keys: torch.Tensor, index_scales: torch.Tensor, kept: int) -> None:
        # the same capacity as the latents' storage, so that both grow together
        capacity = self._c_kv.shape[2]
        new_keys = index_keys.new_empty(index_keys.shape[0], capacity, index_keys.shape[-1])
        new_scales = index_scales.new_empty(index_scales.shape[0], capacity)
        if self._index_keys is not None:
            new_keys[:, :kept], new_scales[:, :kept] = self._index_keys[:, :kept], self._index_scales[:, :kept]
        self._index_keys, self._index_scales = new_keys, new_scales

    def index_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer keys of the cached tokens: `(FP8 values [b, t, D], scales [b, t])`."""
        return self._index_keys[:, : self.length], self._index_scales[:, : self.length]

    def reset(self) -> None:
        self._index_keys = self._index_scales = None
        super().reset()

    def _map_batch(self, fn) -> None:
        if self.is_initialized and self._index_keys is not None:
            self._index_keys, self._index_scales = fn(self._index_keys), fn(self._index_scales)
        super()._map_batch(fn)


class IndexedStaticLayer(StaticLayer):
    """A static layer of `MLAStaticCache` for DeepSeek-V3.2: beside `c_kv` and `k_pe`, the indexer's keys in
    pre-allocated `[b, max_cache_len, D]` FP8 values and `[b, max_cache_len]` scales, written at the same slots.
    `index_keys()` returns all slots; those past the stored tokens hold zeros, which the attention mask leaves out."""

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        super().__init__(max_cache_len, **kwargs)
        self._index_keys: torch.Tensor | None = None
        self._index_scales: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        index_keys, index_scales = new_index_keys(cache_kwargs)
        if self._index_keys is None:
            b, device = index_keys.shape[0], index_keys.device
            self._index_keys = torch.zeros(b, self.max_cache_len, index_keys.shape[-1], dtype=index_keys.dtype,
                                           device=device)
            self._index_scales = torch.zeros(b, self.max_cache_len, dtype=index_scales.dtype, device=device)
        slots = torch.arange(index_keys.shape[1], device=index_keys.device) + self.get_seq_length()
        keys, values = super().update(key_states, value_states)
        # index_copy_ has no FP8 kernel on every device: the bytes are copied
        self._index_keys.view(torch.uint8).index_copy_(1, slots, index_keys.view(torch.uint8))
        self._index_scales.index_copy_(1, slots, index_scales)
        return keys, values

    def index_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer keys of every slot: `(FP8 values [b, max_cache_len, D], scales [b, max_cache_len])`."""
        return self._index_keys, self._index_scales

    def reset(self) -> None:
        super().reset()
        if self._index_keys is not None:
            self._index_keys.view(torch.uint8).zero_()
            self._index_scales.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._index_keys is not None:
            self._index_keys = self._index_keys.index_select(0, beam_idx.to(self._index_keys.device))
            self._index_scales = self._index_scales.index_select(0, beam_idx.to(self._index_scales.device))


class FP8LatentCacheLayer(LatentCacheLayer):
    """`LatentCacheLayer` storing `c_kv` as e4m3 `keys` with tile scales beside them; `k_pe` (`values`) unchanged."""

    def __init__(self, scale_fmt: str | None = None, **kwargs) -> None:
        check_cache_dtype("fp8", scale_fmt)
        super().__init__(**kwargs)
        self.scale_fmt = scale_fmt
        self._scales: torch.Tensor | None = None  # [b, 1, capacity, tiles]

    def _allocate(self, c_kv: torch.Tensor, k_pe: torch.Tensor, capacity: int) -> None:
        (b, _, _, c), r = c_kv.shape, k_pe.shape[-1]
        self._rows = None
        self._c_kv = torch.empty(b, 1, capacity, c, dtype=torch.float8_e4m3fn, device=c_kv.device)
        self._scales = torch.empty(b, 1, capacity, -(-c // 128), dtype=torch.float32, device=c_kv.device)
        self._k_pe = k_pe.new_empty(b, 1, capacity, r)

    def _publish(self) -> None:
        super()._publish()
        self.scales = self._scales[:, :, : self.length]

    def _grow(self, needed: int) -> None:
        old_scales = self._scales[:, :, : self.length]
        super()._grow(needed)
        self._scales[:, :, : self.length] = old_scales

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantise and append `c_kv` `[b, 1, s, c]`, append `k_pe` `[b, 1, s, r]`; return `(FP8Latent, k_pe)` of all
        cached tokens (`[b, t, *]` and `[b, 1, t, r]`)."""
        values, scales = act_quant(key_states.contiguous(), self.scale_fmt)
        start = self.length
        super().update(values, value_states)
        self._scales[:, :, start : self.length] = scales
        self._publish()
        return FP8Latent(self.keys[:, 0], self.scales[:, 0]), self.values

    def reset(self) -> None:
        self._scales = None
        super().reset()

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self._scales = fn(self._scales)
        super()._map_batch(fn)


class FP8StaticLayer(StaticLayer):
    """transformers' static layer storing `c_kv` as e4m3 `keys` with tile scales beside them (`FP8LatentCacheLayer`
    for `MLAStaticCache`)."""

    def __init__(self, max_cache_len: int, scale_fmt: str | None = None) -> None:
        check_cache_dtype("fp8", scale_fmt)
        super().__init__(max_cache_len)
        self.scale_fmt = scale_fmt

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(torch.empty_like(key_states, dtype=torch.float8_e4m3fn), value_states)
        b, _, _, c = key_states.shape
        self.scales = torch.zeros(b, 1, self.max_cache_len, -(-c // 128), dtype=torch.float32, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """As `StaticLayer.update`, with `c_kv` quantised; returns `(FP8Latent, k_pe)` over all slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        values, scales = act_quant(key_states.contiguous(), self.scale_fmt)
        positions = torch.arange(key_states.shape[2], device=self.device) + self.cumulative_length
        self.scales.index_copy_(2, positions, scales)
        super().update(values, value_states)
        return FP8Latent(self.keys[:, 0], self.scales[:, 0]), self.values



class LatentCacheMixin:
    """Byte accounting shared by the dynamic and the static latent cache."""

    layers: list

    def nbytes(self) -> int:
        """Bytes of the cached latents (`c_kv` and `k_pe` of the stored tokens, all layers and rows)."""
        return sum(layer.keys.shape[0] * int(layer.get_seq_length()) * latent_token_bytes(layer)
                   for layer in self._filled_layers())

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer: `(kv_lora_rank + qk_rope_head_dim) × element size`; with
        `cache_dtype="fp8"` `kv_lora_rank + 4 · ceil(kv_lora_rank / 128) + qk_rope_head_dim × element size`; plus
        for DeepSeek-V3.2 its indexer key (`index_head_dim` bytes of FP8 and a 4-byte scale)."""
        for layer in self._filled_layers():
            return latent_token_bytes(layer)
        raise ValueError("bytes_per_token: the cache holds no tokens yet")

    def _filled_layers(self) -> list:
        return [layer for layer in self.layers if layer.is_initialized and layer.get_seq_length() > 0]


class MLACache(LatentCacheMixin, Cache):
    """The default cache of `DeepseekV3ForCausalLM`: one `LatentCacheLayer` per decoder layer (an
    `IndexedLatentCacheLayer`, which also keeps the indexer's keys, for a `DeepseekV32Config`).

    `num_layers` (default `num_hidden_layers`) may add slots after the decoder layers' for the MTP modules' blocks
    (layer index `num_hidden_layers + k - 1` for module k), as self-speculative decoding does. `cache_dtype="fp8"`
    stores `c_kv` in FP8 (module docstring), with fp32 scales or, for `scale_fmt="ue8m0"`, powers of two.

    Example:
        >>> cache = MLACache(model.config, cache_dtype="fp8", scale_fmt="ue8m0")
        >>> out = model(input_ids, cache=cache, use_cache=True)
        >>> cache.nbytes(), cache.bytes_per_token()
    """

    def __init__(self, config: DeepseekV3Config | None = None, num_layers: int | None = None,
                 cache_dtype: str | None = None, scale_fmt: str | None = None) -> None:  # fmt: skip
        check_cache_dtype(cache_dtype, scale_fmt, config)
        layer = functools.partial(FP8LatentCacheLayer, scale_fmt) if cache_dtype == "fp8" else LatentCacheLayer
        if config is None:
            super().__init__(layer_class_to_replicate=layer)
        else:
            num_layers = config.num_hidden_layers if num_layers is None else num_layers
            layer = IndexedLatentCacheLayer if isinstance(config, DeepseekV32Config) else layer
            super().__init__(layers=[layer() for _ in range(num_layers)])


class MLAStaticCache(LatentCacheMixin, StaticCache):
    """Pre-allocated latent cache of `max_cache_len` tokens (for `torch.compile`); `c_kv` and `k_pe` only, and for a
    `DeepseekV32Config` the indexer's keys (`IndexedStaticLayer`).

    `generate(cache_implementation="static")` builds the same layout (this class for DeepSeek-V3.2); this class adds
    the byte accounting, and `cache_dtype="fp8"` / `scale_fmt` as `MLACache`.
    """

    def __init__(self, config: DeepseekV3Config, max_cache_len: int, cache_dtype: str | None = None,
                 scale_fmt: str | None = None, **kwargs) -> None:  # fmt: skip
        check_cache_dtype(cache_dtype, scale_fmt, config)
        super().__init__(config, max_cache_len, **kwargs)
        if cache_dtype == "fp8":
            self.layers = [FP8StaticLayer(layer.max_cache_len, scale_fmt) for layer in self.layers]
        elif isinstance(config, DeepseekV32Config):
            self.layers = [IndexedStaticLayer(max_cache_len=layer.max_cache_len) for layer in self.layers]

    def allocated_bytes(self) -> int:
        """Bytes reserved up front for `max_cache_len` tokens."""
        return sum(layer.keys.shape[0] * layer.max_cache_len * latent_token_bytes(layer)
                   for layer in self.layers if layer.is_initialized)

"""The FP8 form of the cached MLA latent: its options (`cache_dtype`, `scale_fmt`), their checks, and `FP8Latent`, the
e4m3 values and tile scales a cache hands the attention in place of `c_kv`.

`cache.py` (`MLACache`, `MLAStaticCache`) and `paged_cache.py` (continuous batching) store the latent this way; the
rounding is `kernels.act_quant` (DeepSeek-V3.2's `act_quant`: 1×128 tiles, scale max(amax, 1e-4)/448, a power of two
above that with `scale_fmt="ue8m0"`). References: DeepSeek-V3.2 inference `model.py`; docs/inference.md (FP8 latent
cache).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .configuration import DeepseekV32Config
from .kernels import act_dequant_ref

CACHE_DTYPES = (None, "fp8")  # None: the latent in the dtype it arrives in (the model's)
CACHE_SCALE_FMTS = (None, "ue8m0")  # fp32 scales, or powers of two (DeepSeek-V3.2's `scale_fmt`)


class FP8Latent(NamedTuple):
    """The cached `c_kv` of an FP8 cache: e4m3 values and the fp32 scale of each 1×128 tile."""

    values: torch.Tensor  # [b, t, c] float8_e4m3fn
    scales: torch.Tensor  # [b, t, ceil(c / 128)] float32

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantise(self, dtype: torch.dtype) -> torch.Tensor:
        """`[b, t, c]` values × scales in `dtype`: the whole cache in full precision (the expanded path's input)."""
        return act_dequant_ref(self.values, self.scales, dtype)


def check_cache_dtype(cache_dtype: str | None, scale_fmt: str | None, config=None) -> None:
    """Raise `ValueError` for a cache dtype or a scale format this cache does not store (for `config`'s model)."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
    if scale_fmt not in CACHE_SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {CACHE_SCALE_FMTS}, got {scale_fmt!r}")
    if scale_fmt is not None and cache_dtype != "fp8":
        raise ValueError(f"scale_fmt={scale_fmt!r} applies to cache_dtype='fp8' only, got cache_dtype={cache_dtype!r}")
    if cache_dtype == "fp8" and isinstance(config, DeepseekV32Config):
        raise ValueError("cache_dtype='fp8' is not built for DeepSeek-V3.2 (model_type 'deepseek_v32'), whose cache "
                         "keeps the indexer keys beside a latent already rounded through FP8: leave cache_dtype=None")


LATENT_CACHE_OPTIONS = ("cache_dtype", "scale_fmt")  # what `generation_config.cache_config` may set on MLACache


def latent_cache_options(generation_config) -> dict:
    """`generation_config.cache_config` as options of generate()'s latent `MLACache` (`cache_dtype`, `scale_fmt`)."""
    options = dict(generation_config.cache_config or {})
    unknown = sorted(set(options) - set(LATENT_CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"cache_config: the latent MLACache takes {', '.join(LATENT_CACHE_OPTIONS)}, got {unknown} "
                         f"in {generation_config.cache_config!r}")  # fmt: skip
    return options

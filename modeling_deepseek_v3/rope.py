"""Rotary position embedding of DeepSeek-V3: interleaved pairs; default, linear, dynamic (NTK) and YaRN frequencies;
the YaRN softmax-scale factor.

RoPE rotates the pairs (x[2i], x[2i+1]) of the rope part of q and k, the layout the checkpoints were trained with,
so no weight permutation is needed. The frequencies follow `config.rope_parameters`, also when it is changed after
the model was built. Dimension letters: b batch, s positions, r rope dim.
References: DeepSeek-V3 report §2.1.1 and §4.3 (YaRN); DeepSeek-V3 `inference/model.py` (`precompute_freqs_cis`);
YaRN paper (arXiv 2309.00071); transformers `modeling_rope_utils.py` (`_compute_linear_scaling_rope_parameters`,
`_compute_dynamic_ntk_parameters`); docs/design.md (Multi-head Latent Attention).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .configuration import DeepseekV3Config


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature `0.1·mscale·ln(scale) + 1` (1 when the context is not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: DeepseekV3Config) -> float:
    """`(d_nope + d_rope)^-0.5 · m²`, with `m = yarn_get_mscale(factor, mscale_all_dim)` under YaRN."""
    scale = config.qk_head_dim**-0.5
    params = config.rope_parameters
    if params.get("rope_type") == "yarn" and params.get("mscale_all_dim"):
        m = yarn_get_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * m * m
    return scale


def inverse_frequencies(dim: int, base: float | torch.Tensor) -> torch.Tensor:
    """`base^(-2i/r)` for the `r/2` pairs, fp32; `base` may be a 0-d tensor (dynamic RoPE's, on the device)."""
    device = base.device if isinstance(base, torch.Tensor) else None
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def dynamic_ntk_base(config: DeepseekV3Config, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic (NTK-aware) RoPE's base for `seq_len` positions: `θ·(f·L/M − (f − 1))^(r/(r−2))` with
    `L = max(seq_len, M)`, M = `max_position_embeddings`, f = `factor`: the plain base up to M, larger beyond.

    A tensor operation, so a decode step on an accelerator reads nothing back to the host.
    """
    m, factor, r = config.max_position_embeddings, config.rope_parameters["factor"], config.qk_rope_head_dim
    length = seq_len.clamp(min=m).float()
    return config.rope_theta * (factor * length / m - (factor - 1)) ** (r / (r - 2))


def rope_frequencies(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[r/2]` and the factor applied to cos/sin: plain, divided by `factor` (linear),
    YaRN-blended (yarn); dynamic RoPE starts from the plain ones and rescales longer inputs in `RotaryEmbedding`."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = inverse_frequencies(dim, base)
    params = config.rope_parameters
    if params["rope_type"] == "linear":
        return inv_freq / params["factor"], 1.0
    if params["rope_type"] != "yarn":
        return inv_freq, 1.0
    factor = params["factor"]
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):  # whole dimensions (DeepSeek-V3's own code); False: gpt-oss's fractional ramp
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    extrapolate = 1 - ramp.clamp(0, 1)  # 1: keep the original frequency (high-frequency dims); 0: interpolate
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if params.get("attention_factor") is not None:
        attention_factor = params["attention_factor"]
    elif mscale and mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes `(cos, sin)` `[b, s, r/2]` for the given positions; one table shared by all layers."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.inv_freq = nn.Buffer(torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.reset_frequencies()

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        """Recompute the table from `config.rope_parameters` (done by `forward` when they changed), checking them
        first: they may have been changed in place, past the config's own checks."""
        self.config._validate_rope(self.config.rope_parameters)
        inv_freq, self.attention_factor = rope_frequencies(self.config)
        self.inv_freq.copy_(inv_freq)
        self.computed_for = copy.deepcopy(self.config.rope_parameters)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`position_ids` `[b, s]` (or `[1, s]`) -> `(cos, sin)` `[b, s, r/2]` in the dtype of `x`."""
        if self.config.rope_parameters != self.computed_for:  # set after the model was built: follow the config
            self.reset_frequencies()
        inv_freq = self.inv_freq.float()
        if self.config.rope_parameters["rope_type"] == "dynamic":
            # the base grows with the longest position of this call
            inv_freq = inverse_frequencies(self.config.qk_rope_head_dim,
                                           dynamic_ntk_base(self.config, position_ids.max() + 1))
        angles = position_ids[..., None].float() * inv_freq  # [b, s, r/2]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:  # YaRN's; 1 for the other types, whose decode steps skip two products
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(x.dtype), sin.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: `(x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin)`.

    Computed as the complex product `(x0 + i·x1)·(cos + i·sin)` in fp32 (the same products and sums as the real form,
    up to a fused multiply-add; bf16 inputs are rounded once, at the end), in fewer operators than the real form.

    Args:
        x: `[b, s, ..., r]`; `cos`, `sin`: `[b, s, r/2]`, broadcast over the dims between s and r.
    """
    shape = (cos.shape[0], cos.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    rotation = torch.complex(_complex_ready(cos), _complex_ready(sin)).view(shape)
    pairs = _complex_ready(x)
    # A complex view needs unit stride within a pair and pairs at even offsets, else a fresh copy. A traced graph
    # cannot read the storage offset: it always copies, which the compiler fuses.
    if torch.compiler.is_compiling() or not _pairs_viewable_as_complex(pairs):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    rotated = torch.view_as_complex(pairs.unflatten(-1, (-1, 2))) * rotation
    out = torch.view_as_real(rotated).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _pairs_viewable_as_complex(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(step % 2 == 0 for step in t.stride()[:-1])


def _complex_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` in a dtype with a complex counterpart: 16-bit floats go to fp32; fp32 and fp64 stay (no operator)."""
    return t.float() if t.element_size() < 4 else t

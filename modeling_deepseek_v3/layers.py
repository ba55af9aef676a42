"""Building blocks shared by attention, MoE and the decoder: RMSNorm and the SwiGLU MLP.

References: DeepSeek-V3 report §2.1; docs/design.md (dense layers and shared experts are SwiGLU MLPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import FP8Format, make_linear


class RMSNorm(nn.Module):
    """`y = w · x / sqrt(mean(x²) + eps)`, normalised in fp32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # nothing to cast: the fused op multiplies by the weight too, the same products in one op (a decode step
            # makes 17 norms, each a few µs of dispatch per op)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        # torch's fused rms_norm without a weight is `x / sqrt(mean(x²) + eps)` bit for bit, in one op instead of six;
        # the weight multiplies after the cast back, as in the reference implementations
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MLP(nn.Module):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`; dense layers and the shared experts (FP8 projections
    when `fp8`, the checkpoint's FP8 format, is given)."""

    def __init__(self, hidden_size: int, intermediate_size: int, fp8: FP8Format | None = None) -> None:
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, False, fp8)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, fp8)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

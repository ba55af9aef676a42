"""Tensors whose dtype is part of their meaning and must survive `model.to(dtype)`.

`nn.Module.to(torch.bfloat16)` casts every floating-point parameter and buffer, float8 included. The router's
`e_score_correction_bias` moves in steps of γ = 0.001 and must stay fp32; FP8 payloads must stay e4m3 and their
block scales fp32 (docs/design.md: Expert balancing, FP8). Modules holding such tensors list them in
`dtype_kept_tensors()`.
"""

from __future__ import annotations

import torch
from torch import nn


class KeepsTensorDtypes(nn.Module):
    """Mixin: the tensors named by `dtype_kept_tensors()` follow device moves but keep their dtype on casts."""

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        """Names of the tensors (parameters or buffers) to keep in their dtype; subclasses list theirs."""
        return ()

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name).data for name in self.dtype_kept_tensors()}  # the old storage
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            tensor = getattr(self, name)
            if tensor.dtype != old.dtype:
                tensor.data = old.to(tensor.device)
        return out


def fp32_kept_tensor_names(model: nn.Module) -> list[str]:
    """The names (last dotted part) of the fp32 tensors that the model's modules keep in their dtype: the routing
    biases, and in an FP8 model the block scales. A model without FP8 has no scale to name."""
    names = {
        name
        for module in model.modules()
        if isinstance(module, KeepsTensorDtypes)
        for name in module.dtype_kept_tensors()
        if getattr(module, name).dtype == torch.float32
    }
    return sorted(names)

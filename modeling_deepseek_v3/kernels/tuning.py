"""Autotuned launches that also run in the Triton interpreter.

References: docs/design.md, Kernels (kernels tested in the interpreter on CPU, timed only on a GPU).
"""

from __future__ import annotations

import torch
import triton


class Tuned:
    """`kernel` autotuned over `configs` (keyed on `key`) for CUDA tensors. Elsewhere, i.e. in the Triton interpreter,
    which cannot time configs, it runs with the first config.

    Example:
        >>> gemm = Tuned(gemm_kernel, CONFIGS, key=["N", "K"])
        >>> gemm[grid](x.device, x, w, out, n, k)
    """

    def __init__(self, kernel, configs: list[triton.Config], key: list[str]) -> None:
        self.kernel, self.first = kernel, configs[0]
        self.tuned = triton.autotune(configs=configs, key=key)(kernel)

    def __getitem__(self, grid):
        def launch(device: torch.device, *args, **kwargs):
            if device.type == "cuda":
                return self.tuned[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs, **self.first.all_kwargs())

        return launch

"""Autotuned launches that also run in the Triton interpreter, and with a chosen config.

References: docs/design.md, Kernels (kernels tested in the interpreter on CPU, timed only on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton

TUNED: list[Tuned] = []  # every autotuned kernel of the package, so that the tests can run each of its configs


class Tuned:
    """`kernel` autotuned over `configs` (keyed on `key`) for CUDA tensors. Elsewhere, i.e. in the Triton interpreter,
    which cannot time configs, it runs with the first config. Inside `pin(config)` it runs with `config` on every
    device.

    Example:
        >>> gemm = Tuned(gemm_kernel, CONFIGS, key=["N", "K"])
        >>> gemm[grid](x.device, x, w, out, n, k)
    """

    def __init__(self, kernel, configs: list[triton.Config], key: list[str]) -> None:
        self.kernel, self.configs = kernel, configs
        self.tuned = triton.autotune(configs=configs, key=key)(kernel)
        self.pinned: triton.Config | None = None
        self.pinned_launches = 0  # launches with the pinned config
        TUNED.append(self)

    @contextmanager
    def pin(self, config: triton.Config) -> Iterator[None]:
        """Launch with `config`, one of `configs`, while the block runs, instead of autotuning (or the first config);
        `pinned_launches` counts those launches from 0.

        Raises:
            ValueError: if `config` is not one of `configs`.
        """
        if not any(config is c for c in self.configs):
            raise ValueError(f"pin: {config} is not one of the configs of {self.kernel.__name__}")
        self.pinned, self.pinned_launches = config, 0
        try:
            yield
        finally:
            self.pinned = None

    def __getitem__(self, grid):
        def launch(device: torch.device, *args, **kwargs):
            if self.pinned is not None:
                self.pinned_launches += 1
                return self.kernel[grid](*args, **kwargs, **self.pinned.all_kwargs())
            if device.type == "cuda":
                return self.tuned[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs, **self.configs[0].all_kwargs())

        return launch

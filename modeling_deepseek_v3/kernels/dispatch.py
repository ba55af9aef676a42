"""Which path an op takes, Triton or torch, and a count of the Triton launches.

The ops of this package run their Triton kernel on CUDA tensors. Inside `triton_on_cpu()`, where Triton runs in its
interpreter (`TRITON_INTERPRET=1`), they run it on CPU tensors too: the way to run a model or module through the
kernels on a machine without a GPU. `kernel_launches` counts, per op, the calls the dispatch sent to a Triton kernel,
so a test (or a user) can see that a kernel ran rather than the torch path.

Example:
    >>> with triton_on_cpu():
    ...     before = kernel_launches["mla_decode"]
    ...     model.generate(ids, max_new_tokens=2)
    >>> kernel_launches["mla_decode"] > before
    True
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

kernel_launches: Counter[str] = Counter()  # op name -> Triton launches since import
_cpu_through_interpreter = False


def use_triton(x: torch.Tensor) -> bool:
    """Whether the dispatch sends an op on `x` to its Triton kernel: CUDA tensors, and CPU tensors inside
    `triton_on_cpu()`."""
    return x.is_cuda or (_cpu_through_interpreter and x.device.type == "cpu")


def count_launch(op: str) -> None:
    """Record that the dispatch launched `op`'s Triton kernel."""
    kernel_launches[op] += 1


@contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Send CPU tensors to the Triton kernels (run by the Triton interpreter) while the block runs.

    Raises:
        RuntimeError: when Triton is not in its interpreter (`TRITON_INTERPRET=1` set before triton is imported):
            compiled kernels cannot read CPU memory.
    """
    global _cpu_through_interpreter
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton_on_cpu needs the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported, got "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}"
        )
    previous, _cpu_through_interpreter = _cpu_through_interpreter, True
    try:
        yield
    finally:
        _cpu_through_interpreter = previous

"""Compute kernels of modeling_deepseek_v3: each op has a torch reference (`*_ref`) with the same signature.

Kernels know nothing of models or configs: they are functions of tensors.
"""

from .grouped_gemm import grouped_mm
from .reference import grouped_mm_ref

__all__ = ["grouped_mm", "grouped_mm_ref"]

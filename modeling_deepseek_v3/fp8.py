"""FP8 in DeepSeek-V3, decided in one place: the stored format, which linear serves a projection, how the routed
experts multiply, and the FP8 training recipe.

* `FP8Format` / `fp8_format`: what a checkpoint's `quantization_config` says (128×128 weight blocks by default).
* `uses_fp8_kernels`: the Triton FP8 GEMMs serve CUDA tensors with 128×128 blocks; everything else computes exactly
  from dequantised weights (`x · (q·s)ᵀ`).
* `FP8Linear` holds a checkpoint's e4m3 `weight` `[N, K]` and fp32 `weight_scale_inv` `[ceil(N/B), ceil(K/B)]`; on
  the kernels it quantises activations in 1×128 tiles and runs the FP8 GEMM (DeepSeek's inference recipe).
* `expert_projection` / `expert_swiglu`: the four ways the stacked routed experts multiply (see there).
* `FP8TrainingLinear` / `fp8_grouped_mm` keep bf16/fp32 master weights and quantise them every step: Fprop
  `Y = X·Wᵀ` (X in 1×128 tiles, W in 128×128 blocks), Dgrad `dX = dY·W` (dY in 1×128 tiles along N), Wgrad
  `dW = dYᵀ·X` (dY and X in 128×1 tiles along the tokens); the weight gradient is computed in fp32 and returned in the
  master weight's dtype. `FP8Training` says how their tiles are scaled (`amax / 448`, or powers of two).
Dimension letters: M (or T) tokens, N out features, K in features, E experts, B = 128.
References: DeepSeek-V3 report §3.3 (FP8 training, Fig. 6-7); DeepSeek-V3 `inference/model.py` (`Linear`,
`linear`); docs/fp8.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .dtypes import KeepsTensorDtypes
from .kernels import (
    FP8_BLOCK,
    act_quant,
    act_quant_colwise,
    fp8_gemm,
    fp8_grouped_gemm,
    grouped_mm,
    grouped_mm_wgrad,
    grouped_swiglu,
    use_triton,
    weight_dequant,
    weight_dequant_ref,
    weight_quant,
    weight_quant_ref,
)


@dataclasses.dataclass(frozen=True)
class FP8Format:
    """How a checkpoint stores its FP8 weights, from its `quantization_config`: the weight block size and the
    activation scale format of the CUDA kernels (None, or "ue8m0" for power-of-two scales)."""

    block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    scale_fmt: str | None = None


def fp8_format(config) -> FP8Format | None:
    """The FP8 format of the config's `quantization_config`, or None for a model with bf16/fp32 weights."""
    qc = config.fp8_quantization_config
    if qc is None:
        return None
    return FP8Format(tuple(qc.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK))), qc.get("scale_fmt"))


def uses_fp8_kernels(x: torch.Tensor, block_size: tuple[int, int]) -> bool:
    """Whether the Triton FP8 GEMMs serve `x`: CUDA tensors (see `kernels.use_triton`) and 128×128 weight blocks (the
    kernels' tiles). Everything else computes exactly from the dequantised weights."""
    return use_triton(x) and tuple(block_size) == (FP8_BLOCK, FP8_BLOCK)


def make_linear(in_features: int, out_features: int, bias: bool, fp8: FP8Format | None) -> nn.Module:
    """`nn.Linear`, or `FP8Linear` for a projection a checkpoint stores in FP8 (`fp8` from `fp8_format`)."""
    if fp8 is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return FP8Linear(in_features, out_features, bias=bias, block_size=fp8.block_size, scale_fmt=fp8.scale_fmt)


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The `[N, K]` weight of an `nn.Linear` as it is, or of an `FP8Linear` dequantised into `dtype`."""
    return linear.dequantize(dtype) if isinstance(linear, FP8Linear) else linear.weight


def weight_quant_blocks(
    w: torch.Tensor, block: tuple[int, int], scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` `[..., N, K]` into e4m3 with `block`-sized scale blocks (the Triton kernel for 128×128 matrices)."""
    if tuple(block) == (FP8_BLOCK, FP8_BLOCK) and w.dim() == 2:
        return weight_quant(w, scale_fmt)
    return weight_quant_ref(w, block=tuple(block), scale_fmt=scale_fmt)


@dataclasses.dataclass(frozen=True)
class FP8Training:
    """How the FP8 training recipe scales its tiles: `amax / 448` as in the DeepSeek-V3 report (`scale_fmt` None),
    or that rounded up to a power of two (`"ue8m0"`, the scale format of DeepSeek-V3.1's checkpoints).

    Raises:
        ValueError: for any other `scale_fmt`.
    """

    scale_fmt: str | None = None

    def __post_init__(self) -> None:
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"FP8 training: scale_fmt = {self.scale_fmt!r} is invalid: it must be None (amax / 448 "
                             "scales) or 'ue8m0' (power-of-two scales)")


def init_fp8_weight(
    q: torch.Tensor, s: torch.Tensor, std: float, block: tuple[int, int], name: Callable[[], str]
) -> None:
    """Random init of an FP8 weight `q` and its scales `s`: N(0, std²) quantised into `block` blocks, skipped for
    tensors loaded from a checkpoint (transformers marks them `_is_hf_initialized`).

    Raises:
        ValueError: if the checkpoint held only one of the two (`name()` names the weight in the message).
    """
    loaded = getattr(q, "_is_hf_initialized", False), getattr(s, "_is_hf_initialized", False)
    if loaded[0] != loaded[1]:  # a payload without its scales (or the reverse) cannot be used
        present, absent = ("weight", "weight_scale_inv") if loaded[0] else ("weight_scale_inv", "weight")
        raise ValueError(f"the checkpoint has the FP8 {present} of {name()} but not its {absent}: it is incomplete")
    if all(loaded):
        return
    w = torch.randn(q.shape, device=q.device) * std
    for tensor, value in zip((q, s), weight_quant_blocks(w, block)):
        init.copy_(tensor, value)


class FP8Linear(KeepsTensorDtypes):
    """A linear layer over an FP8 (e4m3) weight with 128×128 block scales, as stored in official checkpoints.

    Args:
        in_features, out_features: K and N.
        bias: whether to add a bias (kept in the compute dtype).
        block_size: the `weight_block_size` of the checkpoint's `quantization_config`.
        scale_fmt: None, or "ue8m0" for power-of-two activation scales (CUDA path).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK), scale_fmt: str | None = None) -> None:
        super().__init__()
        if len(block_size) != 2 or any(b <= 0 for b in block_size):
            raise ValueError(f"FP8Linear: block_size must be two positive integers, got {block_size}")
        if scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"FP8Linear: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
        self.scale_fmt = scale_fmt
        self.in_features, self.out_features = in_features, out_features
        self.block_size = tuple(block_size)
        rows, cols = math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1])
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(rows, cols, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        return ("weight", "weight_scale_inv")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise an `nn.Linear`'s weight into 128×128 FP8 blocks."""
        fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, s = weight_quant(linear.weight.detach())
        fp8.weight.data, fp8.weight_scale_inv.data = q, s
        if linear.bias is not None:
            fp8.bias.data = linear.bias.detach().clone()
        return fp8

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight `q · s` per block, `[N, K]` in `dtype`."""
        if uses_fp8_kernels(self.weight, self.block_size):
            return weight_dequant(self.weight, self.weight_scale_inv, dtype)
        return weight_dequant_ref(self.weight, self.weight_scale_inv, dtype, block=self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., K]` (bf16/fp32) -> `[..., N]` in the dtype of `x`. Under tensor parallelism N or K are this
        rank's share (the weight's local shape)."""
        n, k = self.weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"FP8Linear: expected {k} input features, got {x.shape[-1]}")
        if uses_fp8_kernels(x, self.block_size):
            q, s = act_quant(x.reshape(-1, k), self.scale_fmt)
            y = fp8_gemm(q, s, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
            y = y.view(*x.shape[:-1], n)
        else:  # exact: q·s is exact in fp32, and so is the product's accumulation up to fp32 rounding
            y = F.linear(x.float(), self.dequantize(torch.float32)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}")


class _FP8LinearFunction(torch.autograd.Function):
    """`Y = X·Wᵀ` with all three GEMMs of the step in block-scaled FP8 (docs/design.md, FP8)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        x_q, x_s = act_quant(x2, scale_fmt)
        w_q, w_s = weight_quant(weight, scale_fmt)
        y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=x.dtype)  # Fprop
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.x_shape, ctx.weight_dtype, ctx.scale_fmt = x.shape, weight.dtype, scale_fmt
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w_q, w_s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # [M, N]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = act_quant(dy2, ctx.scale_fmt)  # 1×128 along N, the contraction dim of dX = dY·W
            # Wᵀ's 128×128 blocks are W's blocks transposed: transposing payload and scales is exact
            dx = fp8_gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype=dy.dtype)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dy_q, dy_s = act_quant_colwise(dy2, ctx.scale_fmt)  # 128×1 along M, the contraction dim of dW = dYᵀ·X
            x_q, x_s = act_quant_colwise(x2, ctx.scale_fmt)
            dw = fp8_gemm(dy_q.t().contiguous(), dy_s.t().contiguous(), x_q.t().contiguous(), x_s.t().contiguous(),
                          out_dtype=torch.float32)  # [N, K]
            dw = dw.to(ctx.weight_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """Differentiable `x·weightᵀ` in FP8 (Fprop, Dgrad and Wgrad); `weight` is the bf16/fp32 master weight."""
    return _FP8LinearFunction.apply(x, weight, FP8Training(scale_fmt).scale_fmt)


class FP8TrainingLinear(nn.Linear):
    """`nn.Linear` whose forward and backward GEMMs run in FP8 from the master `weight` (same parameter names, so
    checkpoints and optimizers see an ordinary linear layer), its tiles scaled as `recipe` says."""

    recipe: FP8Training = FP8Training()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe.scale_fmt)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _fake_quant_act(x: torch.Tensor, scale_fmt: str | None, colwise: bool = False) -> torch.Tensor:
    """`x` through FP8: 1×128 tiles along the last dim (or 128×1 tiles along the first), back in fp32."""
    if colwise:
        q, s = act_quant_colwise(x, scale_fmt)
        return q.float() * s.repeat_interleave(FP8_BLOCK, dim=0)[: x.shape[0]]
    q, s = act_quant(x, scale_fmt)
    return q.float() * s.repeat_interleave(FP8_BLOCK, dim=-1)[..., : x.shape[-1]]


class _FP8GroupedMMFunction(torch.autograd.Function):
    """Grouped `y_e = x_e · W_eᵀ` for stacked experts, with every operand of Fprop, Dgrad and Wgrad passed through
    the FP8 quantisation of the training recipe (the same tiles as `fp8_linear`) and the products taken by a grouped
    fp32 GEMM.

    Numerically this is the FP8 recipe (the same quantisation error; fp32 accumulation); it is not yet a grouped FP8
    kernel, so it is not faster. The 128-token tiles of Wgrad run along the expert-sorted tokens and may span the
    boundary between two experts' rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, scale_fmt: str | None):
        x_fq = _fake_quant_act(x, scale_fmt)  # [T, K]
        w_q, w_s = weight_quant_blocks(weight, (FP8_BLOCK, FP8_BLOCK), scale_fmt)  # weight [E, N, K]
        w_fq = weight_dequant_ref(w_q, w_s, torch.float32)
        ctx.save_for_backward(x, w_fq, offsets)
        ctx.weight_dtype, ctx.scale_fmt = weight.dtype, scale_fmt
        return grouped_mm(x_fq, w_fq.transpose(1, 2), offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_fq, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm(_fake_quant_act(dy, ctx.scale_fmt), w_fq, offsets).to(dy.dtype)  # [T, K]
        if ctx.needs_input_grad[1]:
            dy_fq, x_fq = _fake_quant_act(dy, ctx.scale_fmt, colwise=True), _fake_quant_act(x, ctx.scale_fmt, True)
            # per expert (x_eᵀ · dy_e)ᵀ = dy_eᵀ · x_e: [E, N, K], as the stacked weight
            dw = grouped_mm_wgrad(x_fq, dy_fq, offsets).transpose(1, 2).to(ctx.weight_dtype)
        return dx, dw, None, None


def fp8_grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, scale_fmt: str | None = None
) -> torch.Tensor:
    """FP8-recipe grouped matmul for training the routed experts: `x` `[T, K]` sorted by expert, `weight` the stacked
    master weight `[E, N, K]`, `offsets` `[E]` int32 cumulative rows; returns `[T, N]`."""
    return _FP8GroupedMMFunction.apply(x, weight, offsets, FP8Training(scale_fmt).scale_fmt)


def expert_projection(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None,
    offsets: torch.Tensor,
    fp8: FP8Format | None,
    fp8_training: FP8Training | None = None,
) -> torch.Tensor:
    """Every routed expert's rows through its projection, `rows_e · W_eᵀ`, in one grouped GEMM; the one place that
    decides how:

    * `fp8_training`: master weights through the FP8 training recipe (`fp8_grouped_mm`);
    * master weights (`fp8` None): the grouped GEMM in the rows' dtype;
    * FP8 weights on CUDA with 128×128 blocks: the FP8 grouped GEMM reads the e4m3 experts as they are, activations
      quantised in 1×128 tiles;
    * FP8 weights elsewhere: the experts that received tokens are dequantised exactly for the grouped GEMM (a decode
      step uses K of E; finding them reads the counts back to the host, far cheaper than dequantising all).

    Args:
        rows: `[T, K]` sorted by expert; weight: `[E, N, K]`; scale_inv: `[E, ceil(N/B), ceil(K/B)]` fp32 for FP8
            weights, else None; offsets: `[E]` int32 cumulative rows.

    Returns:
        `[T, N]` in the dtype of `rows`.
    """
    if fp8_training is not None:
        return fp8_grouped_mm(rows, weight, offsets, fp8_training.scale_fmt)
    if fp8 is None:
        return grouped_mm(rows, weight.transpose(1, 2), offsets)
    if uses_fp8_kernels(rows, fp8.block_size):
        q, s = act_quant(rows, fp8.scale_fmt)
        return fp8_grouped_gemm(q, s, weight, scale_inv, offsets, out_dtype=rows.dtype)
    active = torch.diff(offsets, prepend=offsets.new_zeros(1)).nonzero().squeeze(1)
    dense = weight_dequant_ref(weight[active], scale_inv[active], rows.dtype, block=fp8.block_size)
    return grouped_mm(rows, dense.transpose(1, 2), offsets[active])  # the idle experts own no rows


def expert_swiglu(
    rows: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor | None],
    up: tuple[torch.Tensor, torch.Tensor | None],
    offsets: torch.Tensor,
    fp8: FP8Format | None,
    fp8_training: FP8Training | None = None,
) -> torch.Tensor:
    """`silu(rows_e · G_eᵀ) * (rows_e · U_eᵀ)` for every expert; `gate` and `up` are `(weight, scale_inv)` pairs as for
    `expert_projection`. Master weights run gate and up as one fused grouped kernel on CUDA."""
    if fp8 is None and fp8_training is None:
        return grouped_swiglu(rows, gate[0].transpose(1, 2), up[0].transpose(1, 2), offsets)
    return F.silu(expert_projection(rows, *gate, offsets, fp8, fp8_training)) * expert_projection(
        rows, *up, offsets, fp8, fp8_training
    )

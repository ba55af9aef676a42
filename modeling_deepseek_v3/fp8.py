"""FP8 linear layers: `FP8Linear` serves official FP8 checkpoints, `FP8TrainingLinear` trains with the report's
block-scaled FP8 recipe.

* `FP8Linear` holds the checkpoint's e4m3 `weight` `[N, K]` and fp32 `weight_scale_inv` `[ceil(N/B), ceil(K/B)]`.
  On CUDA it quantises activations in 1×128 tiles and runs the FP8 GEMM (DeepSeek's inference recipe); elsewhere it
  computes `x · (q·s)ᵀ` exactly in the input dtype from the stored FP8 weights.
* `FP8TrainingLinear` keeps a bf16/fp32 master weight and quantises it every step: Fprop `Y = X·Wᵀ` (X in 1×128
  tiles, W in 128×128 blocks), Dgrad `dX = dY·W` (dY in 1×128 tiles along N), Wgrad `dW = dYᵀ·X` (dY and X in 128×1
  tiles along the tokens), all through the block-scaled FP8 GEMM; the weight gradient is computed in fp32 and returned
  in the master weight's dtype (keep fp32 master weights for fp32 gradients).
Dimension letters: M tokens, N out features, K in features, B = 128.
References: DeepSeek-V3 report §3.3 (FP8 training, Fig. 6-7); DeepSeek-V3 `inference/model.py` (`Linear`,
`linear`); DESIGN.md §6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import KeepsTensorDtypes
from .kernels import (
    FP8_BLOCK,
    act_quant,
    act_quant_colwise,
    fp8_gemm,
    grouped_mm,
    weight_dequant,
    weight_dequant_ref,
    weight_quant,
    weight_quant_ref,
)


def fp8_block_size(config) -> tuple[int, int] | None:
    """The `weight_block_size` of the config's FP8 `quantization_config`, or None for an unquantised model."""
    qc = config.fp8_quantization_config
    return None if qc is None else tuple(qc.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))


def make_linear(in_features: int, out_features: int, bias: bool, quantization: dict | None) -> nn.Module:
    """`nn.Linear`, or `FP8Linear` for a projection stored in FP8 (`quantization`: the config's FP8
    `quantization_config`, giving `weight_block_size` and the activation `scale_fmt`)."""
    if quantization is None:
        return nn.Linear(in_features, out_features, bias=bias)
    block = tuple(quantization.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
    return FP8Linear(in_features, out_features, bias=bias, block_size=block, scale_fmt=quantization.get("scale_fmt"))


def weight_quant_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` `[..., N, K]` into e4m3 with `block`-sized scale blocks (the Triton kernel for 128×128 matrices)."""
    if tuple(block) == (FP8_BLOCK, FP8_BLOCK) and w.dim() == 2:
        return weight_quant(w)
    return weight_quant_ref(w, block=tuple(block))


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
        if self.block_size != (FP8_BLOCK, FP8_BLOCK):  # the Triton kernel knows 128×128 blocks only
            return weight_dequant_ref(self.weight, self.weight_scale_inv, dtype, block=self.block_size)
        return weight_dequant(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[..., K]` (bf16/fp32) -> `[..., N]` in the dtype of `x`."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: expected {self.in_features} input features, got {x.shape[-1]}")
        if x.is_cuda:
            if self.block_size != (FP8_BLOCK, FP8_BLOCK):
                raise ValueError(f"FP8Linear: the CUDA FP8 GEMM needs 128x128 weight blocks, got {self.block_size}")
            q, s = act_quant(x.reshape(-1, self.in_features), self.scale_fmt)
            y = fp8_gemm(q, s, self.weight, self.weight_scale_inv, out_dtype=x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        else:  # exact: q·s is exact in fp32, and so is the product's accumulation up to fp32 rounding
            y = F.linear(x.float(), self.dequantize(torch.float32)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}")


class _FP8LinearFunction(torch.autograd.Function):
    """`Y = X·Wᵀ` with all three GEMMs of the step in block-scaled FP8 (DESIGN §6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        x_q, x_s = act_quant(x2)
        w_q, w_s = weight_quant(weight)
        y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=x.dtype)  # Fprop
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w_q, w_s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # [M, N]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = act_quant(dy2)  # 1×128 along N, the contraction dim of dX = dY·W
            # Wᵀ's 128×128 blocks are W's blocks transposed: transposing payload and scales is exact
            dx = fp8_gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype=dy.dtype)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dy_q, dy_s = act_quant_colwise(dy2)  # 128×1 along M, the contraction dim of dW = dYᵀ·X
            x_q, x_s = act_quant_colwise(x2)
            dw = fp8_gemm(dy_q.t().contiguous(), dy_s.t().contiguous(), x_q.t().contiguous(), x_s.t().contiguous(),
                          out_dtype=torch.float32)  # [N, K]
            dw = dw.to(ctx.weight_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable `x·weightᵀ` in FP8 (Fprop, Dgrad and Wgrad); `weight` is the bf16/fp32 master weight."""
    return _FP8LinearFunction.apply(x, weight)


class FP8TrainingLinear(nn.Linear):
    """`nn.Linear` whose forward and backward GEMMs run in FP8 from the master `weight` (same parameter names, so
    checkpoints and optimizers see an ordinary linear layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _fake_quant_act(x: torch.Tensor, colwise: bool = False) -> torch.Tensor:
    """`x` through FP8: 1×128 tiles along the last dim (or 128×1 tiles along the first), back in fp32."""
    if colwise:
        q, s = act_quant_colwise(x)
        return q.float() * s.repeat_interleave(FP8_BLOCK, dim=0)[: x.shape[0]]
    q, s = act_quant(x)
    return q.float() * s.repeat_interleave(FP8_BLOCK, dim=-1)[..., : x.shape[-1]]


class _FP8GroupedMMFunction(torch.autograd.Function):
    """Grouped `y_e = x_e · W_eᵀ` for stacked experts, with every operand of Fprop, Dgrad and Wgrad passed through
    the FP8 quantisation of DESIGN §6 (the same tiles as `fp8_linear`) and the products taken by a grouped fp32 GEMM.

    Numerically this is the FP8 recipe (the same quantisation error; fp32 accumulation); it is not yet a grouped FP8
    kernel, so it is not faster. The 128-token tiles of Wgrad run along the expert-sorted tokens and may span the
    boundary between two experts' rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x_fq = _fake_quant_act(x)  # [T, K]
        w_q, w_s = weight_quant_blocks(weight, (FP8_BLOCK, FP8_BLOCK))  # weight [E, N, K]
        w_fq = weight_dequant_ref(w_q, w_s, torch.float32)
        ctx.save_for_backward(x, w_fq, offsets)
        ctx.weight_dtype = weight.dtype
        return grouped_mm(x_fq, w_fq.transpose(1, 2), offsets).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_fq, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm(_fake_quant_act(dy), w_fq, offsets).to(dy.dtype)  # [T, K]
        if ctx.needs_input_grad[1]:
            dy_fq, x_fq = _fake_quant_act(dy, colwise=True), _fake_quant_act(x, colwise=True)
            # per expert dy_eᵀ · x_e: torch's grouped GEMM in its [N, T] × [T, K] -> [E, N, K] form
            dw = F.grouped_mm(dy_fq.t(), x_fq, offs=offsets).to(ctx.weight_dtype)
        return dx, dw, None


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """FP8-recipe grouped matmul for training the routed experts: `x` `[T, K]` sorted by expert, `weight` the stacked
    master weight `[E, N, K]`, `offsets` `[E]` int32 cumulative rows; returns `[T, N]`."""
    return _FP8GroupedMMFunction.apply(x, weight, offsets)

"""FP8 linear layers: the inference layer computes exactly from its FP8 weights on CPU; the training layer's
forward and gradients stay within the FP8 error of fp32 autograd."""

import pytest
import torch
from torch import nn

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.fp8 import FP8Linear, FP8Training, FP8TrainingLinear, fp8_grouped_mm, fp8_linear
from modeling_deepseek_v3.training import enable_fp8_training

from ..utils import (
    E4M3_MAX,
    EMULATION_TOLERANCE,
    e4m3_tiles,
    e4m3_value,
    through_column_tiles,
    through_row_tiles,
    through_weight_blocks,
    tiny_config,
    weight_blocks,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("in_features, out_features", [(256, 576), (320, 100)], ids=str)
def test_fp8_linear_is_exact_on_cpu(in_features, out_features):
    linear = nn.Linear(in_features, out_features, bias=True)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn
    assert fp8.weight_scale_inv.shape == (-(-out_features // 128), -(-in_features // 128))
    # the quantisation is the format's: scales amax / 448 per block (the test's quantiser, to one fp32 step: the
    # package multiplies by the rounded reciprocal of 448), payloads within half an e4m3 step of each weight
    q, s = weight_blocks(linear.weight.detach())
    torch.testing.assert_close(fp8.weight_scale_inv, s, rtol=2**-23, atol=0)
    w = e4m3_value(fp8.weight, fp8.weight_scale_inv, (128, 128))  # the layer's weight, dequantised here
    block_max = e4m3_value(torch.full_like(q, E4M3_MAX), fp8.weight_scale_inv, (128, 128))
    w_ref = linear.weight.detach().double()
    assert ((w - w_ref).abs() <= torch.maximum(w_ref.abs() * 2**-4, block_max * 2**-10)).all()
    # exact on CPU: the product of the input and the dequantised weight, up to fp32 rounding
    x = torch.randn(3, 5, in_features)
    torch.testing.assert_close(fp8(x).double(), x.double() @ w.t() + linear.bias.detach().double(), rtol=0, atol=1e-5)
    assert fp8.dequantize().dtype == torch.bfloat16
    # the FP8 weight is close to the original: within e4m3's half step (2^-4) of the block maximum
    assert rel_err(w, linear.weight.detach()) < 0.04


def test_fp8_linear_rejects_wrong_input_and_blocks():
    fp8 = FP8Linear(256, 128)
    with pytest.raises(ValueError, match="expected 256 input features"):
        fp8(torch.randn(2, 100))
    with pytest.raises(ValueError, match="block_size"):
        FP8Linear(256, 128, block_size=(128, 0))


def test_fp8_linear_supports_other_block_sizes_on_cpu():
    fp8 = FP8Linear(96, 80, block_size=(64, 32))
    assert fp8.weight_scale_inv.shape == (2, 3)
    fp8.weight.data = torch.randn(80, 96).to(torch.float8_e4m3fn)
    fp8.weight_scale_inv.data = torch.rand(2, 3) + 0.5
    scale = fp8.weight_scale_inv.repeat_interleave(64, 0)[:80].repeat_interleave(32, 1)[:, :96]
    x = torch.randn(4, 96)
    torch.testing.assert_close(fp8(x), x @ (fp8.weight.float() * scale).t())


@pytest.mark.parametrize("m", [1, 130, 256], ids=lambda m: f"M{m}")
def test_fp8_training_linear_matches_fp32_autograd(m):
    """Tolerance: each FP8 GEMM has ~3.7% relative Frobenius error (measured, see tests/kernels); we allow 8%."""
    w = (torch.randn(192, 320) * 0.05).requires_grad_()
    x = torch.randn(m, 320, requires_grad=True)
    dy = torch.randn(m, 192)
    y = fp8_linear(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    w_ref = w.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), dy)
    assert dw.dtype == torch.float32
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert rel_err(got, ref) < 0.08, name


def test_fp8_training_linear_module_trains():
    torch.manual_seed(0)
    layer = FP8TrainingLinear(128, 64)
    target = nn.Linear(128, 64)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 128)
    first = None
    for _ in range(60):
        loss = (layer(x) - target(x).detach()).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_fp8_training_gemms_use_the_specified_tiles():
    """Exactly the recipe (docs/design.md, FP8): Fprop X(1×128)·W(128×128)ᵀ, Dgrad dY(1×128 along N)·W, Wgrad
    dY(128×1)ᵀ·X(128×1), each against an fp64 emulation with those tiles by the test's quantiser (within
    `EMULATION_TOLERANCE`: a wrong tiling is ~5% off)."""
    x = torch.randn(200, 320, requires_grad=True)
    w = (torch.randn(192, 320) * 0.05).requires_grad_()
    dy = torch.randn(200, 192)
    y = fp8_linear(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert rel_err(y, through_row_tiles(x.detach()) @ through_weight_blocks(w.detach()).t()) < EMULATION_TOLERANCE
    assert rel_err(dx, through_row_tiles(dy) @ through_weight_blocks(w.detach())) < EMULATION_TOLERANCE
    assert rel_err(dw, through_column_tiles(dy).t() @ through_column_tiles(x.detach())) < EMULATION_TOLERANCE


def through_power_of_two_tiles(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """`x` through e4m3 tiles whose scale is amax / 448 rounded up to a power of two (DeepSeek-V3.1's `ue8m0`),
    written here from the definition: the payload `x / scale` cast to e4m3, back in fp64."""
    _, s = e4m3_tiles(x, tile)
    s = torch.exp2(torch.ceil(torch.log2(s))).double()
    rows, cols = x.shape[-2:]
    full = s.repeat_interleave(tile[0], dim=-2)[..., :rows, :].repeat_interleave(tile[1], dim=-1)[..., :cols]
    return (x.double() / full).to(torch.float8_e4m3fn).double() * full


def test_fp8_training_with_power_of_two_scales_uses_them_in_every_gemm():
    """`scale_fmt="ue8m0"`: Fprop, Dgrad and Wgrad against fp64 emulations with power-of-two tiles (the same tiles as
    the default recipe); the default recipe's scales give a clearly different result, so the format is not ignored."""
    x = torch.randn(200, 320, requires_grad=True)
    w = (torch.randn(192, 320) * 0.05).requires_grad_()
    dy = torch.randn(200, 192)
    y = fp8_linear(x, w, "ue8m0")
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    row, col, block = (1, 128), (128, 1), (128, 128)
    xd, wd = x.detach(), w.detach()
    y_ref = through_power_of_two_tiles(xd, row) @ through_power_of_two_tiles(wd, block).t()
    assert rel_err(y, y_ref) < EMULATION_TOLERANCE
    dx_ref = through_power_of_two_tiles(dy, row) @ through_power_of_two_tiles(wd, block)
    assert rel_err(dx, dx_ref) < EMULATION_TOLERANCE
    dw_ref = through_power_of_two_tiles(dy, col).t() @ through_power_of_two_tiles(xd, col)
    assert rel_err(dw, dw_ref) < EMULATION_TOLERANCE
    assert rel_err(y, through_row_tiles(xd) @ through_weight_blocks(wd).t()) > 10 * EMULATION_TOLERANCE


def test_fp8_grouped_mm_with_power_of_two_scales():
    counts = torch.tensor([40, 0, 150])
    offsets = counts.cumsum(0).to(torch.int32)
    x, w = torch.randn(190, 160), torch.randn(3, 96, 160) * 0.05
    y = fp8_grouped_mm(x, w, offsets, "ue8m0")
    xq = through_power_of_two_tiles(x, (1, 128))
    ref = torch.cat([xq[:40] @ through_power_of_two_tiles(w[0], (128, 128)).t(),
                     xq[40:] @ through_power_of_two_tiles(w[2], (128, 128)).t()])
    assert rel_err(y, ref) < EMULATION_TOLERANCE


def test_enable_fp8_training_takes_the_scale_format_and_refuses_others():
    model = enable_fp8_training(DeepseekV3ForCausalLM(tiny_config()), scale_fmt="ue8m0")
    layer = model.model.layers[1]
    assert layer.self_attn.q_b_proj.recipe == FP8Training("ue8m0")
    assert layer.mlp.experts.fp8_training == FP8Training("ue8m0")
    with pytest.raises(ValueError, match=r"scale_fmt = 'e5m2' is invalid: it must be None .* or 'ue8m0'"):
        enable_fp8_training(DeepseekV3ForCausalLM(tiny_config()), scale_fmt="e5m2")

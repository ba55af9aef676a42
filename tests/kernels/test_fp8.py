"""FP8 kernels: the quantisation kernels equal the package's reference (bit for bit, up to the interpreter's casts)
and the format's definition computed in the test; the GEMM kernels, on e4m3 inputs quantised in the test
(`tests/utils.py`, independent of the package's quantiser), equal fp64 math on those inputs' values; an FP8 layer and
the FP8 routed experts run through the dispatch launch the kernels.

The interpreter's own casts are not those of a GPU, in ways measured here on 65k random values:
fp32 -> e4m3 loses the carry when a value rounds up across a binade edge (124.3 -> 64 instead of 128), lands one
subnormal step (2^-9) off below 2^-6, and rounds exact ties away from zero instead of to even; fp32 -> bf16 truncates.
Scales must be exactly equal. Payloads must be equal except at elements explained, one by one, by those casts of the
exact pre-cast value, so any real kernel error still fails; bf16 outputs may differ by one bf16 step.
"""

import math

import pytest
import torch

from modeling_deepseek_v3.fp8 import FP8Format, FP8Linear, expert_projection
from modeling_deepseek_v3.kernels import (
    FP8_E4M3_MAX,
    act_quant_colwise_ref,
    act_quant_ref,
    fp8_gemm_ref,
    weight_dequant_ref,
    weight_quant_ref,
)

from ..utils import E4M3_MAX, e4m3_tiles, e4m3_value, row_tiles, weight_blocks
from .common import assert_close, ref_grouped_mm, through_kernels

triton = pytest.importorskip("triton")
from modeling_deepseek_v3.kernels.block_fp8_gemm import fp8_gemm_triton  # noqa: E402
from modeling_deepseek_v3.kernels.fp8_quant import (  # noqa: E402
    act_quant_colwise_triton,
    act_quant_triton,
    weight_dequant_triton,
    weight_quant_triton,
)


def assert_fp8_payload_equal(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
    """`exact`: the fp32 values before the cast to e4m3 (`x / scale`), which the reference rounds correctly."""
    got, ref = got.float(), ref.float()
    differ = got != ref
    g, r, v = got[differ], ref[differ], exact[differ]
    lost_carry = (g == r / 2) & (torch.exp2(torch.round(torch.log2(r.abs()))) == r.abs())
    subnormal_step = (r.abs() <= 2**-6) & ((g - r).abs() == 2**-9)
    tie_away_from_zero = ((g + r) / 2 == v) & (g.abs() > r.abs())
    unexplained = ~(lost_carry | subnormal_step | tie_away_from_zero)
    assert not unexplained.any(), (g[unexplained][:5], r[unexplained][:5], v[unexplained][:5])


def assert_bf16_within_one_step(got: torch.Tensor, ref: torch.Tensor) -> None:
    step = torch.exp2(torch.floor(torch.log2(ref.float().abs().clamp(min=1e-30))) - 7)  # bf16 has 8 mantissa bits
    assert ((got.float() - ref.float()).abs() <= step).all()


def assert_scales_by_definition(s: torch.Tensor, x: torch.Tensor, tile: tuple[int, int]) -> None:
    """`s` is each tile's `amax / 448`, as the test's quantiser computes it, to within one fp32 step (the package
    multiplies by the rounded reciprocal of 448 instead of dividing)."""
    torch.testing.assert_close(s, e4m3_tiles(x, tile)[1], rtol=2**-23, atol=0)


def tile_scales(s: torch.Tensor, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, dim=-1)[..., :k]


def fresh(*shape, scale=1.0):
    # a spread of magnitudes per row, so scales differ between tiles; never all-zero
    return torch.randn(*shape) * scale * torch.logspace(-2, 2, shape[-1])[torch.randperm(shape[-1])]


SHAPES = [(1, 256), (7, 128), (33, 320), (130, 576)]


@pytest.mark.parametrize("m, k", SHAPES, ids=[f"M{m}-K{k}" for m, k in SHAPES])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant(m, k, scale_fmt, dtype):
    x = fresh(m, k).to(dtype)
    q, s = act_quant_triton(x, scale_fmt)
    q_ref, s_ref = act_quant_ref(x, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, math.ceil(k / 128))
    assert torch.equal(s, s_ref)
    assert_fp8_payload_equal(q, q_ref, x.float() / tile_scales(s_ref, k))
    if scale_fmt == "ue8m0":  # amax / 448 rounded up to a power of two
        by_definition = torch.exp2(torch.ceil(torch.log2(e4m3_tiles(x, (1, 128))[1])))
        assert torch.equal(s, by_definition)
    else:
        assert_scales_by_definition(s, x, (1, 128))


@pytest.mark.parametrize("m, k", [(1, 64), (128, 96), (300, 40)], ids=["M1", "M128", "M300"])
def test_act_quant_colwise(m, k):
    x = fresh(m, k).t().contiguous().t() if m > 1 else fresh(m, k)
    q, s = act_quant_colwise_triton(x)
    q_ref, s_ref = act_quant_colwise_ref(x)
    assert s.shape == (math.ceil(m / 128), k)
    assert torch.equal(s, s_ref)
    assert_scales_by_definition(s, x, (128, 1))
    assert_fp8_payload_equal(q, q_ref, x.float() / tile_scales(s_ref.t(), m).t())


@pytest.mark.parametrize("n, k", [(576, 256), (256, 320), (256, 384), (100, 100), (1, 128)], ids=str)
def test_weight_quant(n, k):
    w = fresh(n, k, scale=0.05)
    q, s = weight_quant_triton(w)
    q_ref, s_ref = weight_quant_ref(w)
    assert s.shape == (math.ceil(n / 128), math.ceil(k / 128))
    assert torch.equal(s, s_ref)
    assert_scales_by_definition(s, w, (128, 128))
    block_scales = tile_scales(s_ref.repeat_interleave(128, dim=0)[:n], k)
    assert_fp8_payload_equal(q, q_ref, w / block_scales)
    # quantisation error bounded by half an e4m3 step (2^-4 relative) of each block's largest magnitude
    deq = e4m3_value(q_ref, s_ref, (128, 128))  # the package's reference (the interpreter's casts are off, above)
    assert ((deq - w).abs() <= torch.maximum(w.abs() * 2**-4, block_scales * FP8_E4M3_MAX * 2**-10)).all()


@pytest.mark.parametrize("n, k", [(256, 320), (100, 100)], ids=str)
def test_weight_quant_with_power_of_two_scales(n, k):
    """`scale_fmt="ue8m0"` (DeepSeek-V3.1's format): each block's scale is amax / 448 rounded up to a power of two,
    by the definition written here; the kernel and the reference agree."""
    w = fresh(n, k, scale=0.05)
    q, s = weight_quant_triton(w, "ue8m0")
    q_ref, s_ref = weight_quant_ref(w, scale_fmt="ue8m0")
    by_definition = torch.exp2(torch.ceil(torch.log2(e4m3_tiles(w, (128, 128))[1])))
    assert torch.equal(s, by_definition) and torch.equal(s_ref, by_definition)
    block_scales = tile_scales(s_ref.repeat_interleave(128, dim=0)[:n], k)
    assert_fp8_payload_equal(q, q_ref, w / block_scales)


@pytest.mark.parametrize("n, k", [(256, 320), (100, 100), (1, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_dequant(n, k, dtype):
    """e4m3 blocks from the test's quantiser; the value `q · s` rounded once into the output dtype."""
    q, s = weight_blocks(torch.randn(n, k) * 0.05)
    out = weight_dequant_triton(q, s, dtype)
    assert out.dtype == dtype
    assert_close(out, e4m3_value(q, s, (128, 128)), dtype)


def test_scale_of_the_e4m3_maximum():
    """The format's largest payload: the element equal to a block's amax is stored as 448 exactly."""
    w = torch.rand(128, 128) + 0.5
    w[3, 7] = 9.0
    q, s = weight_quant_triton(w)
    assert q[3, 7].float().item() == E4M3_MAX and s.item() == pytest.approx(9.0 / E4M3_MAX, rel=2**-23)


GEMMS = [(1, 576, 256), (5, 256, 320), (130, 320, 128), (64, 129, 384)]


def dequantised_product(a, a_s, b, b_s, b_tile):
    """`A·Bᵀ` in fp64 on the values of e4m3 operands (A in 1×128 tiles, B in `b_tile`)."""
    return e4m3_value(a, a_s, (1, 128)) @ e4m3_value(b, b_s, b_tile).t()


@pytest.mark.parametrize("m, n, k", GEMMS, ids=[f"M{m}-N{n}-K{k}" for m, n, k in GEMMS])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_gemm_triton_equals_dequantised_math(m, n, k, out_dtype):
    """M <= 64 and M > 64 run the kernel's two row-block sizes (64 and 128)."""
    a, a_s = row_tiles(fresh(m, k))
    b, b_s = weight_blocks(fresh(n, k, scale=0.05))
    out = fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    assert out.dtype == out_dtype
    assert_close(out, dequantised_product(a, a_s, b, b_s, (128, 128)), out_dtype)


def test_fp8_gemm_per_row_b_scales():
    """The weight-gradient form: B is an activation with 1×128 tiles per row; kernel and reference equal the math."""
    a, a_s = row_tiles(fresh(40, 256))
    b, b_s = row_tiles(fresh(200, 256))
    exact = dequantised_product(a, a_s, b, b_s, (1, 128))
    assert_close(fp8_gemm_triton(a, a_s, b, b_s, torch.float32), exact, torch.float32)
    assert_close(fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.float32), exact, torch.float32)


@pytest.mark.parametrize("m, n, k", [(64, 576, 512), (3, 256, 320)], ids=str)
def test_reference_gemm_within_fp8_bound(m, n, k):
    """Relative Frobenius error of the FP8 GEMM vs fp64 math on the unquantised inputs.

    Bound: e4m3 rounds to nearest with a 3-bit mantissa, so each operand carries relative error <= 2^-4 per element
    (u = 2^-4); a product carries <= 2u + u², and for random signs the errors add in quadrature, so the Frobenius error
    of A·B^T is about sqrt(2)·u/sqrt(3) ≈ 0.05 of ‖A·B^T‖ for uniform rounding errors (worst case 2u + u² ≈ 0.129).
    We assert the worst-case bound and report the typical one.
    """
    x, w = fresh(m, k), fresh(n, k, scale=0.05)
    a, a_s = act_quant_ref(x)
    b, b_s = weight_quant_ref(w)
    out = fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.float32).double()
    exact = x.double() @ w.double().t()
    rel = ((out - exact).norm() / exact.norm()).item()
    u = 2**-4
    assert rel <= 2 * u + u * u
    assert rel <= 0.06  # the typical bound above, with margin


def test_fp8_gemm_rejects_bad_input():
    a, a_s = row_tiles(fresh(4, 256))
    b, b_s = weight_blocks(fresh(8, 256))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm_ref(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="a_s must have shape"):
        fp8_gemm_ref(a, a_s[:, :1], b, b_s)
    with pytest.raises(ValueError, match="b_s must have shape"):
        fp8_gemm_triton(a, a_s, b, b_s[:, :1])
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant_triton(fresh(2, 128), "e5m2")


@pytest.mark.parametrize("n, k", [(256, 384), (200, 136)], ids=["whole-blocks", "partial-blocks"])
def test_stacked_weights_quantise_like_each_matrix(n, k):
    """Routed experts quantise and dequantise `[E, N, K]` at once; it must equal doing each expert alone."""
    w = fresh(3, n, k, scale=0.05)
    q, s = weight_quant_ref(w)
    deq = weight_dequant_ref(q, s, torch.float32)
    for e in range(3):
        q_e, s_e = weight_quant_ref(w[e])
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8)) and torch.equal(s[e], s_e)
        assert torch.equal(deq[e], weight_dequant_ref(q_e, s_e, torch.float32))


def on_e4m3_grid(m: int, k: int) -> torch.Tensor:
    """`[m, k]` activations that 1×128 quantisation represents exactly: in each tile, e4m3 values times a power of two
    2^j, the largest magnitude 448 · 2^j. The scale is then 2^j exactly (amax / 448, and also amax times the rounded
    reciprocal of 448), every payload exact: no rounding, so neither the interpreter's casts nor a one-step scale
    difference between quantisers can change the result."""
    payload = (torch.randn(m, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    payload[:, ::128] = 448.0 * torch.sign(torch.randn(m, payload[:, ::128].shape[1]))
    powers = torch.exp2(torch.randint(-8, 1, (m, -(-k // 128))).float()).repeat_interleave(128, dim=1)[:, :k]
    return payload * powers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_linear_through_kernels(dtype):
    """An `FP8Linear` holding e4m3 weights from the test's quantiser, run through the dispatch (activations quantised
    by the kernel, then the FP8 GEMM kernel): equal to the fp64 product of the activations and the weights' values."""
    w, w_s = weight_blocks(torch.randn(200, 320) * 0.05)
    layer = FP8Linear(320, 200)
    layer.weight.data, layer.weight_scale_inv.data = w, w_s
    x = on_e4m3_grid(15, 320)
    with through_kernels("act_quant"), through_kernels("fp8_gemm"):
        y = layer(x.to(dtype).view(3, 5, 320))
    assert y.shape == (3, 5, 200) and y.dtype == dtype
    assert_close(y.reshape(15, 200), x.double() @ e4m3_value(w, w_s, (128, 128)).t(), dtype)


def test_fp8_experts_through_kernels():
    """The routed experts' projection over FP8 weights, through the dispatch: the FP8 grouped GEMM kernel."""
    counts = [9, 0, 30]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    w, w_s = weight_blocks(torch.randn(3, 136, 256) * 0.05)
    rows = on_e4m3_grid(sum(counts), 256)
    with through_kernels("act_quant"), through_kernels("fp8_grouped_gemm"):
        out = expert_projection(rows, w, w_s, offsets, FP8Format())
    assert_close(out, ref_grouped_mm(rows, e4m3_value(w, w_s, (128, 128)).transpose(1, 2), offsets), torch.float32)

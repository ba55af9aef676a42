"""FP8 kernels: each Triton kernel (in the interpreter) equals its torch reference; the reference GEMM is within
the FP8 rounding bound of exact fp64 math.

The interpreter's own casts are not those of a GPU, in ways measured here on 65k random values:
fp32 -> e4m3 loses the carry when a value rounds up across a binade edge (124.3 -> 64 instead of 128), lands one
subnormal step (2^-9) off below 2^-6, and rounds exact ties away from zero instead of to even; fp32 -> bf16 truncates.
Scales must be exactly equal. Payloads must be equal except at elements explained, one by one, by those casts of the
exact pre-cast value, so any real kernel error still fails; bf16 outputs may differ by one bf16 step.
"""

import math

import pytest
import torch

from modeling_deepseek_v3.kernels import (
    FP8_E4M3_MAX,
    act_quant_colwise_ref,
    act_quant_ref,
    fp8_gemm_ref,
    weight_dequant_ref,
    weight_quant_ref,
)

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
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)


@pytest.mark.parametrize("m, k", [(1, 64), (128, 96), (300, 40)], ids=["M1", "M128", "M300"])
def test_act_quant_colwise(m, k):
    x = fresh(m, k).t().contiguous().t() if m > 1 else fresh(m, k)
    q, s = act_quant_colwise_triton(x)
    q_ref, s_ref = act_quant_colwise_ref(x)
    assert s.shape == (math.ceil(m / 128), k)
    assert torch.equal(s, s_ref)
    assert_fp8_payload_equal(q, q_ref, x.float() / tile_scales(s_ref.t(), m).t())


@pytest.mark.parametrize("n, k", [(576, 256), (256, 320), (256, 384), (100, 100), (1, 128)], ids=str)
def test_weight_quant_and_dequant(n, k):
    w = fresh(n, k, scale=0.05)
    q, s = weight_quant_triton(w)
    q_ref, s_ref = weight_quant_ref(w)
    assert s.shape == (math.ceil(n / 128), math.ceil(k / 128))
    assert torch.equal(s, s_ref)
    block_scales = tile_scales(s_ref.repeat_interleave(128, dim=0)[:n], k)
    assert_fp8_payload_equal(q, q_ref, w / block_scales)
    fp32 = torch.float32
    assert torch.equal(weight_dequant_triton(q_ref, s_ref, fp32), weight_dequant_ref(q_ref, s_ref, fp32))
    assert_bf16_within_one_step(weight_dequant_triton(q_ref, s_ref), weight_dequant_ref(q_ref, s_ref))
    # quantisation error bounded by half an e4m3 step (2^-4 relative) of each block's largest magnitude
    deq = weight_dequant_ref(q_ref, s_ref, dtype=torch.float32)
    assert ((deq - w).abs() <= torch.maximum(w.abs() * 2**-4, block_scales * FP8_E4M3_MAX * 2**-10)).all()


GEMMS = [(1, 576, 256), (5, 256, 320), (130, 320, 128), (64, 129, 384)]


@pytest.mark.parametrize("m, n, k", GEMMS, ids=[f"M{m}-N{n}-K{k}" for m, n, k in GEMMS])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_triton_equals_reference(m, n, k, out_dtype):
    a, a_s = act_quant_ref(fresh(m, k))
    b, b_s = weight_quant_ref(fresh(n, k, scale=0.05))
    out = fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    ref = fp8_gemm_ref(a, a_s, b, b_s, out_dtype=out_dtype)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2  # fp32 summation order; bf16 output rounding
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_fp8_gemm_per_row_b_scales():
    """The weight-gradient form: B is an activation with 1×128 tiles per row."""
    a, a_s = act_quant_ref(fresh(40, 256))
    b, b_s = act_quant_ref(fresh(200, 256))
    out = fp8_gemm_triton(a, a_s, b, b_s, torch.float32)
    ref = fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    a64 = a.double() * a_s.double().repeat_interleave(128, 1)
    b64 = b.double() * b_s.double().repeat_interleave(128, 1)
    exact = a64 @ b64.t()  # the dequantised operands, multiplied exactly
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


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
    a, a_s = act_quant_ref(fresh(4, 256))
    b, b_s = weight_quant_ref(fresh(8, 256))
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

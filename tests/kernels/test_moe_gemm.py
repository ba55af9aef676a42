"""Grouped GEMMs of the routed experts: each Triton kernel (in the interpreter) equals its torch reference, forward
and every gradient; the FP8 grouped GEMM equals `fp8_gemm_ref` per expert.

bf16 is not tested here: the interpreter multiplies the raw bits of bf16 `tl.dot` operands (triton-lang/triton#11584);
`benchmarks/kernels_gpu.py` checks bf16 on a GPU.
"""

import pytest
import torch

from modeling_deepseek_v3.kernels import (
    act_quant_ref,
    fp8_gemm_ref,
    fp8_grouped_gemm_ref,
    grouped_mm_ref,
    grouped_swiglu_ref,
    weight_dequant_ref,
    weight_quant_ref,
)

pytest.importorskip("triton")
from modeling_deepseek_v3.kernels.moe_gemm import (  # noqa: E402
    fp8_grouped_gemm_triton,
    grouped_mm_triton,
    grouped_mm_wgrad_triton,
    grouped_swiglu_triton,
)

# rows per expert: ragged (not multiples of the 64-row tile), empty experts first, between and last, one expert only
COUNTS = [[70, 0, 129, 1, 3], [0, 0, 9, 0], [64, 64], [17]]
IDS = ["ragged", "empty-experts", "whole-tiles", "one-expert"]


def offsets_of(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def expert_weights(e, n, k, dtype=torch.float32):
    """`[E, K, N]` as the experts pass it: a transposed view of stacked `[E, N, K]` weights."""
    return (torch.randn(e, n, k) * k**-0.5).to(dtype).transpose(1, 2)


def assert_close_rel(out, ref, tol=1e-5):
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


def reference_grads(fn, dy, *tensors):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    fn(*leaves).backward(dy)
    return [x.grad for x in leaves]


@pytest.mark.parametrize("counts", COUNTS, ids=IDS)
def test_grouped_mm_forward_and_gradients(counts):
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 96)  # K = 96: a partial second K block
    w = expert_weights(len(counts), 200, 96)  # N = 200: a partial second N tile
    assert_close_rel(grouped_mm_triton(x, w, offsets), grouped_mm_ref(x, w, offsets))
    dy = torch.randn(sum(counts), 200)
    dx_ref, dw_ref = reference_grads(lambda a, b: grouped_mm_ref(a, b, offsets), dy, x, w)
    assert_close_rel(grouped_mm_triton(dy, w.transpose(1, 2), offsets), dx_ref)  # dx: the same kernel with wᵀ
    dw = grouped_mm_wgrad_triton(x, dy, offsets)
    assert dw.shape == w.shape and dw.transpose(1, 2).is_contiguous()  # the layout of the stacked weights
    assert_close_rel(dw, dw_ref)


@pytest.mark.parametrize("counts", COUNTS, ids=IDS)
def test_grouped_swiglu_forward_and_gradients(counts):
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 80, requires_grad=True)
    w_gate = expert_weights(len(counts), 72, 80).requires_grad_()
    w_up = expert_weights(len(counts), 72, 80).requires_grad_()
    out = grouped_swiglu_triton(x, w_gate, w_up, offsets)
    assert_close_rel(out, grouped_swiglu_ref(x, w_gate, w_up, offsets))
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_gate, w_up), dy)
    ref_grads = reference_grads(lambda *a: grouped_swiglu_ref(*a, offsets), dy, x, w_gate, w_up)
    for name, got, ref in zip(("dx", "dw_gate", "dw_up"), grads, ref_grads):
        assert got.shape == ref.shape, name
        assert_close_rel(got, ref, 1e-4)


def test_grouped_swiglu_inference_writes_no_projections():
    offsets = offsets_of([5, 0, 30])
    x, w_gate, w_up = torch.randn(35, 64), expert_weights(3, 48, 64), expert_weights(3, 48, 64)
    with torch.no_grad():
        out = grouped_swiglu_triton(x.requires_grad_(), w_gate, w_up, offsets)
    assert out.grad_fn is None
    assert_close_rel(out, grouped_swiglu_ref(x, w_gate, w_up, offsets))


def test_grouped_mm_fp16_and_many_experts():
    """37 experts (not a power of two) with random, often empty, groups; fp16 inputs accumulate in fp32."""
    counts = torch.randint(0, 6, (37,)).tolist()
    offsets = offsets_of(counts)
    x, w = torch.randn(sum(counts), 64).half(), expert_weights(37, 40, 64, torch.float16)
    out = grouped_mm_triton(x, w, offsets)
    assert out.dtype == torch.float16
    assert_close_rel(out.float(), grouped_mm_ref(x, w, offsets).float(), 1e-3)


@pytest.mark.parametrize("counts, n, k", [([40, 0, 25, 3], 200, 320), ([0, 9], 128, 256)], ids=["ragged", "whole"])
def test_fp8_grouped_gemm_equals_reference(counts, n, k):
    offsets = offsets_of(counts)
    a, a_s = act_quant_ref(torch.randn(sum(counts), k) * torch.logspace(-1, 1, k))  # the torch cast: exact rounding
    w, w_s = weight_quant_ref(torch.randn(len(counts), n, k) * 0.05)
    out = fp8_grouped_gemm_triton(a, a_s, w, w_s, offsets, torch.float32)
    ref = fp8_grouped_gemm_ref(a, a_s, w, w_s, offsets, out_dtype=torch.float32)
    assert_close_rel(out, ref)
    bf16 = fp8_grouped_gemm_triton(a, a_s, w, w_s, offsets)
    assert bf16.dtype == torch.bfloat16
    assert_close_rel(bf16.float(), ref, 1e-2)


def test_fp8_grouped_gemm_ref_is_fp8_gemm_per_expert_and_dequantised_math():
    counts = [30, 0, 7]
    offsets = offsets_of(counts)
    a, a_s = act_quant_ref(torch.randn(37, 256))
    w, w_s = weight_quant_ref(torch.randn(3, 130, 256) * 0.05)
    ref = fp8_grouped_gemm_ref(a, a_s, w, w_s, offsets, out_dtype=torch.float32)
    assert torch.equal(ref[30:], fp8_gemm_ref(a[30:], a_s[30:], w[2], w_s[2], out_dtype=torch.float32))
    x_deq = a.float() * a_s.repeat_interleave(128, dim=1)
    dense = grouped_mm_ref(x_deq, weight_dequant_ref(w, w_s, torch.float32).transpose(1, 2), offsets)
    assert_close_rel(ref, dense)


def test_rejects_bad_input():
    offsets = offsets_of([2, 2])
    x, w = torch.randn(4, 8), expert_weights(2, 3, 8)
    with pytest.raises(ValueError, match="int32"):
        grouped_mm_triton(x, w, offsets.long())
    with pytest.raises(ValueError, match="one layout"):
        grouped_swiglu_triton(x, w, w.contiguous(), offsets)
    with pytest.raises(ValueError, match="dy"):
        grouped_mm_wgrad_triton(x, torch.randn(5, 3), offsets)
    a, a_s = act_quant_ref(torch.randn(4, 256))
    q, s = weight_quant_ref(torch.randn(2, 8, 256))
    with pytest.raises(ValueError, match="w_s must have shape"):
        fp8_grouped_gemm_ref(a, a_s, q, s[:, :, :1], offsets)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_grouped_gemm_triton(a.float(), a_s, q, s, offsets)

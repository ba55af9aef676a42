"""Grouped GEMMs of the routed experts: each Triton kernel equals an fp64 reference written from its formula, forward
and every gradient, in fp32, fp16 and bf16 (bf16 on CUDA only: the interpreter multiplies the raw bits of bf16
`tl.dot` operands, triton-lang/triton#11584); the FP8 grouped GEMM on e4m3 inputs quantised in the test; a model
step through the dispatch launches the kernels and equals the torch path.
"""

import copy

import pytest
import torch

from modeling_deepseek_v3.kernels import fp8_grouped_gemm_ref

from ..utils import e4m3_value, random_ids, random_model, row_tiles, weight_blocks
from .common import (
    DEVICE,
    DOT_DTYPES,
    TOLERANCE,
    assert_close,
    ref_grouped_mm,
    ref_grouped_wgrad,
    ref_swiglu,
    through_kernels,
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


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("counts", COUNTS, ids=IDS)
def test_grouped_mm_forward_and_gradients(counts, dtype):
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 96).to(dtype)  # K = 96: a partial second K block
    w = expert_weights(len(counts), 200, 96, dtype)  # N = 200: a partial second N tile
    dy = torch.randn(sum(counts), 200).to(dtype)
    out = grouped_mm_triton(x, w, offsets)
    assert out.dtype == dtype
    assert_close(out, ref_grouped_mm(x, w, offsets), dtype)
    dx = grouped_mm_triton(dy, w.transpose(1, 2), offsets)  # dx: the same kernel with wᵀ
    assert_close(dx, ref_grouped_mm(dy, w.transpose(1, 2), offsets), dtype)
    dw = grouped_mm_wgrad_triton(x, dy, offsets)
    assert dw.shape == w.shape and dw.transpose(1, 2).is_contiguous()  # the layout of the stacked weights
    assert_close(dw, ref_grouped_wgrad(x, dy, offsets), dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("counts", COUNTS, ids=IDS)
def test_grouped_swiglu_forward_and_gradients(counts, dtype):
    offsets = offsets_of(counts)
    x = torch.randn(sum(counts), 80).to(dtype).requires_grad_()
    w_gate = expert_weights(len(counts), 72, 80, dtype).requires_grad_()
    w_up = expert_weights(len(counts), 72, 80, dtype).requires_grad_()
    out = grouped_swiglu_triton(x, w_gate, w_up, offsets)
    leaves = [t.detach().double().requires_grad_() for t in (x, w_gate, w_up)]
    ref = ref_swiglu(*leaves, offsets)
    assert_close(out, ref, dtype)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_gate, w_up), dy)
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    for name, got, want in zip(("dx", "dw_gate", "dw_up"), grads, ref_grads):
        assert got.shape == want.shape, name
        # the gradients pass through the stored gate and up projections, rounded to `dtype`: twice the forward's
        # rounding (fp32: 1e-5 would do; the tolerance is the dtype's, doubled)
        tol = 2 * TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_grouped_swiglu_inference_writes_no_projections():
    offsets = offsets_of([5, 0, 30])
    x, w_gate, w_up = torch.randn(35, 64), expert_weights(3, 48, 64), expert_weights(3, 48, 64)
    with torch.no_grad():
        out = grouped_swiglu_triton(x.requires_grad_(), w_gate, w_up, offsets)
    assert out.grad_fn is None
    assert_close(out, ref_swiglu(x, w_gate, w_up, offsets), torch.float32)


def test_grouped_mm_many_experts():
    """37 experts (not a power of two) with random, often empty, groups."""
    counts = torch.randint(0, 6, (37,)).tolist()
    offsets = offsets_of(counts)
    x, w = torch.randn(sum(counts), 64), expert_weights(37, 40, 64)
    assert_close(grouped_mm_triton(x, w, offsets), ref_grouped_mm(x, w, offsets), torch.float32)


@pytest.mark.parametrize("counts, n, k", [([40, 0, 25, 3], 200, 320), ([0, 9], 128, 256)], ids=["ragged", "whole"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_grouped_gemm_equals_dequantised_math(counts, n, k, out_dtype):
    """e4m3 inputs quantised in the test (`row_tiles`, `weight_blocks`); the reference multiplies their fp64 values.
    The e4m3 products are exact in fp32, so only the order of the sums and the output rounding differ."""
    offsets = offsets_of(counts)
    a, a_s = row_tiles(torch.randn(sum(counts), k) * torch.logspace(-1, 1, k))
    w, w_s = weight_blocks(torch.randn(len(counts), n, k) * 0.05)
    out = fp8_grouped_gemm_triton(a, a_s, w, w_s, offsets, out_dtype)
    assert out.dtype == out_dtype
    ref = ref_grouped_mm(e4m3_value(a, a_s, (1, 128)), e4m3_value(w, w_s, (128, 128)).transpose(1, 2), offsets)
    assert_close(out, ref, out_dtype)


def test_fp8_grouped_gemm_ref_equals_dequantised_math():
    """The package's torch path, on the same e4m3 inputs from the test's quantiser, against the fp64 math."""
    counts = [30, 0, 7]
    offsets = offsets_of(counts)
    a, a_s = row_tiles(torch.randn(37, 256))
    w, w_s = weight_blocks(torch.randn(3, 130, 256) * 0.05)
    out = fp8_grouped_gemm_ref(a, a_s, w, w_s, offsets, out_dtype=torch.float32)
    ref = ref_grouped_mm(e4m3_value(a, a_s, (1, 128)), e4m3_value(w, w_s, (128, 128)).transpose(1, 2), offsets)
    assert_close(out, ref, torch.float32)


def test_model_training_step_through_grouped_kernels():
    """A forward and backward of a tiny MoE model with the routed experts on the kernels (the fused SwiGLU with its
    backward, the grouped GEMM and its weight gradient): the loss and every expert gradient equal the torch path's
    (on the CPU)."""
    model = random_model().train()
    ids = random_ids(model.config, 2, 10)

    def step(model, ids):
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters() if "experts" in name}

    ref_loss, ref_grads = step(copy.deepcopy(model).cpu(), ids.cpu())
    with through_kernels("grouped_swiglu"), through_kernels("grouped_mm"), through_kernels("grouped_mm_wgrad"):
        loss, grads = step(model, ids)
    tol = 1e-5 if DEVICE == "cpu" else 1e-4  # CPU and CUDA runs differ in the order of every matmul's sums
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad.cpu(), ref_grads[name], rtol=tol, atol=tol * ref_grads[name].abs().max())


def test_rejects_bad_input():
    offsets = offsets_of([2, 2])
    x, w = torch.randn(4, 8), expert_weights(2, 3, 8)
    with pytest.raises(ValueError, match="int32"):
        grouped_mm_triton(x, w, offsets.long())
    with pytest.raises(ValueError, match="one layout"):
        grouped_swiglu_triton(x, w, w.contiguous(), offsets)
    with pytest.raises(ValueError, match="dy"):
        grouped_mm_wgrad_triton(x, torch.randn(5, 3), offsets)
    a, a_s = row_tiles(torch.randn(4, 256))
    q, s = weight_blocks(torch.randn(2, 8, 256))
    with pytest.raises(ValueError, match="w_s must have shape"):
        fp8_grouped_gemm_ref(a, a_s, q, s[:, :, :1], offsets)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_grouped_gemm_triton(a.float(), a_s, q, s, offsets)

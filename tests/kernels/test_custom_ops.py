"""The kernels' custom operators: real and fake implementations agree (`torch.library.opcheck` for `grouped_mm`:
schema, fake shapes and strides, autograd registration, AOT dispatch), `grouped_mm` compiles in fp32 with its
gradients equal to eager's, and the Triton-backed operators trace as one call with the Triton wrappers' output
layout."""

import pytest
import torch

from modeling_deepseek_v3.kernels import grouped_mm, grouped_mm_ref
from modeling_deepseek_v3.kernels.custom_ops import (
    grouped_mm_op,
    grouped_mm_wgrad_op,
    grouped_swiglu_op,
    mla_decode_op,
)


def grouped_inputs(dtype=torch.float32, requires_grad=False):
    # 4 groups with 3, 0, 5 and 2 rows; rows of K and N elements span multiples of 16 bytes, as torch wants
    offsets = torch.tensor([3, 3, 8, 10], dtype=torch.int32)
    x = torch.randn(10, 16, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(4, 24, 16, dtype=dtype).transpose(1, 2).requires_grad_(requires_grad)  # [E, K, N], a view
    return x, w, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_op_passes_opcheck(dtype):
    torch.library.opcheck(grouped_mm_op, grouped_inputs(dtype, requires_grad=True))
    x, _, offsets = grouped_inputs(dtype)
    torch.library.opcheck(grouped_mm_wgrad_op, (x, torch.randn(10, 24, dtype=dtype), offsets))


def test_grouped_mm_compiles_in_fp32_with_the_eager_gradients():
    x, w, offsets = grouped_inputs(requires_grad=True)
    weights = torch.randn(10, 24)

    def loss(x, w):
        return (grouped_mm(x, w, offsets) * weights).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(loss(x, w), (x, w))
    compiled_grads = torch.autograd.grad(compiled(x, w), (x, w))
    for eager, got in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(got, eager, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(grouped_mm(x, w, offsets), grouped_mm_ref(x, w, offsets), rtol=1e-5, atol=1e-5)


def same_layout(real: torch.Tensor, meta: torch.Tensor) -> bool:
    return real.shape == meta.shape and real.stride() == meta.stride() and real.dtype == meta.dtype


class Call(torch.nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, *args):
        return self.op(*args)


def test_triton_ops_fake_implementations():
    """The Triton-backed operators, which run only on CUDA: `torch.export` traces each as one call, whose fake
    implementation gives the Triton wrapper's output shape, strides and dtype (the wrapper runs in the interpreter)."""
    pytest.importorskip("triton")
    from modeling_deepseek_v3.kernels.latent_decode import mla_decode_triton
    from modeling_deepseek_v3.kernels.moe_gemm import grouped_swiglu_triton

    x, w_gate, offsets = grouped_inputs()
    w_up = torch.randn_like(w_gate.transpose(1, 2)).transpose(1, 2)  # the same layout as w_gate
    b, s, h, c, r, t = 2, 2, 4, 32, 8, 21
    q_lat, q_pe = torch.randn(b, s, h, c), torch.randn(b, s, h, r)
    c_kv, k_pe = torch.randn(b, t, c), torch.randn(b, t, r)
    mask = (torch.arange(t) <= torch.arange(t - s, t)[:, None]).expand(b, s, t).contiguous()
    calls = [(grouped_swiglu_op, "grouped_swiglu", grouped_swiglu_triton, (x, w_gate, w_up, offsets))]
    for m in (mask, None):
        calls.append((mla_decode_op, "mla_decode", mla_decode_triton, (q_lat, q_pe, c_kv, k_pe, m, 0.125)))
    for op, name, triton_wrapper, args in calls:
        program = torch.export.export(Call(op), args)  # traced with fake tensors: the fake implementation runs
        (call,) = [node for node in program.graph.nodes if node.op == "call_function"]
        assert call.target.name() == f"deepseek_v3::{name}"
        real, fake = triton_wrapper(*args), call.meta["val"]
        assert same_layout(real, fake), (name, real.stride(), fake.stride())

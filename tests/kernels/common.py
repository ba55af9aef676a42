"""What the kernel tests share: the device the kernels run on, tolerances per dtype, and references written here in
fp64 from the ops' formulas, independent of the package's torch code (`kernels/reference.py`).

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
on a CUDA machine they run compiled, on CUDA tensors (tests/kernels/conftest.py makes CUDA the default device there).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from modeling_deepseek_v3.kernels import kernel_launches, triton_on_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BF16_DOT_ON_CPU = ("the Triton interpreter multiplies the raw bits of bfloat16 tl.dot operands "
                   "(triton-lang/triton#11584): bf16 GEMMs run on CUDA only")
# bf16 through a kernel with tl.dot: skipped on CPU for the reason above, run on CUDA
SKIP_BF16_DOT_ON_CPU = pytest.mark.skipif(DEVICE == "cpu", reason=BF16_DOT_ON_CPU)
BF16_DOT = pytest.param(torch.bfloat16, id="bf16", marks=SKIP_BF16_DOT_ON_CPU)
DOT_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16_DOT]

# Error allowed, relative to the largest reference magnitude, when a kernel's output in this dtype is compared with an
# fp64 reference computed from the same (already rounded) inputs:
TOLERANCE = {
    # fp32 products are exact (the kernels ask tl.dot for IEEE fp32) and only the order of the fp32 sums differs:
    # ~sqrt(K) · 2^-24 of the largest term, far below 1e-5 at these sizes
    torch.float32: 1e-5,
    # the output rounded to fp16 (11 significant bits, half a step = 2^-11 relative), plus fp16 intermediates (the
    # attention probabilities before the P·V product): a few steps
    torch.float16: 2**-8,
    # the output rounded to bf16 (8 significant bits, a step = 2^-7 relative; the interpreter truncates, a whole
    # step), plus bf16 intermediates (the attention probabilities): a few steps
    torch.bfloat16: 2**-5,
}


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    """`got` within `TOLERANCE[dtype]` of `ref`, relative to `scale` (default: the largest |ref|)."""
    tol = TOLERANCE[dtype]
    scale = ref.abs().max().item() if scale is None else scale
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol * scale)


@contextlib.contextmanager
def through_kernels(op: str):
    """Run the block with the ops on their Triton kernels (CUDA tensors on a CUDA machine, CPU tensors through the
    interpreter elsewhere) and check that the dispatch launched `op`'s kernel at least once."""
    before = kernel_launches[op]
    with triton_on_cpu() if DEVICE == "cpu" else contextlib.nullcontext():
        yield
    assert kernel_launches[op] > before, f"the dispatch did not launch the {op} kernel"


# ---- fp64 references ------------------------------------------------------------------------------------------------


def groups(offsets: torch.Tensor):
    """`(group, rows)` for every group of rows that `offsets` (cumulative counts) delimits."""
    start = 0
    for group, end in enumerate(offsets.tolist()):
        yield group, slice(start, end)
        start = end


def ref_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`out[rows of e] = x[rows of e] @ w[e]` in fp64; w `[E, K, N]`."""
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float64, device=x.device)
    for group, rows in groups(offsets):
        out[rows] = x[rows].double() @ w[group].double()
    return out


def ref_grouped_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`dw[e] = x_eᵀ · dy_e` in fp64, `[E, K, N]` (zeros for a group without rows)."""
    dw = torch.zeros(offsets.shape[0], x.shape[1], dy.shape[1], dtype=torch.float64, device=x.device)
    for group, rows in groups(offsets):
        dw[group] = x[rows].double().t() @ dy[rows].double()
    return dw


def ref_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    gate = ref_grouped_mm(x, w_gate, offsets)
    return gate * torch.sigmoid(gate) * ref_grouped_mm(x, w_up, offsets)


def ref_latent_attention(q_lat, q_pe, c_kv, k_pe, mask, scale) -> torch.Tensor:
    """Absorbed MLA in fp64: `softmax(scale · (q_lat·c_kvᵀ + q_pe·k_peᵀ)) · c_kv` per head over the keys `mask`
    `[b, s, t]` allows (None: query i of s sees keys up to t - s + i); a query that sees no key gets zeros."""
    b, s, h, _ = q_lat.shape
    t = c_kv.shape[1]
    if mask is None:
        positions = torch.arange(t - s, t, device=c_kv.device)
        mask = (torch.arange(t, device=c_kv.device) <= positions[:, None]).expand(b, s, t)
    scores = torch.einsum("bshc,btc->bsht", q_lat.double(), c_kv.double())
    scores = (scores + torch.einsum("bshr,btr->bsht", q_pe.double(), k_pe.double())) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row of -inf only: NaN -> 0
    return torch.einsum("bsht,btc->bshc", weights, c_kv.double())

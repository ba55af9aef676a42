"""The kernels as torch custom operators (namespace `deepseek_v3`), for `torch.compile` and CUDA graphs.

`torch.compile` traces torch code into graphs; a custom operator is one opaque call in such a graph, whose output
shape and layout come from its fake implementation. Three calls need that:
* `grouped_mm` (every device, differentiable): torch's `F.grouped_mm` has no fp32 meta kernel, so compiling it
  fails ("Expected inputs of BF16 type"), and on CUDA it is a Triton launch.
* `mla_decode` and `grouped_swiglu` on CUDA (no gradient): autotuned Triton launches, which the compiler would
  otherwise trace into. Inside a captured CUDA graph they replay like any other kernel.
The real implementations are the Triton wrappers (the Triton interpreter runs them on CPU tensors) and, on the CPU,
torch matmuls.

References: PyTorch "Custom Python operators" (`torch.library.custom_op`, `register_fake`, `register_autograd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import count_launch, use_triton


def grouped_mm_impl(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`out[rows of e] = x[rows of e] @ w[e]`: x `[T, K]`, w `[E, K, N]`, offsets `[E]` int32 -> `[T, N]`."""
    if use_triton(x):
        from .moe_gemm import grouped_mm_triton

        count_launch("grouped_mm")
        return grouped_mm_triton(x, w, offsets)
    # On the CPU one matmul per group that has rows: the same products as torch's grouped_mm, bit for bit, but that
    # visits every group (a decode step of 256 experts x 8 rows takes it ~7x longer). Reading the offsets back is
    # free on the CPU. The rows of the groups that have any are split off x and out in one call each, so a group
    # costs two operators (its weight's view and its matmul): a decode step launches a few per expert it routes to.
    groups, sizes, start = [], [], 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            groups.append(group)
            sizes.append(end - start)
        start = end
    sizes.append(x.shape[0] - start)  # rows past the last offset (expert parallelism's off-rank routes): unwritten
    out = x.new_empty(x.shape[0], w.shape[-1])
    for group, rows, rows_out in zip(groups, x.split_with_sizes(sizes), out.split_with_sizes(sizes)):
        torch.mm(rows, w[group], out=rows_out)
    return out


def grouped_mm_fake(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def grouped_mm_wgrad_impl(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_mm`: `[E, K, N]`, per group `x_eᵀ · grad_out_e`."""
    if use_triton(x):
        from .moe_gemm import grouped_mm_wgrad_triton

        count_launch("grouped_mm_wgrad")
        return grouped_mm_wgrad_triton(x, grad_out, offsets)
    # torch pads rows to 16 bytes (bf16 with N = 12 has row stride 16): contiguous, as the fake implementation says
    return F.grouped_mm(x.t(), grad_out, offs=offsets).contiguous()


def grouped_mm_wgrad_fake(x: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    e, k, n = offsets.shape[0], x.shape[1], grad_out.shape[1]
    if use_triton(x):  # the Triton kernel writes the layout of the stacked `[E, N, K]` weights
        return x.new_empty(e, n, k).transpose(1, 2)
    return x.new_empty(e, k, n)


def save_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def grouped_mm_backward(ctx, grad_out: torch.Tensor):
    x, w, offsets = ctx.saved_tensors
    # torch's own grouped_mm backward rejects gradients with zero strides (e.g. from `y.sum().backward()`)
    grad_out = grad_out.contiguous()
    grad_x = grouped_mm_op(grad_out, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None  # [T, K]
    grad_w = grouped_mm_wgrad_op(x, grad_out, offsets) if ctx.needs_input_grad[1] else None  # [E, K, N]
    return grad_x, grad_w, None


def grouped_swiglu_impl(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The fused Triton `silu(x·w_gate[e]) * (x·w_up[e])` per group, forward only: `[T, N]`."""
    from .moe_gemm import grouped_swiglu_triton

    count_launch("grouped_swiglu")
    return grouped_swiglu_triton(x, w_gate, w_up, offsets)


def grouped_swiglu_fake(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_gate.shape[-1])


def mla_decode_impl(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
) -> torch.Tensor:
    """The Triton latent decode attention, forward only: `o_lat` `[b, s, h, c]` (see `mla_decode_ref`)."""
    from .latent_decode import mla_decode_triton

    count_launch("mla_decode")
    return mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale)


def mla_decode_fake(q_lat, q_pe, c_kv, k_pe, mask, softmax_scale) -> torch.Tensor:
    return q_lat.new_empty(q_lat.shape)


def define(name: str, impl, fake, backward=None):
    """The operator `deepseek_v3::name` (`impl` the real computation, `fake` its output's shape and layout,
    `backward` its gradient)."""
    op = torch.library.custom_op(f"deepseek_v3::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=save_inputs)
    return getattr(torch.ops.deepseek_v3, name)


grouped_mm_op = define("grouped_mm", grouped_mm_impl, grouped_mm_fake, grouped_mm_backward)
grouped_mm_wgrad_op = define("grouped_mm_wgrad", grouped_mm_wgrad_impl, grouped_mm_wgrad_fake)
grouped_swiglu_op = define("grouped_swiglu", grouped_swiglu_impl, grouped_swiglu_fake)
mla_decode_op = define("mla_decode", mla_decode_impl, mla_decode_fake)

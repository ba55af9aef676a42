"""The tensors a rank holds under transformers' distributed engine, for code that reads weights outside a module's
forward or writes checkpoints: this rank's part of a sharded tensor (`full_tensor`, `owned_rows`, `local_shards`),
which tensors a pipeline stage holds (`find_tensor`, `held_by_other_stage`, `gather_pipeline_stages`), and the latent's
gradient in absorbed attention when the heads are sharded (`sum_gradient_over_head_shards`).

Its contacts with transformers' and torch's internals go through `private_api.py`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from .private_api import PipelineIdentityLayer, swap_parameters


def held_by_other_stage(model: nn.Module, key: str) -> bool:
    """Whether the tensor `key` belongs to a module that this pipeline stage holds a placeholder for."""
    module = model
    for part in key.split(".")[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return False
        if isinstance(module, PipelineIdentityLayer):
            return True
    return False


def gather_pipeline_stages(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The union of every rank's `state_dict` on rank 0, which writes checkpoints ({} elsewhere): each pipeline
    stage holds only its own layers. Every rank must call it."""
    stages = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object({key: tensor.detach().cpu() for key, tensor in state_dict.items()}, stages, dst=0)
    return {} if stages is None else {key: tensor for stage in stages for key, tensor in stage.items()}


def is_float8(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor` on every rank (a collective for a DTensor: every rank must call it). float8 shards are
    gathered as their bytes: gloo cannot gather float8."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not is_float8(tensor):
        return tensor.full_tensor()
    raw = DTensor.from_local(tensor.to_local().view(torch.uint8), tensor.device_mesh, tensor.placements,
                             run_check=False, shape=tensor.shape, stride=tensor.stride())
    return raw.full_tensor().view(tensor.dtype)


def owned_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """`(this rank's part, index of its first row in the full tensor)` for a plain tensor or a DTensor split along
    its rows only (torch.chunk's split per mesh dimension, outer first); None for other layouts."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    start, length = 0, tensor.shape[0]
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard or placement.dim not in (0, -tensor.dim()):
            return None
        chunk = math.ceil(length / tensor.device_mesh.size(mesh_dim))
        offset = min(tensor.device_mesh.get_local_rank(mesh_dim) * chunk, length)
        start, length = start + offset, min(chunk, length - offset)
    local = tensor.to_local()
    return (local, start) if local.shape[0] == length else None


def find_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter or buffer `name` of `model`, or None where this rank does not hold it (a pipeline stage's
    placeholder stands in for its module)."""
    module_name, _, tensor_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    tensor = getattr(module, tensor_name, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


@contextlib.contextmanager
def local_shards(module: nn.Module):
    """Within the block, the parameters of `module` that the engine sharded are this rank's parts (plain tensors,
    differentiable into the sharded parameters), for code that reads them outside the module's forward."""
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    if not sharded:  # the usual case, on every absorbed call: nothing to swap
        yield
        return
    swap_parameters(module, {name: p.to_local() for name, p in sharded.items()})
    try:
        yield
    finally:
        swap_parameters(module, sharded)


class _SumGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over `group`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_gradient_over_head_shards(latent: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:
    """`latent` (the cached `c_kv`), with its gradient summed over the tensor-parallel ranks when the heads are
    sharded (`kv_b_weight` a DTensor): each rank's heads give only part of it. The expanded path gets this sum from
    `kv_b_proj`'s column-wise style; the absorbed path reads the latent directly."""
    if not isinstance(kv_b_weight, DTensor) or not (torch.is_grad_enabled() and latent.requires_grad):
        return latent
    mesh = kv_b_weight.device_mesh  # the tensor-parallel mesh, or a dimension of a larger one
    return _SumGradient.apply(latent, mesh.get_group("tp") if mesh.ndim > 1 else mesh.get_group())

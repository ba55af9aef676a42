"""DeepSeek-V3 under transformers' distributed engine: what the declared plans (`configuration/parallel_plans.py`)
cannot say by themselves.

* Layout checks before anything is sharded: whole attention heads and whole FP8 blocks per tensor-parallel rank,
  whole experts per expert-parallel rank (and whether the routing groups line up with the ranks that hold them).
* The tensors a rank holds are found through `shards.py`.
* Pipeline stages (`run_pipeline_stages`): the decoder and the head pipelined so that self-speculative decoding runs
  on every stage; the MTP modules on the last stage, with the embedding they read.
* Saving: the state of every pipeline stage gathered on the writing rank.
* Balancing: the process group over which token counts are summed, one rank per distinct batch.
* Inputs: the ranks that share a batch check at every prompt that they got the same inputs (`rank_inputs.py`).

Its contacts with transformers' and torch's internals go through `private_api.py`.

References: transformers `distributed/` (`mixin.py`, `tensor_parallel.py`, `expert_parallel.py`,
`pipeline_parallel.py`); torch DTensor (`Shard` follows `torch.chunk`).
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from .configuration.parallel_plans import mtp_plan
from .fp8 import FP8Linear
from .private_api import (
    PipelineIdentityLayer,
    PipelineStage,
    remove_pipeline_forward_wrapper,
    run_on_local_shards_under_tensor_parallelism,
)
from .rank_inputs import check_inputs_at_prompts

logger = logging.get_logger(__name__)


class CausalLMParallelPlans:
    """The causal LM's own parallel plans, beside the decoder's from the config: the head, and the MTP modules (its
    children), whose blocks get a decoder layer's rules (`configuration/parallel_plans.mtp_plan`)."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        self.tp_plan = self.tp_plan | mtp_plan(self.config, "tp")
        self.ep_plan = self.ep_plan | mtp_plan(self.config, "ep")
        self.fsdp_plan = self.fsdp_plan | mtp_plan(self.config, "fsdp")


def distribute_model(model: nn.Module, distributed_config, mesh_manager, apply):
    """transformers' `maybe_distribute_model` (`apply`), which applies the plans, with DeepSeek-V3's layout checks
    before it and its pipeline stages (`run_pipeline_stages`) after it."""
    if mesh_manager is None:
        return apply(model, distributed_config, mesh_manager)
    check_pipeline_layout(model, distributed_config)
    tp_plan = model.tp_plan | (distributed_config.tp_plan if isinstance(distributed_config.tp_plan, dict) else {})
    if distributed_config.tp_size > 1:
        check_tensor_parallel_layout(model, tp_plan, distributed_config.tp_size)
    if distributed_config.ep_size > 1:
        check_expert_parallel_layout(model.config, distributed_config.ep_size)
    run_fp8_linears_on_local_shards(model)
    base = getattr(model, model.base_model_prefix, model)
    embed = base.embed_tokens
    model = apply(model, distributed_config, mesh_manager)
    if distributed_config.pp_size > 1:
        run_pipeline_stages(model, mesh_manager.get_mesh("pp"), embed)
    if distributed_config.pp_size * distributed_config.tp_size > 1:
        check_inputs_across_ranks(getattr(model, model.base_model_prefix, model), distributed_config)
    return model


def check_inputs_across_ranks(base: nn.Module, distributed_config) -> None:
    """Have the decoder `base` check, at every prompt, that the ranks sharing its batch got the same inputs
    (`rank_inputs.py`): before a pipeline stage receives its predecessor's hidden states, which a prompt of another
    length would not fit."""
    group = shared_batch_group(distributed_config)  # created now, while every rank loads
    cache_layer = next(i for i, layer in enumerate(base.layers) if not isinstance(layer, PipelineIdentityLayer))
    base.forward = check_inputs_at_prompts(base.forward, group, cache_layer, lambda: next(base.parameters()).device)


def run_fp8_linears_on_local_shards(model: nn.Module) -> None:
    """Have transformers' column- and row-wise styles run every FP8 linear on its local shards (weight and scales)
    rather than on DTensors, which its dequantisation cannot read."""
    for module in model.modules():
        if isinstance(module, FP8Linear):
            run_on_local_shards_under_tensor_parallelism(module)


def check_pipeline_layout(model: nn.Module, distributed_config) -> None:
    """Raise a `ValueError` for a pipeline layout that cannot run: combined with tensor parallelism (transformers
    resolves the tensor-parallel plan before the pipeline replaces the layers other stages hold, then fails looking
    them up), on a class without the causal LM's head (the stages broadcast the head's logits), or with a stage
    without a decoder layer. transformers itself refuses pipelines with FSDP or with expert dispatch."""
    pp = distributed_config.pp_size
    if pp <= 1:
        return
    if distributed_config.tp_size > 1:
        raise ValueError(f"pp_size={pp} with tp_size={distributed_config.tp_size}: pipeline and tensor parallelism "
                         "cannot be combined for DeepSeek-V3; use one of them")
    if not hasattr(model, "lm_head"):
        raise ValueError(f"pp_size={pp}: pipeline parallelism runs DeepseekV3ForCausalLM only, not "
                         f"{type(model).__name__}")
    if pp > model.config.num_hidden_layers:
        raise ValueError(f"pp_size={pp} is more than num_hidden_layers={model.config.num_hidden_layers}: every "
                         "pipeline stage needs a decoder layer")


def check_tensor_parallel_layout(model: nn.Module, tp_plan: dict[str, str], tp_size: int) -> None:
    """Raise a `ValueError` before sharding if tensor parallelism would split an attention head (the attention of a
    rank runs whole heads) or an FP8 scale block (a rank's weight rows and columns must be whole blocks, so that its
    scales are the scale rows and columns it holds). The routed experts have no tensor-parallel rule (expert
    parallelism keeps them whole), so nothing of theirs is split here."""
    heads = model.config.num_attention_heads
    if heads % tp_size and any(name.endswith(("q_proj", "q_b_proj")) for name in tp_plan):
        raise ValueError(f"tensor parallelism shards attention by heads: num_attention_heads = {heads} does not "
                         f"divide into tp_size = {tp_size} ranks")
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            split = _split_dim(tp_plan, name)
            if split is not None:  # weight [out, in]: column-wise splits the rows, row-wise the columns
                size = (module.out_features, module.in_features)[split]
                _check_whole_blocks(f"{name}.weight", ("rows", "columns")[split], size, module.block_size[split],
                                    tp_size)


def plan_style(plan: dict[str, str], name: str, parameter: bool = False) -> str | None:
    """The style `plan` gives the module `name`, or the parameter `name` (which takes its module's style when it has
    no rule of its own), layer numbers matching `*` as in transformers' engine."""
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    if generic in plan or not parameter:
        return plan.get(generic)
    return plan.get(generic.rpartition(".")[0])


def _split_dim(plan: dict[str, str], name: str) -> int | None:
    """0 if the plan splits `name`'s weight by output rows (column-wise styles), 1 by input columns (row-wise)."""
    style = plan_style(plan, name) or ""
    return 0 if style.startswith(("colwise", "packed_colwise")) else 1 if style.startswith("rowwise") else None


def _check_whole_blocks(name: str, what: str, size: int, block: int, tp_size: int) -> None:
    if size % (block * tp_size):
        raise ValueError(
            f"tensor parallelism shards FP8 weights in whole {block}-wide scale blocks: {name} has {size} {what}, "
            f"which tp_size = {tp_size} ranks cannot share in whole blocks ({size} / {tp_size} = {size / tp_size:g} "
            f"{what} each). Use a tp_size that divides its {math.ceil(size / block)} blocks or a bf16 "
            "checkpoint (deepseek-v3 convert fp8-to-bf16)"
        )


def check_expert_parallel_layout(config, ep_size: int) -> None:
    """Raise a `ValueError` if the routed experts do not divide into `ep_size` ranks; warn if the routing groups
    straddle ranks (then group-limited routing no longer limits the ranks a token is sent to)."""
    experts, groups = config.n_routed_experts, config.n_group
    if experts % ep_size:
        raise ValueError(f"expert parallelism gives each rank whole experts: n_routed_experts = {experts} does not "
                         f"divide into ep_size = {ep_size} ranks")
    if groups > 1 and groups % ep_size and ep_size % groups and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning(
            f"n_group = {groups} routing groups do not line up with ep_size = {ep_size} expert-parallel ranks (one "
            "must divide the other): a group's experts span ranks, so the group limit (topk_group = "
            f"{config.topk_group}) no longer bounds the ranks each token is sent to"
        )


def run_pipeline_stages(model: nn.Module, pp_mesh, embed: nn.Module) -> None:
    """Pipeline parallelism at the decoder and the head, in place of transformers' wrapper of the causal LM's forward
    (which self-speculative decoding, calling the decoder, the head and the MTP modules itself, would bypass):

    * the decoder receives the hidden states from the previous stage, runs this stage's layers and sends its output
      on; the output is the model's on the last stage only;
    * the head runs on the last stage, which broadcasts the logits, so that every rank chooses the same tokens;
    * the MTP modules run after the last decoder layer, on the last stage, together with the embedding they read
      (as DeepSeek-V3's own pipeline keeps embedding and head on one rank). Other stages hold placeholders, whose
      shared head passes the broadcast logits on, and skip their weights when loading.

    Every rank runs the same calls in the same order (as `generate` does), each stage computing its part.
    """
    stage = PipelineStage(pp_mesh)
    base = getattr(model, model.base_model_prefix, model)
    dtype = next(p.dtype for p in base.parameters() if p.is_floating_point() and p.element_size() > 1)
    remove_pipeline_forward_wrapper(model)  # the class's forward runs on every stage
    base.forward = _pipelined_decoder(base.forward, stage, base.config.hidden_size, dtype)
    model.lm_head.forward = _head_on_last_stage(model.lm_head.forward, stage, dtype)
    if stage.pp_is_last_stage:
        base.embed_tokens = embed
    else:
        for k in range(len(model.mtp)):
            model.mtp[k] = _MTPPlaceholder()


PER_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")


def _pipelined_decoder(forward, stage: PipelineStage, hidden_size: int, dtype: torch.dtype):
    def run(input_ids=None, inputs_embeds=None, **kwargs):
        # each stage runs only its own layers: per-layer outputs would silently cover part of the model
        asked = [name for name in PER_LAYER_OUTPUTS if kwargs.get(name)]
        if asked:
            raise ValueError(f"{', '.join(f'{name}=True' for name in asked)}: not available under pipeline "
                             "parallelism, where each stage runs only its own decoder layers")
        if not stage.pp_is_first_stage:  # the previous stage's hidden states stand in for the embeddings
            tokens = input_ids if inputs_embeds is None else inputs_embeds
            shape = (*tokens.shape[:2], hidden_size)
            inputs_embeds = stage.communicate("recv_forward", device=tokens.device, dtype=dtype, shape=shape)
            input_ids = None
        output = forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        hidden = output.last_hidden_state
        stage.communicate("send_forward", device=hidden.device, dtype=dtype, tensor=hidden)  # not from the last
        return output

    return run


def _head_on_last_stage(forward, stage: PipelineStage, dtype: torch.dtype):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        logits = forward(hidden) if stage.pp_is_last_stage else None
        return stage.broadcast_from_last(logits, dtype=dtype, device=hidden.device)

    return run


class _SharedHeadPlaceholder(nn.Module):
    def forward(self, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        return head(hidden)  # the head receives the last stage's logits


class _MTPPlaceholder(PipelineIdentityLayer):
    """An MTP module on a stage before the last: it passes its first input through (its output is not used), and
    its shared head returns the last stage's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_head = _SharedHeadPlaceholder()


# (default process group, pp, dp, tp, which ranks) -> this rank's group: a new default group (after
# destroy_process_group and init_process_group) gets new subgroups
_RANK_GROUPS: dict[tuple, dist.ProcessGroup] = {}


def data_parallel_group(distributed_config) -> dist.ProcessGroup | None:
    """The ranks that hold distinct batches together with this one (the same pipeline stage and tensor-parallel
    index), over which training statistics such as the routing token counts are summed; None without a
    `distributed_config` (then all ranks, as under DDP). Created on first use; every rank must call it."""
    return _rank_group(distributed_config, data_parallel=True)


def shared_batch_group(distributed_config) -> dist.ProcessGroup | None:
    """The ranks that compute on the same batch as this one (its pipeline stages and tensor-parallel ranks, among
    which expert parallelism's all-reduce dispatch runs), which must receive the same inputs; None without a
    `distributed_config`. Created on first use; every rank must call it."""
    return _rank_group(distributed_config, data_parallel=False)


def _rank_group(distributed_config, data_parallel: bool) -> dist.ProcessGroup | None:
    if distributed_config is None or not dist.is_initialized():
        return None
    pp, dp, tp = distributed_config.pp_size, distributed_config.dp_size, distributed_config.tp_size
    if pp * dp * tp != dist.get_world_size():
        raise ValueError(f"distributed_config: pp_size={pp} x dp_size={dp} x tp_size={tp} must equal the "
                         f"{dist.get_world_size()} ranks")
    key = (dist.group.WORLD, pp, dp, tp, data_parallel)
    if key not in _RANK_GROUPS:
        # transformers lays the ranks out as a row-major (pp, dp_replicate, fsdp, tp) mesh
        # (`initialize_distributed_mesh`): a data-parallel group varies the middle two coordinates, a shared-batch
        # group the outer and the inner one
        if data_parallel:
            ranks = [[(stage * dp + d) * tp + t for d in range(dp)] for stage in range(pp) for t in range(tp)]
        else:
            ranks = [[(stage * dp + d) * tp + t for stage in range(pp) for t in range(tp)] for d in range(dp)]
        _RANK_GROUPS[key], _ = dist.new_subgroups_by_enumeration(ranks)
    return _RANK_GROUPS[key]

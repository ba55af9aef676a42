"""The parallel plans of DeepSeek-V3 for transformers' distributed engine, with this model's parameter names.

`from_pretrained(..., distributed_config=DistributedConfig(tp_size=..., ep_size=..., pp_size=..., fsdp_size=...))`
reads them from the config (`base_model_tp_plan`, `base_model_ep_plan`, `base_model_pp_plan`,
`base_model_fsdp_plan`) and from the causal LM (its head and MTP modules). A rule maps a module or parameter path
(`*` for a layer number) to a style of `transformers.distributed`:

* tensor parallelism: MLA by heads (`q_b_proj` / `q_proj` and `kv_b_proj` column-wise in whole heads, `o_proj`
  row-wise; the latent projection `kv_a_proj_with_mqa` and the latent cache replicated), the dense MLPs and shared
  experts (gate/up column-wise, down row-wise) and the vocabulary (embedding by rows, head by columns). The routed
  experts have no tensor-parallel rule, as in transformers' own MoE models since 5.25 (which deprecates the
  `moe_tp_experts` style that split each expert's width): alone, tensor parallelism replicates them;
* expert parallelism: whole routed experts per rank (`grouped_gemm` shards the stacked dim 0, `ep_dispatch_experts`
  brings them their tokens). With `ep_size = tp_size` it splits the experts over the tensor-parallel ranks, and
  `ep_implementation="all_reduce"` sums each rank's experts' outputs over the shared batch;
* FSDP: one unit per decoder layer and per part of an MTP module that is called on its own;
* FP8 block scales (`*_scale_inv`) are sharded with their weights, by the same rule.

An MTP module's block is a decoder layer and gets the decoder layers' rules (`mtp_plan`).
References: transformers `distributed/` (`mixin.py`, `tensor_parallel.py`, `expert_parallel.py`, `fsdp.py`).
"""

from __future__ import annotations

COLWISE, ROWWISE = "colwise", "rowwise"
MLP_PROJECTIONS = {"gate_proj": COLWISE, "up_proj": COLWISE, "down_proj": ROWWISE}


def _fp8(config) -> bool:
    return config.fp8_quantization_config is not None


def decoder_layer_tp_plan(config, dense_mlp: bool, moe: bool) -> dict[str, str]:
    """Tensor-parallel rules of decoder layers, relative to one (`self_attn.q_b_proj`, ...); `dense_mlp`, `moe`:
    whether some of them have a dense MLP, a MoE FFN. Only modules the configuration builds are named, so that no rule
    matches nothing."""
    query = "self_attn.q_proj" if config.q_lora_rank is None else "self_attn.q_b_proj"
    plan = {
        query: COLWISE,  # whole heads: the attention uses the local head count
        "self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",  # replicated; sums the rope key's gradient over ranks
        "self_attn.kv_b_proj": COLWISE,
        "self_attn.o_proj": ROWWISE,
    }
    if dense_mlp:
        plan |= {f"mlp.{name}": style for name, style in MLP_PROJECTIONS.items()}
    if moe and config.n_shared_experts > 0:
        plan |= {f"mlp.shared_experts.{name}": style for name, style in MLP_PROJECTIONS.items()}
    return plan  # the routed experts: expert parallelism only (`decoder_layer_ep_plan`)


def decoder_layer_ep_plan(config) -> dict[str, str]:
    """Expert-parallel rules of one decoder layer: whole routed experts per rank, FP8 scales with their weights."""
    names = list(MLP_PROJECTIONS)
    if _fp8(config):
        names += [f"{name}_scale_inv" for name in MLP_PROJECTIONS]
    return {**{f"mlp.experts.{name}": "grouped_gemm" for name in names}, "mlp.experts": "ep_dispatch_experts"}


def base_model_tp_plan(config) -> dict[str, str]:
    kinds = {config.is_moe_layer(i) for i in range(config.num_hidden_layers)}
    plan = decoder_layer_tp_plan(config, dense_mlp=False in kinds, moe=True in kinds)
    return {"embed_tokens": "embedding_rowwise", **_on_layers(plan)}


def base_model_ep_plan(config) -> dict[str, str]:
    moe = any(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return _on_layers(decoder_layer_ep_plan(config)) if moe else {}


# the decoder layers and the final norm, as transformers' default; `embed_tokens` is its own unit too
BASE_MODEL_FSDP_PLAN = {"embed_tokens": "free_full_weight", "layers.*": "free_full_weight", "norm": "keep_full_weight"}
BASE_MODEL_PP_PLAN = {
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "norm": (["hidden_states"], ["hidden_states"]),
}


def mtp_plan(config, kind: str) -> dict[str, str]:
    """The causal LM's own rules for its MTP modules `mtp.*`, `kind` one of "tp", "ep", "fsdp": their blocks are
    decoder layers and get the decoder layers' rules; `eh_proj` [H, 2H] is split by its input columns."""
    if config.num_nextn_predict_layers == 0:
        return {}
    if kind == "tp":
        # a block is always a MoE layer
        block = decoder_layer_tp_plan(config, dense_mlp=False, moe=True)
        return {"mtp.*.eh_proj": "rowwise_split_input", **_on_blocks(block)}
    if kind == "ep":
        return _on_blocks(decoder_layer_ep_plan(config))
    if kind == "fsdp":
        # the shared head runs outside its module's forward (drafting, the MTP loss), so it is a unit of its own
        return dict.fromkeys(("mtp.*.block", "mtp.*.shared_head", "mtp.*"), "free_full_weight")
    raise ValueError(f"mtp_plan: kind must be 'tp', 'ep' or 'fsdp', got {kind!r}")


def _on_layers(plan: dict[str, str]) -> dict[str, str]:
    return {f"layers.*.{name}": style for name, style in plan.items()}


def _on_blocks(plan: dict[str, str]) -> dict[str, str]:
    return {f"mtp.*.block.{name}": style for name, style in plan.items()}

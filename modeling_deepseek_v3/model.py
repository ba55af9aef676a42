"""DeepSeek-V3 decoder and causal LM as transformers models: `DeepseekV3Model`, `DeepseekV3ForCausalLM`.

Decoder layer: `h = x + MLA(norm(x)); y = h + FFN(norm(h))`, FFN dense SwiGLU for the first
`first_k_dense_replace` layers and DeepSeekMoE after. The causal LM adds the output head, the loss
(`L_main + λ/D · Σ_k L_MTP,k + L_bal`, plus DeepSeek-V3.2's indexer loss in a training stage) and the MTP
modules; generation, checkpoints, MTP, expert balancing, the indexer's training and the optional outputs
(`outputs.py`) each live in their own module. Dimension letters: b batch, s new tokens.
References: DeepSeek-V3 report §2-3; docs/design.md.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder

from .attention import MultiHeadLatentAttention
from .balancing import ExpertBalance, RoutingLog
from .cache import MLACache
from .checkpoint import CheckpointMixin, layer_prefix
from .configuration import DeepseekV3Config
from .continuous_batching import ContinuousBatchingMixin, paged_batch
from .fp8 import FP8Linear, fp8_format, init_fp8_weight
from .generation import MTPGenerationMixin
from .indexer_training import IndexerObjective
from .inputs import (
    check_causal_lm_inputs,
    check_model_inputs,
    count_targets,
    refuse_a_bypassed_causal_lm,
    refuse_a_loss_computed_elsewhere,
)
from .layers import MLP, RMSNorm
from .metrics import TrainingMetrics
from .moe import MoE, RoutedExperts, TopkRouter
from .mtp import MTPLayer, mtp_layer_index, mtp_objective
from .outputs import DeepseekV3CausalLMOutput, LayerOutputs, OutputRequest
from .parallel import CausalLMParallelPlans, data_parallel_group, distribute_model
from .private_api import attention_implementation
from .rope import RotaryEmbedding, rope_frequencies


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config, layer_idx)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, fp8_format(config))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        routing_log: RoutingLog | None = None,
        attentions: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`token_mask` `[b, s]` (False = padding) and the forward's `routing_log` reach a MoE layer (see `MoE`);
        `attentions`, if a list, receives the attention probabilities (`MultiHeadLatentAttention`)."""
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache,
            attentions=attentions, **kwargs,
        )
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            return h + self.mlp(x, token_mask=token_mask, routing_log=routing_log)
        return h + self.mlp(x)


class DeepseekV3PreTrainedModel(CheckpointMixin, PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "MTPLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # static-cache decode steps compile as one graph (tests/model/test_compile.py)
    # What transformers' output recorders (and the tools and tests that look for a MoE) read: the router logits
    # (`Routing.logits`, index 3 of the router's output) of the decoder's MoE layers, those under `layers`; the MTP
    # modules' routers (`mtp.k`) are not decoder layers. Our forward fills `router_logits` itself.
    _can_record_outputs = {"router_logits": OutputRecorder(TopkRouter, index=3, layer_name="layers")}

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """The routed experts compute through their own grouped GEMM over the tokens sorted by expert; transformers'
        experts kernels (its `experts_implementation` dispatch) never apply. So the setting is recorded as "eager",
        transformers' name for a model's own experts forward (also what it records for a model that cannot switch,
        and what keeps `generate()` from switching to "batched_mm" on accelerators); "grouped_mm", the same
        computation, is accepted.

        Raises:
            ValueError: for any other experts implementation (`batched_mm`, the hub's FP8 kernels, ...).
        """
        if requested_experts not in (None, "eager", "grouped_mm"):
            raise ValueError(f"experts_implementation={requested_experts!r} is not available: DeepSeek-V3's routed "
                             "experts run their own grouped GEMM over the tokens sorted by expert ('grouped_mm')")
        return "eager"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range

        def name() -> str:  # only needed for an error message
            return next((n for n, m in self.named_modules() if m is module), type(module).__name__)

        if isinstance(module, TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, RoutedExperts):
            for proj in module.PROJECTIONS:
                weight, scales = module.stored(proj)
                if module.fp8 is None:
                    init.normal_(weight, mean=0.0, std=std)
                else:
                    init_fp8_weight(weight, scales, std, module.fp8.block_size, lambda p=proj: f"{name()} ({p})")
        elif isinstance(module, FP8Linear):
            init_fp8_weight(module.weight, module.weight_scale_inv, std, module.block_size, name)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            # non-persistent, so garbage after a meta-device load: recompute
            inv_freq, module.attention_factor = rope_frequencies(module.config)
            init.copy_(module.inv_freq, inv_freq)

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # transformers' distributed engine (the plans), with DeepSeek-V3's layout checks and pipeline stages
        return distribute_model(model, distributed_config, mesh_manager, super().maybe_distribute_model)


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, decoder layers and final norm; returns the last hidden state (after `norm`) and the cache."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # set by DeepseekV3ForCausalLM: its forward carries the training recipe, which a training forward of this
        # decoder alone would bypass (see refuse_a_bypassed_causal_lm)
        self.inside_causal_lm = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        routing_log: RoutingLog | None = None,
        check_values: bool = True,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        """
        Args:
            input_ids: `[b, s]` token ids in `[0, vocab_size)`; or `inputs_embeds` `[b, s, hidden]`.
            attention_mask: `[b, past + s]` (1 = token, 0 = padding), or a prepared 4-D mask.
            position_ids: `[b, s]`; default: `past + arange(s)`.
            cache: an `MLACache` / static latent cache; created when `use_cache` and none is given.
            output_hidden_states, output_attentions, output_router_logits, return_dict: transformers' flags, the
                config's when None (see `outputs.py`); attentions need `attn_implementation="eager"`.
            routing_log: the forward's `RoutingLog`, to which every MoE layer adds its routing; or None. With
                `output_router_logits` it must keep them (`keep_router_logits=True`). A training forward without one
                of the decoder of a `DeepseekV3ForCausalLM` bypasses the causal LM's recipe and is refused while the
                recipe has a term (`inputs.refuse_a_bypassed_causal_lm`).
            check_values: False skips the checks of values (token ids, mask, positions), which read them back to the
                host, for inputs the model produced itself (speculative verification); shapes are checked anyway.

        Returns:
            `MoeModelOutputWithPast` (`last_hidden_state` after the final norm, `cache`, and what was asked), or its
            tuple with `return_dict=False`.

        Raises:
            ValueError, TypeError: on any argument breaking the rules of `inputs.check_model_inputs` (values are
                checked on an accelerator for prompts, not for one-token decode steps), on an output flag that is
                not a bool, or on a training forward that bypasses the causal LM's recipe (see `routing_log`).
        """
        # continuous batching: transformers' scheduler lays out a flat batch of many requests over the paged cache; its
        # positions are given and its mask and page indices are its own (the mask is not read, see paged_attention.py)
        paged = isinstance(cache, PagedAttentionCache)
        # the first decoder layer this rank runs (a later one on a pipeline stage) keeps the cache length
        cache_layer = next(i for i, layer in enumerate(self.layers) if isinstance(layer, DeepseekV3DecoderLayer))
        check_model_inputs(self.config, input_ids, inputs_embeds, None if paged else attention_mask, position_ids,
                           None if paged else cache, self.layers[cache_layer].input_layernorm.weight.dtype,
                           check_values, cache_layer)  # fmt: skip
        asked = OutputRequest.resolve(self.config, output_hidden_states, output_attentions, output_router_logits,
                                      return_dict)
        if routing_log is None and self.inside_causal_lm and self.training and torch.is_grad_enabled():
            refuse_a_bypassed_causal_lm(self.config, asked.router_logits)
        if routing_log is None and asked.router_logits:
            routing_log = RoutingLog(recording=False, keep_router_logits=True)
        if asked.router_logits and not routing_log.keep_router_logits:
            raise ValueError("output_router_logits=True needs a routing_log created with keep_router_logits=True")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # checkpointed layers are replayed: a cache would be written twice
        if use_cache and cache is None:
            cache = MLACache(self.config)
        past = cache.get_seq_length(cache_layer) if cache is not None and not paged else 0

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, s = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(s, device=inputs_embeds.device) + past).unsqueeze(0).expand(b, -1)

        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=cache_layer,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        if paged:
            kwargs["paged_batch"] = paged_batch(cache, kwargs, inputs_embeds.dtype)
        token_mask = attention_mask[:, -s:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        recorded = LayerOutputs(asked, attention_implementation(self.config))
        hidden_states = inputs_embeds
        for layer in self.layers:
            recorded.add_hidden_state(hidden_states)
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, token_mask=token_mask,
                routing_log=routing_log, attentions=recorded.attention_sink, **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        recorded.add_hidden_state(hidden_states)
        router_logits = dict(routing_log.router_logits) if asked.router_logits else None
        return recorded.model_output(hidden_states, cache if use_cache else None, router_logits)


class DeepseekV3ForCausalLM(
    ContinuousBatchingMixin, MTPGenerationMixin, CausalLMParallelPlans, DeepseekV3PreTrainedModel
):
    """DeepSeek-V3 with its output head and its `num_nextn_predict_layers` MTP modules (`mtp.py`), built whenever
    D > 0 so that they load and save; `config.use_mtp_modules` switches their computation on or off. Training forwards
    feed `expert_balance`, which moves the routing biases after every optimizer step."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.model.inside_causal_lm = True
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # module k's block: a MoE decoder layer with the index (and cache slot) mtp_layer_index(L, k), not in layers
        self.mtp = nn.ModuleList(
            MTPLayer(config, DeepseekV3DecoderLayer(config, mtp_layer_index(config.num_hidden_layers, k)))
            for k in range(1, config.num_nextn_predict_layers + 1)
        )
        self.training_metrics = TrainingMetrics()  # read by DeepseekV3Trainer's logging, or by a custom loop
        self.expert_balance = ExpertBalance(self.training_metrics, layer_prefix)
        self.post_init()

    @property
    def mtp_active(self) -> bool:
        """Whether the MTP modules are computed: built (`num_nextn_predict_layers > 0`) and `use_mtp_modules`."""
        return self.has_mtp_modules and self.config.use_mtp_modules

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepseekV3CausalLMOutput | tuple:
        """
        Args:
            labels: `[b, s]` unshifted next-token targets (-100 ignored), the loss normalised by Trainer's
                `num_items_in_batch`. With active MTP modules and `s >= D + 2`: `loss = main + mtp_loss_weight / D ·
                Σ_k CE_k` (`mtp_objective`). DeepSeek-V3.2 in a training stage adds `indexer_loss_weight ·
                indexer_loss` (`indexer_training.py`; in the dense warm-up only that term carries gradient). The
                output flags are `DeepseekV3Model`'s.
            logits_to_keep: logits for the last `n` positions only (0 = all), or for the given indices.

        Returns:
            `DeepseekV3CausalLMOutput` (`loss`, `logits`, `cache`, what was asked, a training forward's `balance_loss`,
            with labels `mtp_losses` / `mtp_accuracies` `[D]`, DeepSeek-V3.2's `indexer_loss`), or its tuple with
            `return_dict=False`.

        Raises:
            ValueError: on bad inputs (`inputs.py`), or a loss computed outside the model that would drop terms.
        """
        check_causal_lm_inputs(input_ids, inputs_embeds, labels, logits_to_keep, self.config.vocab_size)
        asked = OutputRequest.resolve(self.config, output_hidden_states, output_attentions, output_router_logits,
                                      return_dict)
        # DeepSeek-V3.2 in a training stage: the indexer's KL loss (and in the dense warm-up a main model without
        # gradient)
        objective = IndexerObjective.for_forward(self.config, self.training)
        # a training forward that will produce gradients feeds the expert balancing (token counts, balance loss); not
        # the warm-up, which trains the indexers alone (their routers and biases stay)
        recording = self.training and torch.is_grad_enabled() and not (objective is not None and objective.dense)
        if recording:  # before anything is counted: refuses DeepSpeed steps that nothing would follow
            self.expert_balance.follow_optimizer_steps(self)
        if (recording or objective is not None) and labels is None and kwargs.get("num_items_in_batch") is not None:
            refuse_a_loss_computed_elsewhere(self.config, self.mtp_active)
        log = RoutingLog(recording, self.config.seq_balance_loss_alpha, keep_router_logits=asked.router_logits)
        with contextlib.nullcontext() if objective is None else objective.main_model_scope():
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=asked.hidden_states,
                output_attentions=asked.attentions, output_router_logits=asked.router_logits, return_dict=True,
                routing_log=log, indexer_objective=objective, **kwargs,
            )
            hidden_states = outputs.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
            loss = mtp = None
            num_items = kwargs.get("num_items_in_batch")
            if labels is not None:
                loss_kwargs = dict(kwargs)
                if loss_kwargs.get("num_items_in_batch") is None:
                    # the mean over the targets, taken as sum / count so that a batch without any target has loss 0
                    # (transformers' mean over nothing is NaN)
                    loss_kwargs["num_items_in_batch"] = count_targets(labels).clamp(min=1)
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          **loss_kwargs)
                if self.mtp_active and labels.shape[1] >= len(self.mtp) + 2:
                    embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
                    mtp = mtp_objective(self, embeds, hidden_states, labels, attention_mask, position_ids, num_items,
                                        log, indexer_objective=objective)
                    loss = loss + self.config.mtp_loss_weight / len(self.mtp) * mtp.total
        log.close()  # activation-checkpoint replays during backward add nothing more
        balance_loss = None
        if recording:
            gradients_pending = any(p.grad is not None for p in self.parameters() if p.requires_grad)
            balance_loss = self.expert_balance.end_forward(log, gradients_pending, output=hidden_states)
            if mtp is not None:
                self.training_metrics.add_each("mtp_{}_loss", mtp.losses)
                self.training_metrics.add_each("mtp_{}_accuracy", mtp.accuracies)
        if balance_loss is not None and loss is not None:
            loss = loss + balance_loss * self.expert_balance.loss_share(labels, num_items)
        indexer_loss = None if objective is None else objective.loss()
        if indexer_loss is not None:
            self.training_metrics.add("indexer_loss", indexer_loss)
            if loss is not None:
                loss = loss + self.config.indexer_loss_weight * indexer_loss
        return asked.returned(DeepseekV3CausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, router_logits=outputs.router_logits, balance_loss=balance_loss,
            mtp_losses=None if mtp is None else mtp.losses, mtp_accuracies=None if mtp is None else mtp.accuracies,
            indexer_loss=indexer_loss,
        ))

    def update_routing_bias(
        self, group=None, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, torch.Tensor]:
        """The auxiliary-loss-free balancing step (docs/training.md): each MoE layer's `e_score_correction_bias` moves
        by `±routing_bias_update_speed` towards balance, from the tokens routed in training forwards since the
        layer's last update, summed over `group` (default: the data-parallel ranks; every rank must call it). It runs
        by itself after every optimizer step (`routing_bias_auto_update`). A frozen router keeps its bias, with a
        warning.

        Args:
            optimizer: the optimizer that just stepped: only the layers whose router weight it holds are updated
                (a bias belongs to its router), and the frozen routers' layers have their load measured. None: every
                layer.

        Returns:
            `{layer name: load [E] int64}`, the tokens each expert of the updated layers received during the step.
        """
        speed = self.config.routing_bias_update_speed if self.config.use_routing_bias else 0.0
        layers = [m for m in self.modules() if isinstance(m, MoE)]
        frozen = {m.layer_idx for m in layers if not m.gate.weight.requires_grad}
        if optimizer is not None:
            held = {id(p) for param_group in optimizer.param_groups for p in param_group["params"]}
            layers = [m for m in layers if m.layer_idx in frozen or id(m.gate.weight) in held]
        biases = {m.layer_idx: m.gate.e_score_correction_bias for m in layers}
        frozen &= set(biases)
        if group is None:
            group = data_parallel_group(getattr(self.config, "distributed_config", None))
        return self.expert_balance.update(biases, speed, group, frozen)

    def discard_routing_counts(self) -> None:
        """Forget the tokens counted since the last bias update, e.g. after an optimizer step that did not happen."""
        self.expert_balance.discard()

"""DeepSeek-V3 decoder and causal LM as transformers models: `DeepseekV3Model`, `DeepseekV3ForCausalLM`.

Decoder layer: `h = x + MLA(norm(x)); y = h + FFN(norm(h))`, FFN dense SwiGLU for the first
`first_k_dense_replace` layers and DeepSeekMoE after. Dimension letters: b batch, s new tokens.
References: DeepSeek-V3 report §2; DESIGN.md §2-4, §8; shared/docs/transformers-integration.md.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .attention import MultiHeadLatentAttention
from .cache import MLACache
from .checkpoint import (
    check_checkpoint_files,
    check_loading_info,
    expert_weight_conversions,
    mtp_layer_patterns,
    mtp_shared_copy_keys,
    mtp_weight_renamings,
    stored_copy_differences,
)
from .configuration import DeepseekV3Config
from .fp8 import FP8Linear, weight_quant_blocks
from .generation import SpeculativeStats, mtp_speculative_decoding
from .inputs import IGNORE_INDEX, check_causal_lm_inputs, check_model_inputs
from .layers import MLP, RMSNorm
from .metrics import TrainingMetrics, in_backward_replay
from .moe import MoE, RoutedExperts, TopkRouter, update_routing_biases
from .mtp import MTPLayer
from .rope import RotaryEmbedding, rope_frequencies

logger = logging.get_logger(__name__)


@dataclasses.dataclass
class DeepseekV3CausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the training-objective terms reported beside the loss.

    Args:
        balance_loss: the sequence-wise balance loss summed over MoE layers (already included in `loss`).
        mtp_losses: `[D]`, the mean cross-entropy of each MTP depth k (predicting the token k + 1 ahead); `loss`
            includes `mtp_loss_weight / D` times their sum. None without labels or with the MTP modules off.
        mtp_accuracies: `[D]`, the top-1 accuracy of each MTP depth on the same targets.
    """

    balance_loss: torch.Tensor | None = None
    mtp_losses: torch.Tensor | None = None
    mtp_accuracies: torch.Tensor | None = None


def is_moe_layer(config: DeepseekV3Config, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` has a MoE FFN; the MTP modules' blocks (`layer_idx >= num_hidden_layers`)
    always do."""
    if layer_idx >= config.num_hidden_layers:
        return True
    return layer_idx >= config.first_k_dense_replace and layer_idx % config.moe_layer_freq == 0


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        if is_moe_layer(config, layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.fp8_quantization_config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        record_routing: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """`token_mask` `[b, s]` (False = padding) and `record_routing` reach a MoE layer's balancing (see `MoE`)."""
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            return h + self.mlp(x, token_mask=token_mask, record_routing=record_routing)
        return h + self.mlp(x)


def _init_fp8(q: torch.Tensor, s: torch.Tensor, std: float, block: tuple[int, int], name) -> None:
    """Random init of an FP8 weight: quantise N(0, std²) into `block` blocks (skipped for loaded tensors).
    `name()` gives the module's name for the error raised when only one of payload and scales was loaded."""
    loaded = getattr(q, "_is_hf_initialized", False), getattr(s, "_is_hf_initialized", False)
    if loaded[0] != loaded[1]:  # a payload without its scales (or the reverse) cannot be used
        present, absent = ("weight", "weight_scale_inv") if loaded[0] else ("weight_scale_inv", "weight")
        raise ValueError(f"the checkpoint has the FP8 {present} of {name()} but not its {absent}: it is incomplete")
    if all(loaded):
        return
    w = torch.randn(q.shape, device=q.device) * std
    for tensor, value in zip((q, s), weight_quant_blocks(w, block)):
        init.copy_(tensor, value)


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "MTPLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "scale_inv"]

    def __init__(self, config: DeepseekV3Config, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # MTP modules stored after the decoder layers are not an error for a model without them; a model with them
        # loads their keys (renamed) and checks that nothing else is left there (`_finalize_model_loading`)
        self._keys_to_ignore_on_load_unexpected = mtp_layer_patterns(
            config.num_hidden_layers, config.num_nextn_predict_layers
        )

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
                if module.fp8_block_size is None:
                    init.normal_(getattr(module, proj), mean=0.0, std=std)
                else:
                    q, scales = getattr(module, proj), getattr(module, f"{proj}_scale_inv")
                    _init_fp8(q, scales, std, module.fp8_block_size, lambda p=proj: f"{name()} ({p})")
        elif isinstance(module, FP8Linear):
            _init_fp8(module.weight, module.weight_scale_inv, std, module.block_size, name)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            # non-persistent, so garbage after a meta-device load: recompute
            inv_freq, module.attention_factor = rope_frequencies(module.config)
            init.copy_(module.inv_freq, inv_freq)

    def post_init(self) -> None:
        super().post_init()
        # save_pretrained reverses these conversions, writing the official keys
        self._weight_conversions = self._checkpoint_conversions()

    def _checkpoint_conversions(self) -> list:
        """Official checkpoint keys <-> this model's parameters: per-expert <-> stacked experts."""
        return expert_weight_conversions(self.config)

    def _has_mtp_modules(self) -> bool:
        return False

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        # transformers keys conversions by class name / model_type, which the built-in class shares with ours,
        # so ours are handed to the loader here instead of through the global registry.
        check_checkpoint_files(state_dict, checkpoint_files)
        ours = model._checkpoint_conversions()
        load_config = dataclasses.replace(load_config, weight_mapping=list(load_config.weight_mapping or []) + ours)
        result = PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)
        # transformers keeps the conversions that matched, for save_pretrained to reverse; ours always describe the
        # in-memory layout (a checkpoint may be in the stacked layout already), so all of them are kept
        model._weight_conversions = [c for c in model._weight_conversions if all(c is not o for o in ours)] + ours
        if model._has_mtp_modules():
            model._check_mtp_shared_copies(state_dict, checkpoint_files)
        return result

    def _check_mtp_shared_copies(self, state_dict: dict | None, checkpoint_files: list[str] | None) -> None:
        """Warn when an MTP module's stored copy of the embedding or output head differs from the main tensor; the
        main one is used either way (the modules share it)."""
        expected = {copy: self.get_parameter(main) for copy, main in mtp_shared_copy_keys(self.config).items()}
        expected = {key: tensor for key, tensor in expected.items() if not tensor.is_meta}  # offloaded: not checked
        for key, difference in stored_copy_differences(expected, state_dict, checkpoint_files).items():
            if difference != 0:  # NaN included
                main = mtp_shared_copy_keys(self.config)[key]
                logger.warning(
                    f"The checkpoint's {key} differs from {main} (max |difference| = {difference:.3g}). The MTP "
                    f"modules share the main model's tensor, so {main} is used and {key} is ignored; "
                    "save_pretrained will write a copy of the main tensor."
                )

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # keys left in the MTP layers once their modules took theirs (the shared copies excepted) are unexpected
        stray = set()
        if model._has_mtp_modules():
            patterns = [re.compile(p) for p in mtp_layer_patterns(model.config.num_hidden_layers,
                                                                 model.config.num_nextn_predict_layers)]
            copies = mtp_shared_copy_keys(model.config)
            stray = {k for k in loading_info.unexpected_keys if any(p.match(k) for p in patterns) and k not in copies}
        loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        # ignore_mismatched_sizes relaxes shapes only: a missing tensor would otherwise be left uninitialised
        mismatched = [] if load_config.ignore_mismatched_sizes else loading_info.mismatched_keys
        hint = None
        if loading_info.missing_keys and all(k.startswith("mtp.") for k in loading_info.missing_keys):
            hint = (
                f"The checkpoint lacks the weights of the MTP modules that num_nextn_predict_layers = "
                f"{model.config.num_nextn_predict_layers} asks for; load it with num_nextn_predict_layers=0 to "
                "leave the modules out."
            )
        check_loading_info(loading_info.missing_keys, set(loading_info.unexpected_keys) | stray, mismatched, hint)
        return loading_info


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
        self._keys_to_ignore_on_load_unexpected.append(r"^lm_head\.")  # the head of a causal-LM checkpoint
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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: `[b, s]` token ids in `[0, vocab_size)`; or `inputs_embeds` `[b, s, hidden]`.
            attention_mask: `[b, past + s]` (1 = token, 0 = padding), or a prepared 4-D mask.
            position_ids: `[b, s]`; default: `past + arange(s)`.
            cache: an `MLACache` / static latent cache; created when `use_cache` and none is given.

        Raises:
            ValueError, TypeError: on any argument breaking the rules of `inputs.check_model_inputs` (values are
                checked on an accelerator for prompts, not for one-token decode steps).
        """
        check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids, cache,
                           self.embed_tokens.weight.dtype)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # checkpointed layers are replayed: a cache would be written twice
        if use_cache and cache is None:
            cache = MLACache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: MLA's fused paths never form the full matrix")

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
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        # a training forward that will produce gradients feeds the expert balancing (token counts, balance loss)
        record_routing = self.training and torch.is_grad_enabled() and not in_backward_replay()
        token_mask = attention_mask[:, -s:].bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings, mask, cache=cache, token_mask=token_mask,
                record_routing=record_routing, **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """DeepSeek-V3 with its output head and its `num_nextn_predict_layers` MTP modules (`mtp`, DESIGN §5);
    `generate()` uses the latent `MLACache` by default.

    The MTP modules are built whenever `num_nextn_predict_layers > 0`, so their weights load and save with the
    model; `config.use_mtp_modules` switches their computation (training loss, speculative decoding) on or off.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # MTP module k's block is decoder layer num_hidden_layers + k - 1: a MoE layer with a cache slot of its own.
        # Kept apart from model.layers, which the main forward runs through.
        self.mtp = nn.ModuleList(
            MTPLayer(config, DeepseekV3DecoderLayer(config, config.num_hidden_layers + k))
            for k in range(config.num_nextn_predict_layers)
        )
        self.training_metrics = TrainingMetrics()  # read by DeepseekV3Trainer's logging, or by a custom loop
        self.last_speculative_stats: SpeculativeStats | None = None  # set by generate(use_mtp=True)
        self.post_init()

    def _has_mtp_modules(self) -> bool:
        return len(self.mtp) > 0

    def _checkpoint_conversions(self) -> list:
        """Official keys <-> parameters: the MTP modules' `model.layers.{L + k}.*` <-> `mtp.{k}.*`, then the experts."""
        return mtp_weight_renamings(self.config) + super()._checkpoint_conversions()

    @property
    def mtp_active(self) -> bool:
        """Whether the MTP modules are computed: built (`num_nextn_predict_layers > 0`) and `use_mtp_modules`."""
        return self._has_mtp_modules() and self.config.use_mtp_modules

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, writing the official MTP layout: every MTP module's
        `model.layers.{L + k}.embed_tokens.weight` and `.shared_head.head.weight` as copies of the main tensors."""
        if self._has_mtp_modules() and not getattr(self, "_hf_peft_config_loaded", False):
            state_dict = dict(self.state_dict() if state_dict is None else state_dict)
            for copy, main in mtp_shared_copy_keys(self.config).items():
                tensor = state_dict.get(main, self.get_parameter(main))
                if tensor.is_meta:  # offloaded by accelerate: transformers cannot reload a tensor it does not own
                    logger.warning(f"{main} is offloaded, so its MTP copy {copy} is not written")
                    continue
                # a copy, not a view: safetensors refuses tensors that share storage
                state_dict[copy] = tensor.detach().clone()
        return super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)

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
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepseekV3CausalLMOutput:
        """
        Args:
            labels: `[b, s]` next-token targets (unshifted, -100 ignored); the loss is normalised by
                `num_items_in_batch` when Trainer passes it. With active MTP modules (`mtp_active`) and
                `s >= num_nextn_predict_layers + 2`, `loss = main + mtp_loss_weight / D · Σ_k CE_k`
                (see `_mtp_objective`).
            logits_to_keep: compute logits for the last `n` positions only (0 = all), or for the given indices.

        Returns:
            `DeepseekV3CausalLMOutput` with `loss`, `logits` `[b, s', vocab]`, `cache`, `hidden_states`, and with
            labels `mtp_losses` / `mtp_accuracies` `[D]`.
        """
        check_causal_lm_inputs(input_ids, inputs_embeds, labels, logits_to_keep, self.config.vocab_size)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss_kwargs = dict(kwargs)
            if loss_kwargs.get("num_items_in_batch") is None:
                # the mean over the targets, taken as sum / count so that a batch without any target has loss 0
                # (transformers' mean over nothing is NaN)
                loss_kwargs["num_items_in_batch"] = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        mtp_losses = mtp_accuracies = None
        if labels is not None and self.mtp_active and labels.shape[1] >= len(self.mtp) + 2:
            token_embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            mtp_loss, mtp_losses, mtp_accuracies = self._mtp_objective(
                token_embeds, hidden_states, labels, attention_mask, position_ids, kwargs.get("num_items_in_batch")
            )
            loss = loss + self.config.mtp_loss_weight / len(self.mtp) * mtp_loss
        balance_loss = self._pop_balance_loss()  # the MTP blocks' MoE layers included
        if balance_loss is not None and loss is not None:
            loss = loss + balance_loss * self._balance_loss_share(labels, kwargs.get("num_items_in_batch"))
        return DeepseekV3CausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            balance_loss=balance_loss, mtp_losses=mtp_losses, mtp_accuracies=mtp_accuracies,
        )

    def _mtp_objective(
        self,
        token_embeds: torch.Tensor,
        main_hidden: torch.Tensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MTP chain of DESIGN §5 over a training sequence and its per-depth cross-entropy.

        Depth k at position i reads `Emb(t_{i+k})` (the input embeddings shifted by k) and `h^{k-1}_i`, and predicts
        `labels[i + k + 1]`, so it runs on the positions `i < s - k - 1` that have such a target; -100 is ignored.

        Normalisation: without `num_items_in_batch` each depth's term is its mean over its valid targets. With it
        (Trainer, gradient accumulation), each depth's summed token loss is divided by the same `num_items_in_batch`
        as the main loss (the batch's main-loss target count), so that summing micro-batches weights every token of
        a depth alike, exactly as for the main loss; the term is then smaller than a per-depth mean by the share of
        targets depth k lacks (k per sequence, plus padding). The reported `mtp_losses` are per-depth means.

        Args:
            token_embeds: `[b, s, H]` input embeddings; main_hidden: `[b, s, H]` `h^0` (after the final norm).
            labels: `[b, s]`; attention_mask: `[b, s]` 2-D padding mask or None; position_ids: `[b, s]` or None.

        Returns:
            `(Σ_k term_k, mean CE per depth [D], accuracy per depth [D])`.
        """
        b, s, _ = main_hidden.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=main_hidden.device).expand(b, -1)
        # the blocks' MoE layers are balanced like the main ones: token counts and balance loss of training forwards
        record_routing = self.training and torch.is_grad_enabled() and not in_backward_replay()
        hidden, total, losses, accuracies = main_hidden, 0.0, [], []
        for k, module in enumerate(self.mtp, start=1):
            n = s - k - 1  # positions i whose target t_{i+k+1} exists
            positions = position_ids[:, :n]
            # the module's queries and keys are the positions :n of the main sequence; a prepared 4-D mask
            # [b, 1, s, s] is cut to them (and carries no per-token padding for the balancing)
            padding = attention_mask is not None and attention_mask.dim() == 2
            if attention_mask is None:
                own_mask = None
            else:
                own_mask = attention_mask[:, :n] if padding else attention_mask[..., :n, :n]
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden[:, :n],
                attention_mask=own_mask,
                cache=None,
                position_ids=positions,
            )
            position_embeddings = self.model.rotary_emb(hidden, positions)
            token_mask = own_mask.bool() if padding else None
            hidden = module(token_embeds[:, k : k + n], hidden[:, :n], position_embeddings, mask,
                            token_mask=token_mask, record_routing=record_routing)  # h^k [b, n, H]
            logits = module.shared_head(hidden, self.lm_head).float()  # [b, n, vocab]
            targets = labels[:, k + 1 :].to(logits.device)
            valid = targets != -100
            count = valid.sum().clamp(min=1)
            summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            total = total + (summed / count if num_items_in_batch is None else summed / num_items_in_batch)
            losses.append(summed / count)
            accuracies.append(((logits.argmax(-1) == targets) & valid).sum() / count)
        losses, accuracies = torch.stack(losses), torch.stack(accuracies).detach()
        if self.training:
            for k, (loss, accuracy) in enumerate(zip(losses, accuracies), start=1):
                self.training_metrics.add(f"mtp_{k}_loss", loss)
                self.training_metrics.add(f"mtp_{k}_accuracy", accuracy)
        return total, losses, accuracies

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, plus self-speculative decoding with the MTP modules when `use_mtp=True` (the
        keyword, or `generation_config.use_mtp`): greedy output identical to plain greedy decoding, sampling with the
        same output distribution as plain sampling, at any batch size (left padding), for any number of modules.
        Afterwards `self.last_speculative_stats` (`SpeculativeStats`) holds the acceptance per depth and overall and
        the tokens per main-model forward. See `generation.py`.

        Example:
            >>> out = model.generate(**inputs, max_new_tokens=128, use_mtp=True)
            >>> model.last_speculative_stats.acceptance_rate, model.last_speculative_stats.tokens_per_forward

        Raises:
            ValueError: with `use_mtp=True`, if the model has no active MTP modules (`num_nextn_predict_layers = 0`
                or `use_mtp_modules = False`), with an assistant model, a streamer, a cache passed in, or
                `custom_generate`; and for what the loop does not support (see `mtp_speculative_decoding`).
        """
        use_mtp = kwargs.pop("use_mtp", None)
        if use_mtp is None:
            use_mtp = (generation_config or self.generation_config).use_mtp
        if not use_mtp:
            return super().generate(inputs, generation_config, **kwargs)
        if not self.mtp_active:
            raise ValueError(
                "use_mtp=True drafts with the MTP modules, but this model has none active (num_nextn_predict_layers="
                f"{self.config.num_nextn_predict_layers}, use_mtp_modules={self.config.use_mtp_modules})"
            )
        for name in ("assistant_model", "streamer", "custom_generate", "cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise ValueError(f"use_mtp=True runs its own decoding loop and cache; {name} is not supported with it")
        # transformers prepares inputs, processors and stopping criteria as for plain decoding, then runs our loop
        return super().generate(
            inputs, generation_config, use_mtp=False, custom_generate=mtp_speculative_decoding, **kwargs
        )

    def _pop_balance_loss(self) -> torch.Tensor | None:
        """The sequence-wise balance losses of this forward's MoE layers, summed; each is also recorded per layer."""
        total, trainable_router = None, False
        for name, module in self.named_modules():
            if isinstance(module, MoE) and module.balance_loss is not None:
                loss, module.balance_loss = module.balance_loss, None
                self.training_metrics.add(f"balance_loss/{name.removesuffix('.mlp')}", loss)
                total = loss if total is None else total + loss
                trainable_router |= module.gate.weight.requires_grad
        if total is None:
            return None
        self.training_metrics.add("balance_loss", total)
        if torch.is_grad_enabled() and trainable_router and not total.requires_grad:
            # reentrant activation checkpointing runs the first forward without autograd: the loss would get no
            # gradient and the routers would silently not be balanced
            raise ValueError(
                "the sequence-wise balance loss (seq_balance_loss_alpha="
                f"{self.config.seq_balance_loss_alpha}) got no gradient: reentrant activation checkpointing "
                "(use_reentrant=True) does not support it. Use the default use_reentrant=False, or set "
                "seq_balance_loss_alpha=0"
            )
        return total

    @staticmethod
    def _balance_loss_share(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
        """The part of the balance loss this micro-batch contributes. Under `Trainer` the main loss is a sum over
        tokens divided by the tokens of the whole accumulated (and data-parallel) batch, `num_items_in_batch`, and the
        micro-batch losses are added up; weighting each micro-batch's mean balance loss by its share of those
        tokens adds up to the token-weighted mean over the batch."""
        if num_items_in_batch is None:
            return 1.0
        return (labels[:, 1:] != -100).sum() / num_items_in_batch

    def discard_routing_counts(self) -> None:
        """Forget the tokens counted since the last bias update, e.g. after an optimizer step that fp16 loss scaling
        skipped (the weights did not move, so neither does the bias)."""
        for module in self.modules():
            if isinstance(module, TopkRouter):
                module.tokens_per_expert = None

    def update_routing_bias(self, group=None) -> dict[str, torch.Tensor]:
        """The auxiliary-loss-free balancing step (DESIGN §4): call it after every `optimizer.step()` of a custom
        training loop (`DeepseekV3Trainer` does so itself). Every MoE layer's `e_score_correction_bias` moves by
        `±routing_bias_update_speed` towards balance, from the tokens routed since the last call in training
        forwards (all gradient-accumulation micro-batches; all-reduced over `group` under `torch.distributed`, so
        every rank must call it). Records the expert load into `training_metrics`.

        Returns:
            `{layer name: load [E] int64}`, the tokens each expert received during the step.
        """
        named = [(name.removesuffix(".mlp.gate"), m) for name, m in self.named_modules() if isinstance(m, TopkRouter)]
        if not self.config.use_routing_bias:
            speed = 0.0  # the bias is not used to choose experts: keep it as loaded
        else:
            speed = self.config.routing_bias_update_speed
        loads = update_routing_biases([m for _, m in named], speed, group)
        result, worst = {}, None
        for (name, _), load in zip(named, loads):
            result[name] = load
            if load.sum() > 0:  # a layer that routed no tokens (e.g. an unused MTP block) has no load to report
                ratio = load.max() / load.float().mean()
                self.training_metrics.add(f"expert_load_max_over_mean/{name}", ratio)
                worst = ratio if worst is None else torch.maximum(worst, ratio)
        if worst is not None:
            self.training_metrics.add("expert_load_max_over_mean", worst)  # the least balanced layer
        return result

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # The default cache of generate() becomes the latent MLACache (static and user-given caches are kept).
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["cache"] = MLACache(self.config)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

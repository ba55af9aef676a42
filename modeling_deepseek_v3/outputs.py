"""What a forward returns besides its result, as transformers' `output_*` flags and `return_dict` ask, and the output
classes of the causal LM.

The conventions of transformers 5.24's own models, followed so that code written for them works unchanged:
* a flag given to the call wins over the config's (`output_hidden_states`, `output_attentions`,
  `output_router_logits`, `return_dict`);
* `hidden_states`: `num_hidden_layers + 1` tensors `[b, s, H]`: the embeddings, the input of every later layer, and
  the last hidden state after the final norm;
* `attentions`: per decoder layer, the attention probabilities `[b, h, s, t]`, with `attn_implementation="eager"`
  only: the fused implementations (sdpa, flash, ...) never form them, so with those the request is answered by a
  warning and an empty tuple, as transformers' own models answer it;
* `router_logits`: per MoE decoder layer, the router logits `[b·s, E]` in fp32 (MTP modules not included);
* `return_dict=False`: the output's `to_tuple()`, its fields in order with those that are None left out.
Dimension letters: b batch, s new tokens, t keys, h heads, H hidden, E routed experts.
References: transformers `utils/generic.py` (`can_return_tuple`), `utils/output_capturing.py` (`capture_outputs`),
`integrations/sdpa_attention.py` (its `output_attentions` warning), `modeling_outputs.py`.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput, MoeModelOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

EAGER = "eager"  # the one attention implementation that forms the probabilities


@dataclasses.dataclass
class DeepseekV3CausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus transformers' MoE `router_logits` and the training-objective terms reported
    beside the loss.

    Args:
        router_logits: with `output_router_logits`, one `[b·s, E]` fp32 tensor per MoE decoder layer.
        balance_loss: the sequence-wise balance loss summed over MoE layers (already included in `loss`).
        mtp_losses: `[D]`, the mean cross-entropy of each MTP depth k (predicting the token k + 1 ahead); `loss`
            includes `mtp_loss_weight / D` times their sum. None without labels or with the MTP modules off.
        mtp_accuracies: `[D]`, the top-1 accuracy of each MTP depth on the same targets.
        indexer_loss: DeepSeek-V3.2 in a training stage: the lightning indexer's KL loss, the mean over layers and
            queries (`loss` includes `indexer_loss_weight` times it; docs/v32.md#training).
    """

    router_logits: tuple[torch.Tensor, ...] | None = None
    balance_loss: torch.Tensor | None = None
    mtp_losses: torch.Tensor | None = None
    mtp_accuracies: torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None


def _flag(name: str, value, config) -> bool:
    """A call's flag, or the config's when the call leaves it None."""
    value = getattr(config, name, None) if value is None else value
    if value is None:
        return name == "return_dict"  # transformers' defaults: a dict, and no optional outputs
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class OutputRequest:
    """The optional outputs one call asks for, resolved from its arguments and the config."""

    hidden_states: bool
    attentions: bool
    router_logits: bool
    return_dict: bool

    @classmethod
    def resolve(
        cls,
        config,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> OutputRequest:
        """
        Raises:
            TypeError: a flag that is not a bool or None (transformers' selection of hidden states by index is not
                supported: pass True and index the tuple).
        """
        return cls(
            hidden_states=_flag("output_hidden_states", output_hidden_states, config),
            attentions=_flag("output_attentions", output_attentions, config),
            router_logits=_flag("output_router_logits", output_router_logits, config),
            return_dict=_flag("return_dict", return_dict, config),
        )

    def returned(self, output: ModelOutput) -> ModelOutput | tuple:
        """`output`, or its tuple (fields in order, None left out) when the call asked for `return_dict=False`."""
        return output if self.return_dict else output.to_tuple()


class LayerOutputs:
    """Collects, during one forward of the decoder stack, the per-layer outputs an `OutputRequest` asks for.

    Args:
        request: the call's `OutputRequest`.
        attention_implementation: the model's resolved attention implementation; only "eager" yields probabilities.
    """

    def __init__(self, request: OutputRequest, attention_implementation: str) -> None:
        self.request = request
        self.hidden_states: list[torch.Tensor] | None = [] if request.hidden_states else None
        self.attentions: list[torch.Tensor] | None = [] if request.attentions else None
        # the list the decoder layers append their [b, h, s, t] probabilities to; None when none are formed
        self.attention_sink = self.attentions if attention_implementation == EAGER else None
        if request.attentions and attention_implementation != EAGER:
            logger.warning_once(
                f"`{attention_implementation}` attention does not return the attention probabilities "
                "(output_attentions=True gives an empty tuple). Load the model with attn_implementation=\"eager\" "
                "to get them."
            )

    def add_hidden_state(self, hidden_states: torch.Tensor) -> None:
        """Record the input of a decoder layer (the embeddings first), then the final normed hidden state."""
        if self.hidden_states is not None:
            self.hidden_states.append(hidden_states)

    def model_output(
        self, last_hidden_state: torch.Tensor, cache: Cache | None, router_logits: dict[int, torch.Tensor] | None
    ) -> MoeModelOutputWithPast | tuple:
        """The base model's output (transformers' `MoeModelOutputWithPast`), or its tuple.

        Args:
            router_logits: `{layer index: [b·s, E]}` of the forward's MoE decoder layers, or None when not asked.
        """
        output = MoeModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache,
            hidden_states=None if self.hidden_states is None else tuple(self.hidden_states),
            attentions=None if self.attentions is None else tuple(self.attentions),
            router_logits=None if router_logits is None else tuple(router_logits[i] for i in sorted(router_logits)),
        )
        return self.request.returned(output)

"""Sequence and token classification on the DeepSeek-V3 decoder: transformers' generic heads over our
`DeepseekV3Model`, as transformers' built-in DeepSeek-V3 heads are built, registered with
`AutoModelForSequenceClassification` and `AutoModelForTokenClassification` for `model_type = "deepseek_v3"`.

* sequence classification: `score` (`hidden -> num_labels`, no bias) over the hidden state of each row's last token
  that is not `pad_token_id`; a batch of more than one row needs a `pad_token_id`;
* token classification: dropout, then `score` over every token.
Loading a causal-LM checkpoint into them initialises `score` (reported by transformers' load report) and leaves
`lm_head` out; every decoder weight must be there (`CheckpointMixin`). They do not move the routing biases nor add
the balance loss: the expert balancing belongs to the causal LM's training (docs/conformance.md).
References: transformers `modeling_layers.py` (`GenericForSequenceClassification`, `GenericForTokenClassification`),
`models/deepseek_v3/modeling_deepseek_v3.py` (the built-in heads).
"""

from __future__ import annotations

from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification

from .model import DeepseekV3PreTrainedModel


class DictOutputsOfTheBaseModel:
    """transformers' generic heads read the base model's output as an object, so with `config.return_dict = False`
    (which makes the base model, ours as transformers' own, return a tuple) they fail on an attribute error; refuse
    it clearly instead. `return_dict=False` given to the call works."""

    def forward(self, *args, **kwargs):
        if self.config.return_dict is False:
            raise ValueError(
                f"{type(self).__name__} does not support config.return_dict=False (transformers' generic heads read "
                "the base model's output as an object); pass return_dict=False to the call for a tuple"
            )
        return super().forward(*args, **kwargs)


class DeepseekV3ForSequenceClassification(
    DictOutputsOfTheBaseModel, GenericForSequenceClassification, DeepseekV3PreTrainedModel
):
    """`DeepseekV3Model` with a linear `score` over the last non-padding token: logits `[b, num_labels]`."""


class DeepseekV3ForTokenClassification(
    DictOutputsOfTheBaseModel, GenericForTokenClassification, DeepseekV3PreTrainedModel
):
    """`DeepseekV3Model` with dropout and a linear `score` over every token: logits `[b, s, num_labels]`."""

"""TRL's `SFTTrainer` with DeepSeek-V3's training recipe: `DeepseekV3SFTTrainer` (needs `pip install trl`).

TRL's trainers (SFT, DPO, GRPO, ...) patch a "fused LM head" into the model (TRL's `add_fused_lm_head`): their loss
runs the decoder (`model.model`) and scores its hidden states with `lm_head.weight` themselves, so the causal LM's
forward, where the MTP loss, the balance loss and the routing counts of the bias update live, never runs. The decoder
refuses such a training forward while the recipe has a term (`inputs.refuse_a_bypassed_causal_lm`).
`DeepseekV3SFTTrainer` computes the loss with the model's own forward instead, as `Trainer` does, and keeps the rest
of `SFTTrainer` (dataset preparation, chat templates, completion-only and assistant-only labels, the collator): on the
same batches it trains exactly what `DeepseekV3Trainer` trains.

References: TRL `SFTTrainer.compute_loss` and `add_fused_lm_head` (trl/trainer/sft_trainer.py, trl/trainer/utils.py).
"""

from __future__ import annotations

import os

from transformers import Trainer
from trl import SFTTrainer

from .model import DeepseekV3ForCausalLM
from .trainer import DeepseekV3TrainerMixin

MIXTRAL_AUX_LOSS = (
    "TRL's MoE switch adds Mixtral's auxiliary load-balancing loss over softmax routing, which is not DeepSeek-V3's: "
    "its experts are balanced by the routing-bias update and the sequence-wise balance loss (seq_balance_loss_alpha), "
    "which DeepseekV3SFTTrainer keeps"
)


class DeepseekV3SFTTrainer(DeepseekV3TrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that keeps DeepSeek-V3's recipe: the MTP loss, the sequence-wise balance loss, the
    routing-bias update, and `DeepseekV3Trainer`'s metrics in the logs. The loss is the model's own (`loss_type="nll"`,
    computed from the full logits like `Trainer`'s, not by TRL's fused LM head, so SFT's `entropy` and
    `mean_token_accuracy` metrics are not logged). A folder path as `model` is loaded with this package's class (TRL
    itself would load transformers' built-in class by its architecture name, without the MTP modules).

    Example:
        >>> trainer = DeepseekV3SFTTrainer(model=model, args=SFTConfig(...), train_dataset=data,
        ...                                processing_class=tokenizer)
        >>> trainer.train()

    Raises:
        ValueError: for what would change the objective: `loss_type` other than "nll", TRL's MoE switch
            (`router_aux_loss_coef`, `output_router_logits`), `packing` / `padding_free` while the MTP modules train
            (their targets would cross packed sequences).
    """

    def __init__(self, model: DeepseekV3ForCausalLM | str | os.PathLike, args=None, **kwargs) -> None:
        if isinstance(model, (str, os.PathLike)):
            init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
            if init_kwargs.get("output_router_logits"):
                raise ValueError(
                    f"model_init_kwargs={{'output_router_logits': True}} is not supported: {MIXTRAL_AUX_LOSS}"
                )
            model = DeepseekV3ForCausalLM.from_pretrained(model, **init_kwargs)
        super().__init__(model=model, args=args, **kwargs)
        config, args = self.deepseek_v3.config, self.args
        if args.loss_type != "nll":
            raise ValueError(f"loss_type={args.loss_type!r} is not supported: DeepseekV3SFTTrainer trains the model's "
                             "own objective, next-token cross-entropy ('nll') plus the MTP and balance terms")
        if self.aux_loss_enabled or config.output_router_logits:
            raise ValueError(f"router_aux_loss_coef={args.router_aux_loss_coef} / output_router_logits="
                             f"{config.output_router_logits} is not supported: {MIXTRAL_AUX_LOSS}")
        if self.deepseek_v3.mtp_active and (args.packing or args.padding_free):
            raise ValueError(f"packing={args.packing} / padding_free={args.padding_free} is not supported while the "
                             "MTP modules train: MTP depth k reads the targets k + 1 tokens ahead, which would cross "
                             "into the next packed sequence. Train without packing, or with use_mtp_modules=False")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's loss, the model's own forward with the labels, rather than SFTTrainer's fused LM head, which
        # would bypass the recipe
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

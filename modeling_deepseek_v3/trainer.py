"""DeepSeek-V3's training recipe in `transformers.Trainer`: the model's training metrics (balance losses, expert
load, MTP losses) in the regular log lines, steps that fp16 loss scaling skipped leaving the routing biases alone,
the bias update under DeepSpeed, and a resume from an incomplete checkpoint refused. (Elsewhere the bias update
runs after every optimizer step in any loop, see `balancing.py`.) `DeepseekV3TrainerMixin` carries it into other
`Trainer` subclasses (TRL's, `sft_trainer.py`).

References: DeepSeek-V3 report §2.1.2; transformers `Trainer.log`, `TrainerCallback.on_optimizer_step`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .checkpoint import check_loading_info, resume_key_problems
from .model import DeepseekV3ForCausalLM
from .parallel import data_parallel_group


def find_deepseek_v3(model: nn.Module) -> DeepseekV3ForCausalLM:
    """The `DeepseekV3ForCausalLM` inside `model` (itself, or wrapped by PEFT / DDP / accelerate).

    Raises:
        TypeError: if `model` holds none.
    """
    found = next((m for m in model.modules() if isinstance(m, DeepseekV3ForCausalLM)), None)
    if found is None:
        raise TypeError(f"expected a model containing a DeepseekV3ForCausalLM, got {type(model).__name__}")
    return found


class ExpertBalanceCallback(TrainerCallback):
    """Discards the routing counts of an optimizer step that fp16 loss scaling skipped (the weights did not move, so
    neither does the bias), moves the routing biases after each step where the trainer reports the steps itself
    (DeepSpeed, see `ExpertBalance.steps_reported_by_trainer`), and optionally keeps each step's expert load.
    `DeepseekV3Trainer` adds it itself; a plain `Trainer` needs it only for `keep_history` (the model's gradients tell
    skipped steps apart there too).

    Args:
        keep_history: keep each step's expert load in `history` (a list of `{layer: load [E]}`), e.g. for plots.
    """

    def __init__(self, keep_history: bool = False) -> None:
        self.keep_history = keep_history
        self.history: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        lm = find_deepseek_v3(model)
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            lm.discard_routing_counts()  # inf gradients: the step, and the bias update with it, did not happen
            return
        if lm.expert_balance.steps_reported_by_trainer and lm.config.routing_bias_auto_update:
            lm.update_routing_bias()
        if self.keep_history:
            self.history.append({name: load.cpu() for name, load in lm.expert_balance.last_loads.items()})


class DeepseekV3TrainerMixin:
    """DeepSeek-V3's recipe for a `Trainer` subclass (put it first among the bases): adds `ExpertBalanceCallback`
    (unless one is given), has it move the routing biases under DeepSpeed, refuses a resume from a checkpoint that
    lacks weights of the model, and merges the model's `training_metrics`
    into every training log line (see `DeepseekV3Trainer`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deepseek_v3 = find_deepseek_v3(self.model)
        if not any(isinstance(cb, ExpertBalanceCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(ExpertBalanceCallback())
        # DeepSpeed's optimizer steps flat partitions of the parameters, which the model's optimizer hook does not
        # recognise, and its engine steps inside `backward`: the callback, called after every step, moves the biases
        self.deepseek_v3.expert_balance.steps_reported_by_trainer = self.is_deepspeed_enabled

    def _issue_warnings_after_load(self, load_result) -> None:
        """Where `Trainer` only warns about the keys a resumed (or best) checkpoint lacks, refuse it: a missing expert,
        MTP module or routing bias would train on from its initial values. Keys named differently on disk (per-expert,
        MTP layers) are not reported, as transformers' comparison of a sharded checkpoint's index would.

        Raises:
            ValueError: naming the model's tensors the checkpoint lacks and the checkpoint keys that match none (the
                weights it does hold are loaded by then).
        """
        if self.model is not self.deepseek_v3:  # a PEFT or other wrapper: its own report
            super()._issue_warnings_after_load(load_result)
            return
        lacking, stray = resume_key_problems(self.model, load_result.missing_keys, load_result.unexpected_keys)
        check_loading_info(lacking, stray, [], hint=(
            "A checkpoint that lacks weights of the model cannot resume it: those weights would train on from their "
            "initial values. Resume from a complete checkpoint of this configuration."))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # merged before Trainer.log so that log_history, the integrations and the progress bar all see them;
        # averaged over the ranks that train on distinct batches, as Trainer averages the loss
        if "loss" in logs:
            group = data_parallel_group(getattr(self.deepseek_v3.config, "distributed_config", None))
            logs.update(self.deepseek_v3.training_metrics.pop(distributed=True, group=group))
        super().log(logs, start_time)


class DeepseekV3Trainer(DeepseekV3TrainerMixin, Trainer):
    """`Trainer` with DeepSeek-V3's recipe: adds `ExpertBalanceCallback` (unless one is given) and merges the model's
    `training_metrics` into every training log line, beside `loss`: `balance_loss` (and per layer
    `balance_loss/<layer>`), `expert_load_max_over_mean` (the least balanced layer; per layer
    `expert_load_max_over_mean/<layer>`), `mtp_<k>_loss` / `mtp_<k>_accuracy`, DeepSeek-V3.2's `indexer_loss` in a
    training stage (docs/v32.md#training), each the mean over the steps since
    the previous log and over the data-parallel ranks. Under DeepSpeed (ZeRO) it moves the routing biases after every
    optimizer step, which the model's own optimizer hook cannot do there.

    Example:
        >>> trainer = DeepseekV3Trainer(model=model, args=TrainingArguments(...), train_dataset=data)
        >>> trainer.train()
    """

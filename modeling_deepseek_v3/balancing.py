"""Expert balancing of DeepSeekMoE in training: token counts, the sequence-wise balance loss and the
auxiliary-loss-free routing-bias update.

Each forward gets a fresh `RoutingLog`; its MoE layers add what they routed, and the model reads the log when the
forward has ended (so a forward that raises leaves nothing behind). `ExpertBalance` sums the token counts of the
training forwards since the last optimizer step and, after the step, moves every layer's `e_score_correction_bias`:

    b_i += γ · sign(mean(load) − load_i)                      (load: tokens routed to expert i during the step)
    L_bal = α · mean over sequences of Σ_i f_i · P_i
    f_i = E/(K·T) Σ_t 1[i ∈ chosen_t],    P_i = 1/T Σ_t s_{i,t} / Σ_j s_{j,t}

Dimension letters: b batch, s tokens of a sequence, T tokens, E routed experts, K experts per token.
References: DeepSeek-V3 report §2.1.2 (auxiliary-loss-free balancing, eq. 16-20); torchtitan `MoE` (bias update in
an optimizer hook); docs/design.md (Expert balancing).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.integrations import deepspeed_config
from transformers.utils import logging

from .inputs import count_targets

logger = logging.get_logger(__name__)


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """The complementary sequence-wise balance loss `α · Σ_i f_i P_i`, averaged over sequences.

    Args:
        scores: `[b, s, E]` affinities s (fp32, differentiable); indices: `[b, s, K]` chosen experts.
        token_mask: `[b, s]` bool, False for padding (left out of T and of the sums), or None.
        alpha: the weight α.

    Returns:
        A scalar; sequences without a real token are left out of the mean. f is a constant (it comes from a top-k).
    """
    e, k = scores.shape[-1], indices.shape[-1]
    mask = scores.new_ones(scores.shape[:2]) if token_mask is None else token_mask.to(scores.dtype)  # [b, s]
    tokens = mask.sum(dim=1)  # T of each sequence, [b]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0)  # [b, s, E]
    denominator = (k * tokens).clamp(min=1)[:, None]  # a sequence of padding only has T = 0 and is dropped below
    f = e * (chosen * mask[..., None]).sum(dim=1) / denominator  # [b, E]
    p = (scores / scores.sum(dim=-1, keepdim=True) * mask[..., None]).sum(dim=1) / tokens.clamp(min=1)[:, None]
    per_sequence = (f * p).sum(dim=-1)  # [b]
    return alpha * per_sequence[tokens > 0].mean()


def count_tokens(indices: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens sent to each expert: `indices` `[T, K]` -> `[E]` int64, leaving out tokens where `token_mask` `[T]` is
    False (padding)."""
    # padding gets weight 0 rather than being filtered out: a boolean index would read the mask back to the host
    ones = torch.ones_like(indices) if token_mask is None else token_mask[:, None].expand_as(indices).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    return counts.index_add_(0, indices.flatten(), ones.flatten())


class RoutingLog:
    """What the MoE layers of one forward routed: created by the model for that forward, filled by its MoE layers
    (`add`), read by the model when the forward has ended (`close`).

    Args:
        recording: a training forward whose gradients will be applied: count tokens and compute balance losses.
        balance_alpha: α of the sequence-wise balance loss (0: none).
        keep_router_logits: keep every MoE layer's router logits `[T, E]` (`output_router_logits`).
    """

    def __init__(self, recording: bool, balance_alpha: float = 0.0, keep_router_logits: bool = False) -> None:
        self.recording = recording
        self.balance_alpha = balance_alpha
        self.keep_router_logits = keep_router_logits
        self.counts: dict[int, torch.Tensor] = {}  # layer index -> [E] tokens per expert
        self.balance_losses: dict[int, torch.Tensor] = {}  # layer index -> scalar
        self.router_logits: dict[int, torch.Tensor] = {}  # layer index -> [T, E]
        # a layer ran without autograd inside a forward that records: reentrant activation checkpointing, whose
        # balance loss cannot get a gradient
        self.computed_without_autograd = False
        self.closed = False

    def add(
        self,
        layer_idx: int,
        router_logits: torch.Tensor,
        scores: torch.Tensor,
        indices: torch.Tensor,
        token_mask: torch.Tensor | None,
        batch: tuple[int, int],
    ) -> None:
        """Record MoE layer `layer_idx`'s routing of `batch` = `(b, s)` tokens: router logits and affinities
        `[b·s, E]`, chosen experts `[b·s, K]`, `token_mask` `[b, s]` (False = padding) or None."""
        b, s = batch
        loss = None
        if self.recording and self.balance_alpha > 0:
            # Also computed when the log is closed, i.e. in an activation-checkpoint replay during backward: the replay
            # must record the same autograd graph as the original forward.
            loss = sequence_balance_loss(scores.view(b, s, -1), indices.view(b, s, -1), token_mask, self.balance_alpha)
        if self.closed:  # a replay: its tokens were counted by the forward itself
            return
        if self.recording:
            flat_mask = None if token_mask is None else token_mask.flatten()
            self.counts[layer_idx] = count_tokens(indices, scores.shape[-1], flat_mask)
            if loss is not None:
                self.balance_losses[layer_idx] = loss
                self.computed_without_autograd |= not torch.is_grad_enabled()
        if self.keep_router_logits:
            self.router_logits[layer_idx] = router_logits

    def close(self) -> None:
        """End the forward: later `add` calls (checkpoint replays) record nothing."""
        self.closed = True


def add_counts(total: dict[int, torch.Tensor], counts: dict[int, torch.Tensor]) -> None:
    """`total[layer] += counts[layer]` for every layer of `counts` (a layer new to `total` starts at its counts)."""
    for layer, layer_counts in counts.items():
        total[layer] = total[layer] + layer_counts if layer in total else layer_counts


@torch.no_grad()
def update_routing_biases(biases: list[torch.Tensor], loads: torch.Tensor, speed: float) -> None:
    """`b_i += speed · sign(mean(load) − load_i)` for every layer: `biases` fp32 `[E]` each, `loads` `[layers, E]`."""
    for bias, load in zip(biases, loads):
        load = load.to(bias.device, bias.dtype)
        bias.add_(speed * torch.sign(load.mean() - load))


class ExpertBalance:
    """The token counts of the training forwards since the last optimizer step, per MoE layer, the bias update they
    drive, and the balance metrics (into `metrics`, named by `layer_name(layer index)`).

    Counts belong to the gradients of their forward. A forward's counts wait `in_flight` until its backward reaches
    the model's output, then join `pending`. When a forward ends while no trainable parameter holds a gradient, the
    `pending` counts came from forwards whose gradients were cleared without an optimizer step (a step skipped by
    fp16 loss scaling, or abandoned), and they are dropped; counts still in flight are kept, so that several
    forwards followed by one backward (accumulation written by hand) all count.

    Args:
        metrics: a `TrainingMetrics`, receiving `balance_loss` and `expert_load_max_over_mean` (overall and per layer).
        layer_name: the name of a decoder layer in metrics and results.
    """

    def __init__(self, metrics, layer_name: Callable[[int], str]) -> None:
        self.metrics = metrics
        self.layer_name = layer_name
        self.pending: dict[int, torch.Tensor] = {}  # layer index -> [E] tokens per expert, backward done
        self.in_flight: list[dict[int, torch.Tensor]] = []  # per forward whose backward has not run yet
        self.last_loads: dict[str, torch.Tensor] = {}  # of the last update, e.g. for plots
        self.warned_about_frozen_routers = False
        # set by DeepseekV3Trainer under DeepSpeed, whose optimizer steps flat partitions instead of the model's
        # parameters (the optimizer hook never recognises it) and leaves their `.grad` empty: the trainer then reports
        # every optimizer step (`update`) and every skipped one (`discard`) itself
        self.steps_reported_by_trainer = False
        self._hook = None

    def end_forward(
        self, log: RoutingLog, gradients_pending: bool, output: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Take a recorded forward's closed `log`: add its counts to the step's, record its balance losses.

        Args:
            gradients_pending: whether a trainable parameter of the model holds a gradient.
            output: a tensor of the forward that its backward passes through (the last hidden states): the counts
                wait in flight until the backward reaches it. None (or no autograd graph): they count at once.

        Returns:
            The balance loss summed over layers, or None (α = 0).

        Raises:
            ValueError: if the balance loss cannot get a gradient (reentrant activation checkpointing).
        """
        if not gradients_pending and not self.steps_reported_by_trainer:
            self.pending.clear()
        if output is not None and output.requires_grad and log.counts:
            counts = dict(log.counts)
            self.in_flight.append(counts)
            output.register_hook(lambda grad: self._backward_reached(counts))
        else:
            add_counts(self.pending, log.counts)
        if not log.balance_losses:
            return None
        if log.computed_without_autograd:
            raise ValueError(
                f"the sequence-wise balance loss (seq_balance_loss_alpha={log.balance_alpha}) got no gradient: "
                "reentrant activation checkpointing (use_reentrant=True) does not support it. Use the default "
                "use_reentrant=False, or set seq_balance_loss_alpha=0"
            )
        for layer, loss in log.balance_losses.items():
            self.metrics.add(f"balance_loss/{self.layer_name(layer)}", loss)
        total = sum(log.balance_losses.values())
        self.metrics.add("balance_loss", total)
        return total

    @staticmethod
    def loss_share(labels: torch.Tensor | None, num_items_in_batch) -> torch.Tensor | float:
        """The weight of a micro-batch's balance loss. Under `Trainer` the main loss is a sum over tokens divided by
        the tokens of the whole accumulated (and data-parallel) batch, `num_items_in_batch`, and the micro-batch
        losses are added up; weighting each micro-batch's mean balance loss by its share of those tokens adds up to
        the token-weighted mean over the batch."""
        if num_items_in_batch is None or labels is None:
            return 1.0
        return count_targets(labels) / num_items_in_batch

    def _backward_reached(self, counts: dict[int, torch.Tensor]) -> None:
        # identity, not equality: two forwards may have routed alike; a second backward (retain_graph) adds nothing
        if any(entry is counts for entry in self.in_flight):
            self.in_flight = [entry for entry in self.in_flight if entry is not counts]
            add_counts(self.pending, counts)

    def discard(self) -> None:
        """Forget the counts since the last update (the optimizer step did not happen)."""
        self.pending.clear()
        self.in_flight.clear()

    def take_counts(self, layer: int) -> torch.Tensor | None:
        """Remove and return the tokens `layer` routed since its last update (in flight included), or None."""
        parts = [entry.pop(layer) for entry in self.in_flight if layer in entry]
        if layer in self.pending:
            parts.append(self.pending.pop(layer))
        self.in_flight = [entry for entry in self.in_flight if entry]
        return sum(parts[1:], parts[0]) if parts else None

    def update(
        self, biases: dict[int, torch.Tensor], speed: float, group=None, frozen: set[int] | frozenset = frozenset()
    ) -> dict[str, torch.Tensor]:
        """Move `biases` (`{layer index: e_score_correction_bias}`) by those layers' counts, record the load metrics
        and reset those counts (other layers' counts wait for their own update). The layers in `frozen` (their
        routers are not trained) keep their biases; a warning says so once.

        Under `torch.distributed` the counts are summed over `group` in one all-reduce, so every rank of the group
        must call this, and all end with the same biases.

        Returns:
            `{layer name: load [E] int64}`; a layer that routed nothing has zeros and keeps its bias.
        """
        layers = sorted(biases)
        if not layers:
            return {}
        device = biases[layers[0]].device  # layers may sit on several devices (device_map)
        taken = {layer: self.take_counts(layer) for layer in layers}
        loads = torch.stack([
            taken[layer].to(device) if taken[layer] is not None
            else torch.zeros(biases[layer].shape[0], dtype=torch.int64, device=device)
            for layer in layers
        ])  # [layers, E]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(loads, group=group)  # one collective for all layers
        moving = [i for i, layer in enumerate(layers) if layer not in frozen]
        if speed and moving:
            update_routing_biases([biases[layers[i]] for i in moving], loads[moving], speed)
        if speed and frozen and not self.warned_about_frozen_routers:
            self.warned_about_frozen_routers = True
            names = [self.layer_name(layer) for layer in sorted(frozen)]
            logger.warning(
                f"The routers of {names} are frozen (requires_grad=False, e.g. the base model of a LoRA run), so their "
                "routing biases are not updated: the frozen base model and what was trained reproduce the trained "
                "model. Train the routers to have their biases balanced."
            )
        self.last_loads = {self.layer_name(layer): load for layer, load in zip(layers, loads)}
        self._record_loads()
        return dict(self.last_loads)

    def _record_loads(self) -> None:
        worst = None
        for name, load in self.last_loads.items():
            if load.sum() > 0:  # a layer that routed no tokens (e.g. an unused MTP block) has no load to report
                ratio = load.max() / load.float().mean()
                self.metrics.add(f"expert_load_max_over_mean/{name}", ratio)
                worst = ratio if worst is None else torch.maximum(worst, ratio)
        if worst is not None:
            self.metrics.add("expert_load_max_over_mean", worst)  # the least balanced layer

    def follow_optimizer_steps(self, model) -> None:
        """Call `model.update_routing_bias(optimizer=...)` after every `step()` of any torch optimizer that holds one
        of the model's parameters (plain Trainer, accelerate, a hand-written loop): the layers whose router that
        optimizer holds move their biases. Idempotent; the hook goes with the model.

        Raises:
            ValueError: under DeepSpeed set up by transformers or accelerate, unless a trainer reports the steps
                (`DeepseekV3Trainer`): DeepSpeed's optimizer steps flat partitions, which the hook cannot recognise,
                so the biases would never move.
        """
        config = model.config
        moving = config.routing_bias_auto_update and config.use_routing_bias and config.routing_bias_update_speed
        if moving and not self.steps_reported_by_trainer and deepspeed_config() is not None:
            raise ValueError(
                "the routing-bias update (routing_bias_auto_update=True) cannot follow DeepSpeed's optimizer steps by "
                "itself: DeepSpeed's optimizer holds flat partitions instead of the model's parameters, so the biases "
                "would never move. Train with DeepseekV3Trainer (or a Trainer subclass with DeepseekV3TrainerMixin, "
                "e.g. DeepseekV3SFTTrainer), which moves them after every step; or set routing_bias_auto_update=False "
                "and call model.update_routing_bias() after every engine step yourself"
            )
        if self._hook is not None:
            return
        model_ref = weakref.ref(model)

        def after_step(optimizer, args, kwargs) -> None:
            model = model_ref()
            if model is None or not model.config.routing_bias_auto_update or self.steps_reported_by_trainer:
                return
            owned = {id(p) for p in model.parameters()}
            if any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
                model.update_routing_bias(optimizer=optimizer)

        self._hook = register_optimizer_step_post_hook(after_step)
        weakref.finalize(model, self._hook.remove)

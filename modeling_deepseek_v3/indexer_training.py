"""Training DeepSeek-V3.2's lightning indexer: its KL loss against the main attention, in the report's two stages.

For each query token t, the target p_t is the main attention's probabilities summed over the heads and L1-normalised
over the keys (detached: a target, not a path for gradients), and the indexer's distribution is the softmax of its
index scores over the same keys; the loss of a layer is the mean over the queries of KL(p_t ‖ softmax(I_t)).
* "dense_warmup": the main attention runs densely over every causal key and the indexer's softmax spans them all;
  everything but the indexer runs without gradient (`IndexerObjective.main_model_scope`), so only the indexer trains.
* "sparse": the main attention runs over the indexer's top-k choice and trains by the language-model loss; the
  indexer's KL is taken over the chosen keys only: the target is the main attention's own distribution, which
  spans them only (each head's softmax over them), and the indexer's softmax is over them too.
In both, the indexer reads a detached copy of its inputs (`sparse_attention`), so it learns from its KL loss alone
and its loss moves nothing else.
Dimension letters: b batch, s queries, h MLA heads, k keys attended to.
References: DeepSeek-V3.2 report (continued pre-training: the dense warm-up stage, the sparse training stage);
docs/v32.md#training.
"""

from __future__ import annotations

import contextlib

import torch

from .configuration import DeepseekV3Config
from .configuration.configuration_deepseek_v3 import INDEXER_TRAINING_STAGES


class IndexerObjective:
    """The indexer's KL loss of one training forward, gathered from every layer's sparse attention (the MTP modules'
    included). Created by `DeepseekV3ForCausalLM.forward` and passed down to the layers as `indexer_objective`."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._layer_losses: list[torch.Tensor] = []

    @classmethod
    def for_forward(cls, config: DeepseekV3Config, training: bool) -> IndexerObjective | None:
        """The objective of a training forward (train mode, gradients on) of a model with a stage set; else None.

        Raises:
            ValueError: for a stage that is not one of `INDEXER_TRAINING_STAGES` (set on the config after it was
                built, which validates only at construction).
        """
        stage = getattr(config, "indexer_training_stage", None)
        if stage is None or not (training and torch.is_grad_enabled()):
            return None
        if stage not in INDEXER_TRAINING_STAGES:
            raise ValueError(f"indexer_training_stage = {stage!r} is invalid: must be one of {INDEXER_TRAINING_STAGES} "
                             "(docs/v32.md#training)")
        return cls(stage)

    @property
    def dense(self) -> bool:
        """Whether the main attention attends to every causal key (the warm-up) rather than the indexer's choice."""
        return self.stage == "dense_warmup"

    def main_model_scope(self) -> contextlib.AbstractContextManager:
        """Around the model's forward: without gradient in the warm-up (only the indexer trains, `indexer_scope`)."""
        return torch.no_grad() if self.dense else contextlib.nullcontext()

    @staticmethod
    def indexer_scope() -> contextlib.AbstractContextManager:
        """Around the indexer's own computation: with gradient, also inside the warm-up's `main_model_scope`."""
        return torch.enable_grad()

    def add_layer(self, kl_sum: torch.Tensor, queries: torch.Tensor) -> None:
        """Record one layer's KL, summed over its `queries` (the count of queries with a key to attend to)."""
        with self.indexer_scope():
            self._layer_losses.append(kl_sum / queries.clamp(min=1))

    def loss(self) -> torch.Tensor | None:
        """The mean over the layers of each layer's mean KL per query; None if no layer ran."""
        return torch.stack(self._layer_losses).mean() if self._layer_losses else None


def indexer_kl(
    probs: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p ‖ softmax(index_scores)) of each query over the keys it attends to.

    Args:
        probs: `[b, s, h, k]` the main attention's probabilities over those keys (any float dtype).
        index_scores: `[b, s, k]` the indexer's scores of the same keys (fp32).
        valid: `[b, s, k]` bool, False where a slot holds no key (masked, or fewer keys than k).

    Returns:
        `(the KL summed over the queries that attend to at least one key, the count of those queries)`.
    """
    target = probs.detach().float().sum(dim=2).masked_fill(~valid, 0.0)
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    # finfo.min, not -inf: a query without keys must not put NaN into the backward of log_softmax
    log_q = index_scores.float().masked_fill(~valid, torch.finfo(torch.float32).min).log_softmax(dim=-1)
    kl = (torch.xlogy(target, target) - target * log_q.masked_fill(~valid, 0.0)).sum(dim=-1)  # [b, s]
    attending = valid.any(dim=-1)
    return kl[attending].sum(), attending.sum()

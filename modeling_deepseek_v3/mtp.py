"""Multi-Token Prediction (MTP) of DeepSeek-V3: the modules, the chain that both the training objective and
self-speculative drafting run, and where module k lives. Module k (1..D) at position i:

    h'_i  = eh_proj( cat[ enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ] )      # embedding first (checkpoint order)
    h^k_i = TransformerBlock_k(h'_i)                                      # own MLA + MoE block, same positions i
    P^k   = head( shared_head.norm(h^k) )                                 # predicts t_{i+k+1}

h^0 is the main model's last hidden state after its final norm. The embedding and the output `head` are the main
model's (shared parameters); a module owns its norms, `eh_proj` and its block. Module k is stored (and has its cache
slot) as decoder layer `num_hidden_layers + k - 1` (`mtp_layer_index`).
Training objective: `L = L_main + λ/D · Σ_k CE(P^k, t_{i+k+1})` (`mtp_objective`).
Dimension letters: b batch, s positions, H hidden, V vocabulary, D modules.
References: DeepSeek-V3 report §2.2 (Multi-Token Prediction, Figure 3, eq. 21-25); docs/mtp.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from .configuration import DeepseekV3Config
from .inputs import IGNORE_INDEX
from .layers import RMSNorm


def mtp_layer_index(num_hidden_layers: int, k: int) -> int:
    """The decoder-layer index of MTP module k (1-based): its key prefix on disk and its slot in a cache."""
    return num_hidden_layers + k - 1


class SharedHead(nn.Module):
    """`shared_head` of an MTP module: its own final `norm`; the projection to the vocabulary is the main model's
    `lm_head` (checkpoints also store a copy as `shared_head.head`)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """`[b, s, H]` -> logits `[b, s, vocab]` through the shared `head`."""
        return head(self.norm(hidden_states))


class MTPLayer(nn.Module):
    """One MTP module: `enorm`, `hnorm`, `eh_proj` `[H, 2H]`, its transformer `block` and `shared_head.norm`.

    Args:
        config: the model configuration.
        block: the module's own decoder layer (MLA + MoE), built by the caller with the layer index
            `mtp_layer_index(num_hidden_layers, k)`, so that it owns a cache slot of its own.
    """

    def __init__(self, config: DeepseekV3Config, block: nn.Module) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        # bf16 in the official FP8 release too: never an FP8 linear
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.shared_head = SharedHead(config)

    def forward(
        self,
        token_embeds: torch.Tensor,
        previous_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            token_embeds: `[b, s, H]`, `Emb(t_{i+k})` for the positions i.
            previous_hidden: `[b, s, H]`, `h^{k-1}_i` (the main model's normed last hidden state for k = 1).
            position_embeddings: `(cos, sin)` of the positions i, each `[b, s, r/2]`.
            attention_mask: as for a decoder layer: `[b, 1, s, t]` boolean (True = attend) or additive, or None.
            cache: a latent cache with a slot at the block's layer index; updated in place.
            kwargs: passed on to the block (padding `token_mask`, the forward's `routing_log`, attention options).

        Returns:
            `h^k` `[b, s, H]`; `shared_head(h^k, lm_head)` gives the logits predicting `t_{i+k+1}`.
        """
        h = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(previous_hidden)], dim=-1))
        return self.block(h, position_embeddings, attention_mask, cache=cache, **kwargs)


def mtp_step(
    lm: nn.Module,
    k: int,
    token_embeds: torch.Tensor,
    previous_hidden: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Module k of the chain over positions i: the one implementation both training and drafting run.

    Args:
        lm: the causal LM holding the modules in `lm.mtp` (its embedding, rotary table and head are shared).
        k: the module, 1..D.
        token_embeds: `[b, s, H]`, `Emb(t_{i+k})`; previous_hidden: `[b, s, H]`, `h^{k-1}_i`.
        position_ids: `[b, s]`, the positions i; attention_mask: the 4-D mask of the block (see `MTPLayer`).
        cache: a latent cache with a slot at `mtp_layer_index(L, k)`, updated in place; or None.
        logits_to_keep: logits for the last n positions only (0 = all), or for the given position indices.
        kwargs: passed on to the block.

    Returns:
        `(h^k [b, s, H], logits [b, s', V])`, the logits predicting `t_{i+k+1}`.
    """
    module = lm.mtp[k - 1]
    position_embeddings = lm.get_decoder().rotary_emb(previous_hidden, position_ids)
    hidden = module(token_embeds, previous_hidden, position_embeddings, attention_mask, cache=cache, **kwargs)
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = module.shared_head(hidden[:, keep], lm.get_output_embeddings())
    return hidden, logits


class MTPLoss(NamedTuple):
    """The MTP terms of the training objective."""

    total: torch.Tensor  # Σ_k term_k, to be weighted by λ/D
    losses: torch.Tensor  # [D] mean cross-entropy of each depth
    accuracies: torch.Tensor  # [D] top-1 accuracy of each depth


def mtp_objective(
    lm: nn.Module,
    token_embeds: torch.Tensor,
    main_hidden: torch.Tensor,
    labels: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    num_items_in_batch: torch.Tensor | int | None = None,
    routing_log=None,
    **block_kwargs,
) -> MTPLoss:
    """The MTP chain over a training sequence and the cross-entropy of each depth.

    Depth k at position i reads `Emb(t_{i+k})` (the input embeddings shifted by k) and `h^{k-1}_i`, and predicts
    `labels[i + k + 1]`, so it runs on the positions `i < s - k - 1` that have such a target; -100 is ignored.

    Normalisation: without `num_items_in_batch` each depth's term is its mean over its valid targets. With it
    (Trainer, gradient accumulation), each depth's summed token loss is divided by the same `num_items_in_batch`
    as the main loss, so that summing micro-batches weights every token of a depth alike, exactly as for the main
    loss; the term is then smaller than a per-depth mean by the share of targets depth k lacks (k per sequence, plus
    padding). The reported per-depth losses are means.

    Args:
        lm: the causal LM (`mtp_step`).
        token_embeds: `[b, s, H]` input embeddings; main_hidden: `[b, s, H]` `h^0` (after the final norm).
        labels: `[b, s]`; attention_mask: `[b, s]` 2-D padding mask, a prepared `[b, 1, s, s]` mask, or None;
        position_ids: `[b, s]` or None.
        routing_log: the forward's `RoutingLog`, to which the modules' MoE layers add their routing.
        block_kwargs: passed on to the modules' blocks (DeepSeek-V3.2's `indexer_objective`).
    """
    b, s, _ = main_hidden.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=main_hidden.device).expand(b, -1)
    padding = attention_mask is not None and attention_mask.dim() == 2
    hidden, total, losses, accuracies = main_hidden, 0.0, [], []
    for k in range(1, len(lm.mtp) + 1):
        n = s - k - 1  # positions i whose target t_{i+k+1} exists
        # the module's queries and keys are the positions :n of the main sequence; a prepared 4-D mask [b, 1, s, s] is
        # cut to them (and carries no per-token padding for the balancing)
        own_mask = None
        if attention_mask is not None:
            own_mask = attention_mask[:, :n] if padding else attention_mask[..., :n, :n]
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=hidden[:, :n], attention_mask=own_mask, cache=None,
            position_ids=position_ids[:, :n],
        )
        hidden, logits = mtp_step(
            lm, k, token_embeds[:, k : k + n], hidden[:, :n], position_ids[:, :n], mask,
            token_mask=own_mask.bool() if padding else None, routing_log=routing_log, **block_kwargs,
        )
        logits = logits.float()  # [b, n, V]
        targets = labels[:, k + 1 :].to(logits.device)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total = total + (summed / count if num_items_in_batch is None else summed / num_items_in_batch)
        losses.append(summed / count)
        accuracies.append(((logits.argmax(-1) == targets) & valid).sum() / count)
    return MTPLoss(total, torch.stack(losses), torch.stack(accuracies).detach())

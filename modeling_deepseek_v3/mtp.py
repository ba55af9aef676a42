"""Multi-Token Prediction (MTP) module of DeepSeek-V3. Module k (1..D) at position i:

    h'_i  = eh_proj( cat[ enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ] )      # embedding first (checkpoint order)
    h^k_i = TransformerBlock_k(h'_i)                                      # own MLA + MoE block, same positions i
    P^k   = head( shared_head.norm(h^k) )                                 # predicts t_{i+k+1}

h^0 is the main model's last hidden state after its final norm. The embedding and the output `head` are the main
model's (shared parameters); a module owns its norms, `eh_proj` and its block. On disk module k is
`model.layers.{num_hidden_layers + k - 1}.*` (see `checkpoint.py`).
Dimension letters: b batch, s positions, H hidden.
References: DeepSeek-V3 report §2.2 (Multi-Token Prediction, Figure 3); DESIGN.md §5, §8.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .configuration import DeepseekV3Config
from .layers import RMSNorm


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
        block: the module's own decoder layer (MLA + MoE), built by the caller with a layer index
            `>= num_hidden_layers` so that it owns a cache slot of its own.
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
            kwargs: passed on to the block (e.g. attention-interface options).

        Returns:
            `h^k` `[b, s, H]`; `shared_head(h^k, lm_head)` gives the logits predicting `t_{i+k+1}`.
        """
        h = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(previous_hidden)], dim=-1))
        return self.block(h, position_embeddings, attention_mask, cache=cache, **kwargs)

"""The bytes one MoE layer's expert-parallel dispatch puts on the network per token, and how node-limited routing
bounds them.

Expert parallelism gives each rank `n_routed_experts / ep_size` consecutive experts, so a destination (a GPU, or a
node of several) holds a consecutive range of expert ids, and the routing groups (`n_group` consecutive ranges) line
up with destinations when the counts divide. DeepSeek-V3 chooses each token's K = 8 experts within `topk_group` = 4
of its 8 groups ("node-limited routing", report §2.1.2): with a group per node, a token reaches at most 4 nodes.
That bounds the traffic only if the dispatch sends a token once per destination that holds any of its experts (as
DeepSeek's own dispatch does), not once per chosen expert (as an all-to-all of (token, expert) pairs does,
transformers' `AllToAllEP`): this module counts both. The combine step returns as many rows.
Dimension letters: T tokens, K experts per token.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class DispatchTraffic:
    """Mean bytes per token and MoE layer that a dispatch sends to other destinations.

    Args:
        per_expert: one copy of the token for each chosen expert held elsewhere.
        per_destination: one copy for each other destination holding any of its chosen experts.
        max_destinations: the most destinations (other than its own) any token was sent to.
    """

    per_expert: float
    per_destination: float
    max_destinations: int


def dispatch_traffic(
    indices: torch.Tensor, experts_per_destination: int, source: torch.Tensor, token_bytes: float
) -> DispatchTraffic:
    """The traffic of dispatching tokens routed to `indices`.

    Args:
        indices: `[T, K]` global expert ids of each token's chosen experts.
        experts_per_destination: experts each destination holds (consecutive ids): `n_routed_experts / ep_size`
            for GPUs, times the GPUs per node for nodes.
        source: `[T]` the destination each token starts on (sending to itself costs no network traffic).
        token_bytes: bytes of one token's hidden state as sent (hidden_size × bytes per element, plus scales).

    Raises:
        ValueError: if `indices` is not 2-D or `source` does not give one destination per token.
    """
    if indices.dim() != 2 or source.shape != indices.shape[:1]:
        raise ValueError(f"dispatch_traffic: expected indices [T, K] and source [T], got {tuple(indices.shape)} and "
                         f"{tuple(source.shape)}")
    destinations = indices // experts_per_destination  # [T, K]
    remote = destinations != source[:, None]
    # distinct remote destinations per token: after sorting, count where the value changes
    ordered = destinations.masked_fill(~remote, -1).sort(dim=-1).values
    distinct = (ordered[:, :1] >= 0).sum(-1) + ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(-1)
    return DispatchTraffic(
        per_expert=remote.sum(-1).float().mean().item() * token_bytes,
        per_destination=distinct.float().mean().item() * token_bytes,
        max_destinations=int(distinct.max()),
    )

"""DeepSeekMoE: a sigmoid router with group-limited top-k and a choice-only bias, stacked routed experts computed by
a grouped GEMM over tokens sorted by expert, and shared experts.

Dimension letters: T tokens, H hidden, I moe_intermediate_size, E routed experts, K experts per token, G groups.
What a layer routed goes into the forward's `RoutingLog` (see `balancing.py`), which drives the expert balancing in
training and the `router_logits` output.

References: DeepSeek-V3 report §2.1.2 (routing, eq. 12-16); DeepSeek-V3 `inference/model.py` (`Gate`, `MoE`);
docs/design.md (DeepSeekMoE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DeepseekV3Config
from .dtypes import KeepsTensorDtypes
from .fp8 import FP8Training, expert_projection, expert_swiglu, fp8_format
from .layers import MLP

if TYPE_CHECKING:
    from .balancing import RoutingLog


class Routing(NamedTuple):
    """A router's decision for `[T]` tokens."""

    weights: torch.Tensor  # [T, K] fp32 combine weights
    indices: torch.Tensor  # [T, K] int64 chosen experts
    scores: torch.Tensor  # [T, E] fp32 affinities s
    logits: torch.Tensor  # [T, E] fp32 router logits (before the sigmoid / softmax)


class TopkRouter(KeepsTensorDtypes):
    """The `gate` of a MoE layer: `weight` `[E, H]` and the fp32 `e_score_correction_bias` `[E]`.

    Computed in fp32. The bias is added only to choose experts; the combine weights come from the unbiased scores.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(config.n_routed_experts, dtype=torch.float32))
        # The routing settings describe the checkpoint's architecture: read once here, as plain attributes, since a
        # config attribute read costs more than a tensor view and a decode step routes once per MoE layer.
        self.scoring_func = config.scoring_func
        self.use_routing_bias = config.use_routing_bias
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.experts_per_group = config.n_routed_experts // config.n_group
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        return ("e_score_correction_bias",)  # moves in steps of γ = 0.001: bf16 would round them away

    def forward(self, x: torch.Tensor) -> Routing:
        """`x` `[T, H]` -> the `Routing` of its tokens."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.use_routing_bias else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.experts_per_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            kept = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.num_experts_per_tok, dim=-1).indices  # [T, K]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * self.routed_scaling_factor, indices, scores, logits)


class RoutedExperts(KeepsTensorDtypes):
    """E SwiGLU experts stored stacked: `gate_proj`, `up_proj` `[E, I, H]`, `down_proj` `[E, H, I]`.

    Gate and up stay separate tensors so that 128×128 FP8 blocks never straddle them. On disk they are the official
    per-expert keys `experts.{e}.{gate,up,down}_proj.weight` (see `checkpoint.py`). In an FP8 model the stacked
    weights are e4m3 with stacked block scales `{gate,up,down}_proj_scale_inv` `[E, ceil(rows/B), ceil(cols/B)]`
    (on disk `experts.{e}.{name}.weight_scale_inv`). How the projections multiply is decided by
    `fp8.expert_projection`.

    Args:
        config: the model configuration (sizes, FP8 format).
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_routed_experts = e
        self.num_experts = e  # this module's experts: fewer under expert parallelism, which sets it
        self.fp8 = fp8_format(config)
        self.fp8_training: FP8Training | None = None  # train_in_fp8()
        for name, (rows, cols) in zip(self.PROJECTIONS, ((i, h), (i, h), (h, i))):
            if self.fp8 is None:
                self.register_parameter(name, nn.Parameter(torch.empty(e, rows, cols)))
                continue
            bn, bk = self.fp8.block_size
            q = torch.empty(e, rows, cols, dtype=torch.float8_e4m3fn)
            s = torch.empty(e, -(-rows // bn), -(-cols // bk), dtype=torch.float32)
            self.register_parameter(name, nn.Parameter(q, requires_grad=False))
            self.register_parameter(f"{name}_scale_inv", nn.Parameter(s, requires_grad=False))

    def train_in_fp8(self, recipe: FP8Training | None = None) -> None:
        """Run the projections of bf16/fp32 master weights through the FP8 training recipe from now on, its tiles
        scaled as `recipe` says (see `training.enable_fp8_training`). The module stays itself: what expert
        parallelism set on it (its forward, its expert count) is kept."""
        if self.fp8 is not None:
            raise ValueError("train_in_fp8 needs bf16/fp32 master weights; these experts store FP8 weights")
        self.fp8_training = FP8Training() if recipe is None else recipe

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        if self.fp8 is None:
            return ()
        return self.PROJECTIONS + tuple(f"{name}_scale_inv" for name in self.PROJECTIONS)

    def stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projection `name`'s stacked weight and its FP8 block scales (None for master weights)."""
        if self.fp8 is None:  # no scales registered (a missed module attribute lookup costs a raised exception)
            return getattr(self, name), None
        return getattr(self, name), getattr(self, f"{name}_scale_inv")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: `[T, H]`; indices: `[T, K]` expert ids (`num_experts` for a route to another rank's expert, which
                is skipped); weights: `[T, K]` combine weights.

        Returns:
            `[T, H]`: `Σ_k weights[:, k] · expert_{indices[:, k]}(x)`, over the routes to this module's experts.
        """
        k = indices.shape[1]
        flat = indices.flatten()  # [T·K]
        order = flat.argsort(stable=True)
        token = order // k  # the token of each sorted (token, slot) pair
        # Expert parallelism (transformers' all-reduce dispatch) leaves this module num_experts of the
        # n_routed_experts and gives the routes to other ranks' experts the id num_experts: sorted last and left out
        # of the counts, they are never computed, and their rows (which the grouped GEMMs leave unwritten, forward and
        # backward) are zeroed. A module holding every expert has no such routes and skips the masking.
        split = self.num_experts < self.n_routed_experts
        off_rank = (flat[order] >= self.num_experts)[:, None] if split else None  # [T·K, 1]

        def zero_off_rank(rows: torch.Tensor) -> torch.Tensor:
            return rows if off_rank is None else rows.masked_fill(off_rank, 0)

        # tokens per expert by index_add, not bincount, which reads the ids back to the host on GPU
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int32, device=flat.device)
        counts = counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))[: self.num_experts]
        offsets = counts.cumsum(0, dtype=torch.int32)
        xs = zero_off_rank(x[token])  # [T·K, H], grouped by expert
        mode = (self.fp8, self.fp8_training)
        hidden = expert_swiglu(xs, self.stored("gate_proj"), self.stored("up_proj"), offsets, *mode)  # [T·K, I]
        ys = expert_projection(zero_off_rank(hidden), *self.stored("down_proj"), offsets, *mode)  # [T·K, H]
        ys = zero_off_rank(ys * weights.flatten()[order, None].to(ys.dtype))
        return torch.zeros_like(x).index_add_(0, token, ys)


class MoE(nn.Module):
    """`y = Σ_k w_k · expert_k(x) + shared_experts(x)` for every token.

    Args:
        config: the model configuration.
        layer_idx: the decoder layer this MoE belongs to (its key in a `RoutingLog`).
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(config)
        shared_width = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared_width, fp8_format(config)) if shared_width > 0 else None

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, routing_log: RoutingLog | None = None
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[b, s, H]`.
            token_mask: `[b, s]` bool, False for padding (left out of the token counts and the balance loss), or None.
            routing_log: the forward's `RoutingLog`, which receives this layer's routing; or None.

        Returns:
            `[b, s, H]`.
        """
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        routing = self.gate(x)
        if routing_log is not None:
            routing_log.add(self.layer_idx, routing.logits, routing.scores, routing.indices, token_mask, shape[:2])
        y = self.experts(x, routing.indices, routing.weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

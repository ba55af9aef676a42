"""DeepSeekMoE: sigmoid router with group-limited top-k and a choice-only bias, stacked routed experts computed by
a grouped GEMM over tokens sorted by expert, and shared experts.

Dimension letters: T tokens, H hidden, I moe_intermediate_size, E routed experts, K experts per token, G groups.
Training-time balancing (DESIGN §4): the router counts the tokens it sends to each expert (`tokens_per_expert`), from
which the bias moves by ±γ after each optimizer step (`update_routing_biases`); the MoE layer computes the
complementary sequence-wise balance loss (`sequence_balance_loss`).

References: DeepSeek-V3 report §2.1.2 (routing, auxiliary-loss-free bias, sequence-wise balance loss, eq. 17-20);
DeepSeek-V3 `inference/model.py` (`Gate`, `MoE`); DESIGN.md §4.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration import DeepseekV3Config
from .dtypes import KeepsTensorDtypes
from .fp8 import fp8_block_size, fp8_grouped_mm
from .kernels import FP8_BLOCK, act_quant, fp8_grouped_gemm, grouped_mm, grouped_swiglu, weight_dequant_ref
from .layers import MLP
from .metrics import in_backward_replay


class TopkRouter(KeepsTensorDtypes):
    """The `gate` of a MoE layer: `weight` `[E, H]` and the fp32 `e_score_correction_bias` `[E]`.

    Computed in fp32. The bias is added only to choose experts; the combine weights come from the unbiased scores.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(config.n_routed_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update. A plain attribute, not a buffer: DDP broadcasts
        # rank 0's buffers before every forward, which would overwrite the other ranks' counts.
        self.tokens_per_expert: torch.Tensor | None = None

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        return ("e_score_correction_bias",)  # moves in steps of γ = 0.001: bf16 would round them away

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            x: `[T, H]`.

        Returns:
            `(weights [T, K] fp32, indices [T, K] int64, scores [T, E] fp32)`; scores are the affinities s.
        """
        cfg = self.config
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if cfg.use_routing_bias else scores
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            kept = group_scores.topk(cfg.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices, scores

    def count_tokens(self, indices: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add the expert choices `indices` `[T, K]` of a training forward to `tokens_per_expert`, leaving out the
        tokens where `token_mask` `[T]` is False (padding)."""
        flat = indices.flatten()
        # padding is given weight 0 rather than filtered out: a boolean index would read the mask back to the host
        ones = torch.ones_like(indices) if token_mask is None else token_mask[:, None].expand_as(indices).long()
        counts = torch.zeros(self.config.n_routed_experts, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, flat, ones.flatten())
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """The complementary sequence-wise balance loss, averaged over sequences (DESIGN §4):
    `α Σ_i f_i P_i`, `f_i = E/(K·T) Σ_t 1[i ∈ chosen_t]` (a constant), `P_i = 1/T Σ_t s_{i,t} / Σ_j s_{j,t}`.

    Args:
        scores: `[b, s, E]` affinities s (fp32, differentiable); indices: `[b, s, K]` chosen experts.
        token_mask: `[b, s]` bool, False for padding (excluded from T and the sums), or None.
        alpha: the weight α.

    Returns:
        A scalar; sequences without a real token are left out of the mean.
    """
    e, k = scores.shape[-1], indices.shape[-1]
    mask = scores.new_ones(scores.shape[:2]) if token_mask is None else token_mask.to(scores.dtype)  # [b, s]
    tokens = mask.sum(dim=1)  # T of each sequence, [b]
    chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0)  # [b, s, E]
    denominator = (k * tokens).clamp(min=1)[:, None]  # a sequence of padding only has T = 0 and is dropped below
    f = e * (chosen * mask[..., None]).sum(dim=1) / denominator  # [b, E], no gradient: indices come from a top-k
    p = (scores / scores.sum(dim=-1, keepdim=True) * mask[..., None]).sum(dim=1) / tokens.clamp(min=1)[:, None]
    per_sequence = (f * p).sum(dim=-1)  # [b]
    return alpha * per_sequence[tokens > 0].mean()


@torch.no_grad()
def update_routing_biases(routers: list[TopkRouter], speed: float, group=None) -> list[torch.Tensor]:
    """The auxiliary-loss-free update of every router after an optimizer step: with `load` the tokens routed to each
    expert since the last update, summed over data-parallel ranks, `b_i += speed · sign(mean(load) − load_i)`.
    Resets the counts. Under `torch.distributed`, every rank of `group` must call it (one all-reduce).

    Returns:
        The loads `[E]` (int64) of the routers, in order; a router that counted no tokens has zeros and keeps its
        bias.
    """
    if not routers:
        return []
    device = routers[0].e_score_correction_bias.device  # layers may sit on several devices (device_map)
    loads = torch.stack([
        torch.zeros(r.config.n_routed_experts, dtype=torch.int64, device=device) if r.tokens_per_expert is None
        else r.tokens_per_expert.to(device)
        for r in routers
    ])  # [layers, E]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)  # one collective for all layers; every rank then holds the same bias
    for router, load in zip(routers, loads):
        router.tokens_per_expert = None
        if speed:
            bias = router.e_score_correction_bias
            load = load.to(bias.device, bias.dtype)
            bias.add_(speed * torch.sign(load.mean() - load))
    return list(loads)


class RoutedExperts(KeepsTensorDtypes):
    """E SwiGLU experts stored stacked: `gate_proj`, `up_proj` `[E, I, H]`, `down_proj` `[E, H, I]`.

    Gate and up stay separate tensors so that 128×128 FP8 blocks never straddle them. On disk they are the official
    per-expert keys `experts.{e}.{gate,up,down}_proj.weight` (see `checkpoint.py`). In an FP8 model the stacked
    weights are e4m3 with stacked block scales `{gate,up,down}_proj_scale_inv` `[E, ceil(rows/B), ceil(cols/B)]`
    (on disk `experts.{e}.{name}.weight_scale_inv`): on CUDA the FP8 grouped GEMM reads them as they are, elsewhere
    the experts that received tokens are dequantised for the grouped GEMM.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.fp8_block_size = fp8_block_size(config)
        self.fp8_scale_fmt = (config.fp8_quantization_config or {}).get("scale_fmt")  # of activations, on CUDA
        self.fp8_training = False  # set by `training.enable_fp8_training`
        for name, (rows, cols) in zip(self.PROJECTIONS, ((i, h), (i, h), (h, i))):
            if self.fp8_block_size is None:
                self.register_parameter(name, nn.Parameter(torch.empty(e, rows, cols)))
                continue
            bn, bk = self.fp8_block_size
            q = torch.empty(e, rows, cols, dtype=torch.float8_e4m3fn)
            s = torch.empty(e, -(-rows // bn), -(-cols // bk), dtype=torch.float32)
            self.register_parameter(name, nn.Parameter(q, requires_grad=False))
            self.register_parameter(f"{name}_scale_inv", nn.Parameter(s, requires_grad=False))

    def dtype_kept_tensors(self) -> tuple[str, ...]:
        if self.fp8_block_size is None:
            return ()
        return self.PROJECTIONS + tuple(f"{name}_scale_inv" for name in self.PROJECTIONS)

    def _project(self, name: str, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Each expert's rows through its `name` projection, one grouped GEMM for all experts."""
        weight = getattr(self, name)
        if self.fp8_training:
            return fp8_grouped_mm(rows, weight, offsets)
        if self.fp8_block_size is None:
            return grouped_mm(rows, weight.transpose(1, 2), offsets)
        scales = getattr(self, f"{name}_scale_inv")
        if rows.is_cuda and self.fp8_block_size == (FP8_BLOCK, FP8_BLOCK):
            # the FP8 grouped GEMM reads the e4m3 weights as they are, activations quantised in 1×128 tiles
            q, s = act_quant(rows, self.fp8_scale_fmt)
            return fp8_grouped_gemm(q, s, weight, scales, offsets, out_dtype=rows.dtype)
        # FP8 weights: dequantise only the experts that received tokens (a decode step uses K of E). Finding them
        # reads the counts back to the host, far cheaper than dequantising every expert of the layer.
        active = torch.diff(offsets, prepend=offsets.new_zeros(1)).nonzero().squeeze(1)
        dense = weight_dequant_ref(weight[active], scales[active], rows.dtype, block=self.fp8_block_size)
        return grouped_mm(rows, dense.transpose(1, 2), offsets[active])  # the idle experts own no rows

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: `[T, H]`; indices: `[T, K]` expert ids; weights: `[T, K]` combine weights.

        Returns:
            `[T, H]`: `Σ_k weights[:, k] · expert_{indices[:, k]}(x)`.
        """
        k = indices.shape[1]
        flat = indices.flatten()  # [T·K]
        order = flat.argsort(stable=True)
        token = order // k  # the token of each sorted (token, slot) pair
        # tokens per expert by index_add, not bincount, which reads the ids back to the host on GPU
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=flat.device)
        offsets = counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        xs = x[token]  # [T·K, H], grouped by expert
        if self.fp8_block_size is None and not self.fp8_training:  # gate and up in one fused kernel on CUDA
            hidden = grouped_swiglu(xs, self.gate_proj.transpose(1, 2), self.up_proj.transpose(1, 2), offsets)
        else:
            hidden = F.silu(self._project("gate_proj", xs, offsets)) * self._project("up_proj", xs, offsets)  # [T·K, I]
        ys = self._project("down_proj", hidden, offsets)  # [T·K, H]
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


class MoE(nn.Module):
    """`y = Σ_k w_k · expert_k(x) + shared_experts(x)` for every token."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(config)
        shared_width = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = (
            MLP(config.hidden_size, shared_width, config.fp8_quantization_config) if shared_width > 0 else None
        )
        self.balance_loss: torch.Tensor | None = None  # of the last recorded forward, until the causal LM pops it

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, record_routing: bool = False
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[b, s, H]`.
            token_mask: `[b, s]` bool, False for padding; padding is left out of the token counts and the balance loss.
            record_routing: a training forward whose gradients will be applied: count the tokens per expert and
                compute the sequence-wise balance loss into `self.balance_loss` (read by the causal LM). An
                activation-checkpoint replay neither counts nor stores again.
        """
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        weights, indices, scores = self.gate(x)
        if record_routing:
            replay = in_backward_replay()
            if not replay:
                self.gate.count_tokens(indices, None if token_mask is None else token_mask.flatten())
            alpha = self.gate.config.seq_balance_loss_alpha
            if alpha > 0:
                # also computed in a replay, which must record the same autograd graph as the original forward
                b, s = shape[:2]
                loss = sequence_balance_loss(scores.view(b, s, -1), indices.view(b, s, -1), token_mask, alpha)
                self.balance_loss = None if replay else loss
        y = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

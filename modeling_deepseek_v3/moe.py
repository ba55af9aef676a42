"""DeepSeekMoE: sigmoid router with group-limited top-k and a choice-only bias, stacked routed experts computed by
a grouped GEMM over tokens sorted by expert, and shared experts.

Dimension letters: T tokens, H hidden, I moe_intermediate_size, E routed experts, K experts per token, G groups.
References: DeepSeek-V3 report §2.1.2 (routing, auxiliary-loss-free bias); DeepSeek-V3 `inference/model.py`
(`Gate`, `MoE`); DESIGN.md §4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DeepseekV3Config
from .dtypes import KeepsTensorDtypes
from .fp8 import fp8_block_size, fp8_grouped_mm
from .kernels import FP8_BLOCK, act_quant, fp8_grouped_gemm, grouped_mm, grouped_swiglu, weight_dequant_ref
from .layers import MLP


class TopkRouter(KeepsTensorDtypes):
    """The `gate` of a MoE layer: `weight` `[E, H]` and the fp32 `e_score_correction_bias` `[E]`.

    Computed in fp32. The bias is added only to choose experts; the combine weights come from the unbiased scores.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(config.n_routed_experts, dtype=torch.float32))

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        weights, indices, _ = self.gate(x)
        y = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

"""DeepSeek Sparse Attention of DeepSeek-V3.2: the lightning indexer, and MLA over the keys it picks.

The indexer scores every past token t for each query s, from its own small projections of the layer input x and
of the query latent c_q (the output of `q_a_layernorm`):
  q_h = RoPE(c_q·W_qbᵀ) per head h, k = RoPE(LayerNorm(x·W_kᵀ)) one key per token (RoPE on the first
  `qk_rope_head_dim` dims, rotating halves, not the interleaved pairs of the main MLA); both rotated by the
  normalised Walsh-Hadamard matrix and rounded to FP8 e4m3 in 1×128 tiles with power-of-two (ue8m0) scales;
  w_h = (x·W_wᵀ in fp32)·H^-½, and
  score[s, t] = Σ_h relu(q8_h · k8) · w_h · scale(q_h) · D^-½ · scale(k),
then keeps the `index_topk` best-scoring keys allowed by the causal (and padding) mask. MLA attends only to those: the
chosen rows of the latent cache are gathered per query and attended to in the absorbed form, never through a dense
mask over all keys. The latent itself is rounded through FP8 (1×128 tiles, ue8m0 scales) and back first, as
DeepSeek's deployment caches it in FP8.

Built here: prefill without a cache (a full forward, `use_cache=False`). Decoding over a cache, continuous batching,
training the indexer, and attention probabilities as outputs are refused (docs/v32.md).
Dimension letters: b batch, s queries, t keys, h MLA heads, H indexer heads, D index head dim, k chosen keys,
c kv_lora_rank, r qk_rope_head_dim.
References: DeepSeek-V3.2 report (DeepSeek Sparse Attention); DeepSeek-V3.2 `inference/model.py` (`Indexer`, `MLA`)
and `kernel.py` (`act_quant`, `fp8_index`); docs/v32.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import DeepseekV32Config
from .fp8 import FP8Format, make_linear
from .kernels import FP8_BLOCK, act_quant

# DeepSeek-V3.2 rounds the indexer's q and k and the cached latent with power-of-two scales (its release's scale_fmt)
SCALE_FMT = "ue8m0"
# elements of the largest intermediate of one chunk of queries (index scores [b, H, rows, t], gathered latent rows
# [b, rows, k, c + r], attention scores [b, rows, h, k]): bounds the memory of long prefills
CHUNK_ELEMENTS = 1 << 26
NOT_BUILT = "is not built yet for DeepSeek-V3.2 (model_type 'deepseek_v32'; docs/v32.md)"


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """`x · H_D / √D` over the last dim (D a power of two), H_D the Walsh-Hadamard matrix in Sylvester's order, by the
    butterfly of the fast transform; computed in fp32, returned in the dtype of `x`."""
    d = x.shape[-1]
    y, half = x.float(), 1
    while half < d:
        pairs = y.reshape(*x.shape[:-1], d // (2 * half), 2, half)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        half *= 2
    return (y.reshape(x.shape) * d**-0.5).to(x.dtype)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the pairs `(x[i], x[i + r/2])` (the indexer's layout), computed in fp32, returned in the dtype of `x`.

    Args:
        x: `[b, s, ..., r]`; `cos`, `sin`: `[b, s, r/2]`, broadcast over the dims between s and r.
    """
    shape = (cos.shape[0], cos.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    cos, sin = cos.float().view(shape), sin.float().view(shape)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to FP8 e4m3 in 1×128 tiles with power-of-two scales and back, in its dtype (the cached latent)."""
    q, s = act_quant(x.contiguous(), SCALE_FMT)
    tiles = s.shape[-1]
    padded = F.pad(q.float(), (0, tiles * FP8_BLOCK - x.shape[-1])).unflatten(-1, (tiles, FP8_BLOCK))
    return (padded * s[..., None]).flatten(-2)[..., : x.shape[-1]].to(x.dtype)


class LightningIndexer(nn.Module):
    """The indexer of one layer, with the release's parameter names: `wq_b` (from the query latent), `wk`, its
    LayerNorm `k_norm`, and `weights_proj` (the per-head weights, computed in fp32)."""

    def __init__(self, config: DeepseekV32Config, fp8: FP8Format | None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = make_linear(config.q_lora_rank, self.n_heads * self.head_dim, False, fp8)
        self.wk = make_linear(config.hidden_size, self.head_dim, False, fp8)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)  # stored bf16, used in fp32

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first r dims, then the Hadamard rotation of the whole vector."""
        pe, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return hadamard_rotate(torch.cat((rotate_halves(pe, cos, sin), rest), dim=-1))

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `[b, t, hidden]` -> the FP8 keys `[b, t, D]` and their scales `[b, t]`."""
        k = self.wk(x)
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(k.dtype)
        k8, k_scale = act_quant(self._rotate(k, cos, sin).contiguous(), SCALE_FMT)
        return k8, k_scale[..., 0]

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the FP8 queries `[b, s, H, D]` and each head's weight `[b, s, H]` (fp32), its FP8 scale and the
        score's scale `D^-½` folded in."""
        b, s, _ = x.shape
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        q8, q_scale = act_quant(self._rotate(q, cos, sin).contiguous(), SCALE_FMT)
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads**-0.5
        return q8, weights * q_scale[..., 0] * self.head_dim**-0.5

    @staticmethod
    def scores(q8: torch.Tensor, weights: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
        """`Σ_h relu(q8_h · k8) · w_h · scale(k)`, `[b, s, t]` fp32 (the products of FP8 values are exact in fp32)."""
        dots = torch.einsum("bshd,btd->bsht", q8.float(), k8.float())
        return torch.einsum("bsht,bsh->bst", dots.relu(), weights) * k_scale[:, None, :]

    def select(self, scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `min(index_topk, t)` best keys of each query among the allowed ones: `(indices [b, s, k],
        valid [b, s, k])`; a query with fewer allowed keys gets masked ones too, marked invalid."""
        scores = scores.masked_fill(~allowed, float("-inf"))
        indices = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return indices, allowed.gather(-1, indices)


def refuse_what_is_not_built(cache, paged_batch, attentions, training: bool, absorbable: bool) -> None:
    """Raise `ValueError` for what this implementation of DeepSeek-V3.2 does not do yet; `absorbable`: whether
    `kv_b_proj` is a plain linear whose weight the absorbed form may read (not wrapped by an adapter, no hooks)."""
    if cache is not None or paged_batch is not None:
        raise ValueError(
            f"decoding with a cache (use_cache=True, generate(), continuous batching) {NOT_BUILT}: the indexer's FP8 "
            "key cache is not implemented; run full forwards with use_cache=False"
        )
    if training and torch.is_grad_enabled():
        raise ValueError(
            f"training (the indexer's dense warm-up with its KL loss, and the sparse training stage) {NOT_BUILT}; "
            "call model.eval() or run under torch.no_grad()"
        )
    if attentions is not None:
        raise ValueError(f"output_attentions {NOT_BUILT}: the sparse attention keeps no [s, t] probabilities")
    if not absorbable:
        raise ValueError(f"attention through a wrapped kv_b_proj (an adapter, hooks, offloaded weights) {NOT_BUILT}: "
                         "the sparse attention reads its weight (absorbed form); merge adapters first")


def refuse_continuous_batching(config) -> None:
    """Raise `ValueError` for continuous batching of a DeepSeek-V3.2 model, before its manager starts (its worker
    thread would only log the error of the first forward)."""
    if isinstance(config, DeepseekV32Config):
        raise ValueError(f"continuous batching (generate_batch, cache_implementation='paged') {NOT_BUILT}: the "
                         "indexer's FP8 key cache has no paged form yet")


def sparse_attention(
    mla: nn.Module,
    hidden_states: torch.Tensor,
    q_latent: torch.Tensor,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """MLA of a full forward (no cache) over the keys `mla.indexer` picks for each query.

    Args:
        mla: the layer's `MultiHeadLatentAttention` (its `indexer`, its `absorbed` form, its softmax scale).
        hidden_states: `[b, s, hidden]`, the layer's normed input; q_latent: `[b, s, q_lora_rank]`.
        q_nope, q_pe: `[b, s, h, n]`, `[b, s, h, r]` (rotated); c_kv: `[b, s, c]` (normed); k_pe: `[b, s, r]`.
        position_embeddings: `(cos, sin)`, each `[b, s, r/2]`.
        allowed: `[b, s, s]` bool (True = may attend), or None for plain causal attention.

    Returns:
        `[b, s, h, v]`, before `o_proj`.
    """
    b, s, _ = hidden_states.shape
    cos, sin = position_embeddings
    c_kv = fp8_round_trip(c_kv)
    k8, k_scale = mla.indexer.keys(hidden_states, cos, sin)
    q8, weights = mla.indexer.queries(hidden_states, q_latent, cos, sin)
    k = min(mla.indexer.topk, s)
    rows = max(1, CHUNK_ELEMENTS // max(mla.indexer.n_heads * s, k * (c_kv.shape[-1] + k_pe.shape[-1]),
                                        q_nope.shape[2] * k))
    batch = torch.arange(b, device=c_kv.device)[:, None, None]

    def latent_attention(q_lat: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, s, rows):
            part = slice(start, start + rows)
            scores = mla.indexer.scores(q8[:, part], weights[:, part], k8, k_scale)
            if allowed is None:  # causal, built per chunk: never [s, s] at once
                rows_allowed = torch.arange(s, device=c_kv.device) <= torch.arange(s, device=c_kv.device)[part, None]
                rows_allowed = rows_allowed.expand(b, -1, -1)
            else:
                rows_allowed = allowed[:, part]
            indices, valid = mla.indexer.select(scores, rows_allowed)
            c_sel, pe_sel = c_kv[batch, indices].to(q_lat.dtype), k_pe[batch, indices].to(q_lat.dtype)  # [b,rows,k,.]
            logits = (torch.einsum("bshc,bskc->bshk", q_lat[:, part], c_sel)
                      + torch.einsum("bshr,bskr->bshk", q_pe[:, part].to(q_lat.dtype), pe_sel)) * mla.softmax_scale
            # finfo.min, not -inf: a query with no allowed key (padding) must not give NaN
            logits = logits.masked_fill(~valid[:, :, None, :], torch.finfo(logits.dtype).min)
            probs = logits.softmax(dim=-1, dtype=torch.float32).to(q_lat.dtype)
            out.append(torch.einsum("bshk,bskc->bshc", probs, c_sel))
        return torch.cat(out, dim=1)

    return mla.absorbed(q_nope, latent_attention)

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

Built here: a full forward, prefill and decoding over `MLACache(config)` or `MLAStaticCache(config, ...)` (whose
layers keep the indexer's FP8 keys and scales beside the latents, `cache.IndexedLatentCacheLayer` and
`cache.IndexedStaticLayer`: each new token's key is computed once), and training in the report's two stages
(`indexer_training.py`): the indexer reads a detached copy of its inputs and its FP8 rounding passes gradients
straight through. Under continuous batching the paged latent cache keeps the indexer keys in each token's row, and
`paged_attention.PagedBatch.attend_sparse` runs each request's queries through `attend_chosen_keys` over its own pages.
Attention probabilities as outputs, and what docs/v32.md lists as not built, are refused.
Dimension letters: b batch, s queries, t keys, h MLA heads, H indexer heads, D index head dim, k chosen keys,
c kv_lora_rank, r qk_rope_head_dim.
References: DeepSeek-V3.2 report (DeepSeek Sparse Attention); DeepSeek-V3.2 `inference/model.py` (`Indexer`, `MLA`)
and `kernel.py` (`act_quant`, `fp8_index`); docs/v32.md.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .cache import IndexedLatentCacheLayer, IndexedStaticLayer
from .configuration import DeepseekV32Config
from .fp8 import FP8Format, make_linear
from .indexer_training import IndexerObjective, indexer_kl
from .kernels import act_dequant_ref, act_quant, sparse_mla_decode, sparse_mla_decode_ref

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


def round_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[..., D]` (D <= 128: one tile) rounded to FP8 e4m3 with a power-of-two scale: `(q [..., D], scale [...])`.
    Where `x` carries a gradient, `q` holds the same values in fp32 and passes the gradient of `x / scale` straight
    through the rounding (whose own derivative is zero almost everywhere), so that the indexer trains."""
    q8, scale = act_quant(x.detach().contiguous(), SCALE_FMT)
    if not x.requires_grad:
        return q8, scale[..., 0]
    unit = x.float() / scale
    return q8.float() + (unit - unit.detach()), scale[..., 0]  # exactly q8's values, the gradient of x / scale


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to FP8 e4m3 in 1×128 tiles with power-of-two scales and back, in its dtype (the cached latent)."""
    return act_dequant_ref(*act_quant(x.contiguous(), SCALE_FMT), dtype=x.dtype)


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
        pe, rest = x.split_with_sizes([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return hadamard_rotate(torch.cat((rotate_halves(pe, cos, sin), rest), dim=-1))

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `[b, t, hidden]` -> the FP8 keys `[b, t, D]` (their values in fp32 where they carry a gradient,
        `round_to_fp8`) and their scales `[b, t]`."""
        k = self.wk(x)
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(k.dtype)
        return round_to_fp8(self._rotate(k, cos, sin))

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the FP8 queries `[b, s, H, D]` (as the keys, `keys`) and each head's weight `[b, s, H]` (fp32), its FP8
        scale and the score's scale `D^-½` folded in."""
        b, s, _ = x.shape
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        q8, q_scale = round_to_fp8(self._rotate(q, cos, sin))
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads**-0.5
        return q8, weights * q_scale * self.head_dim**-0.5

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

    @staticmethod
    def select_all(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key, marked valid where allowed (the dense warm-up's attention), in `select`'s form."""
        indices = torch.arange(allowed.shape[-1], device=allowed.device).expand(allowed.shape)
        return indices, allowed


def refuse_what_is_not_built(cache, layer_idx: int, paged_batch, attentions, training: bool, objective,
                              absorbable: bool) -> None:
    """Raise `ValueError` for what this implementation of DeepSeek-V3.2 does not do; `cache`: the forward's cache, whose
    layer `layer_idx` must keep indexer keys (`MLACache(config)`, `MLAStaticCache(config, ...)`; under continuous
    batching, `paged_batch` set, the paged latent cache, whose rows keep them); `training`: a
    forward that would train without an `IndexerObjective`; `objective`: a training forward's (no cache with it);
    `absorbable`: whether `kv_b_proj` is a plain linear whose weight the absorbed form may read (not wrapped by an
    adapter, no hooks)."""
    if cache is not None and paged_batch is None:
        layers = getattr(cache, "layers", [])
        if not (layer_idx < len(layers) and isinstance(layers[layer_idx], (IndexedLatentCacheLayer,
                                                                            IndexedStaticLayer))):
            raise ValueError(
                f"a cache whose layer {layer_idx} keeps no indexer keys ({type(cache).__name__}: transformers' "
                f"caches, or an MLACache / MLAStaticCache built without the config) {NOT_BUILT}: the indexer's FP8 "
                "keys are kept only in the layers of MLACache(model.config) and MLAStaticCache(model.config, ...), "
                "which generate() builds"
            )
        if objective is not None:
            raise ValueError("a training forward of DeepSeek-V3.2 with a cache: the FP8 indexer key cache holds no "
                             "gradient; train with use_cache=False")
    if training and torch.is_grad_enabled():
        raise ValueError(
            "training DeepSeek-V3.2 needs a stage for its indexer: set config.indexer_training_stage to "
            "'dense_warmup' or 'sparse' (docs/v32.md#training) and train through DeepseekV3ForCausalLM, whose forward "
            "computes the indexer's loss; for a forward without training call model.eval() or run under "
            "torch.no_grad()"
        )
    if attentions is not None:
        raise ValueError(f"output_attentions {NOT_BUILT}: the sparse attention keeps no [s, t] probabilities")
    if not absorbable:
        raise ValueError(f"attention through a wrapped kv_b_proj (an adapter, hooks, offloaded weights) {NOT_BUILT}: "
                         "the sparse attention reads its weight (absorbed form); merge adapters first")


class SparseQueries(NamedTuple):
    """What the sparse attention reads of the new tokens' queries: the MLA queries, and the layer's normed input and
    query latent with their RoPE, from which the lightning indexer forms its own queries."""

    hidden_states: torch.Tensor  # [b, s, hidden], the layer's normed input
    q_latent: torch.Tensor  # [b, s, q_lora_rank]
    q_nope: torch.Tensor  # [b, s, h, n]
    q_pe: torch.Tensor  # [b, s, h, r], rotated
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [b, s, r/2]


def sparse_attention(
    mla: nn.Module,
    queries: SparseQueries,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    allowed: torch.Tensor | None,
    objective: IndexerObjective | None = None,
    cache: Cache | None = None,
    past: int | torch.Tensor = 0,
) -> torch.Tensor:
    """MLA over the keys `mla.indexer` picks for each query (or over every allowed key in the dense warm-up), for a
    full forward or for new tokens over a cache (prefill, a decode step, or a speculative verification).

    Args:
        mla: the layer's `MultiHeadLatentAttention` (its `indexer`, its `absorbed` form, its softmax scale).
        queries: the new tokens' `SparseQueries`.
        c_kv: `[b, s, c]` (normed); k_pe: `[b, s, r]`, of the new tokens.
        allowed: `[b, s, t]` bool (True = may attend) over all t = past + s keys, or None for plain causal attention
            (query i at position past + i).
        objective: in a training forward, the `IndexerObjective` that receives this layer's KL loss; its stage picks
            the keys attended to.
        cache: an `MLACache(config)` or `MLAStaticCache(config, ...)`: the new tokens' rounded latents and indexer keys
            are stored in its layer `mla.layer_idx`, and the queries attend over all its slots (`allowed` masks a
            static cache's empty ones); past: the tokens it held before (a tensor for a static cache).

    Returns:
        `[b, s, h, v]`, before `o_proj`.
    """
    c_kv, k8, k_scale = cached_keys(mla, queries, c_kv, objective)
    if cache is not None:
        c_kv, k_pe = cache.update(c_kv[:, None], k_pe[:, None], mla.layer_idx,
                                  {"index_keys": k8, "index_scales": k_scale})
        c_kv, k_pe = c_kv[:, 0], k_pe[:, 0]
        k8, k_scale = cache.layers[mla.layer_idx].index_keys()
    return attend_chosen_keys(mla, queries, c_kv, k_pe, k8, k_scale, allowed, objective, past)


def _indexer_scope(objective: IndexerObjective | None):
    return contextlib.nullcontext if objective is None else objective.indexer_scope


def cached_keys(mla: nn.Module, queries: SparseQueries, c_kv: torch.Tensor,
                objective: IndexerObjective | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a cache keeps of new tokens `[b, s, .]`: `(c_kv` rounded through FP8 and back, as DeepSeek's deployment
    caches the latent, `the indexer's FP8 keys [b, s, D]` (from the queries' layer input and RoPE), `their scales
    [b, s])`."""
    with _indexer_scope(objective)():  # the indexer reads its input detached: it learns from its own loss only
        k8, k_scale = mla.indexer.keys(queries.hidden_states.detach(), *queries.position_embeddings)
    return fp8_round_trip(c_kv), k8, k_scale


def attend_chosen_keys(
    mla: nn.Module,
    queries: SparseQueries,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    allowed: torch.Tensor | None,
    objective: IndexerObjective | None = None,
    past: int | torch.Tensor = 0,
) -> torch.Tensor:
    """The queries' attention over all t keys (`sparse_attention`'s, once the keys are cached): `c_kv` `[b, t, c]`
    (rounded), `k_pe` `[b, t, r]`, the indexer keys `k8` `[b, t, D]` and `k_scale` `[b, t]`; the other arguments as
    `sparse_attention`'s. Also the attention of a request group over its pages under continuous batching."""
    hidden_states, q_latent, q_nope, q_pe, (cos, sin) = queries
    b, s, _ = hidden_states.shape
    hidden_states, q_latent = hidden_states.detach(), q_latent.detach()
    indexer_scope = _indexer_scope(objective)
    dense = objective is not None and objective.dense
    t = c_kv.shape[1]
    if objective is None and t <= mla.indexer.topk:
        # every allowed key would be chosen, whatever the scores: dense MLA over them, without scoring
        return mla.attend(q_nope, q_pe, c_kv, k_pe, None if allowed is None else allowed[:, None], past)
    with indexer_scope():
        q8, weights = mla.indexer.queries(hidden_states, q_latent, cos, sin)
    k = t if dense else min(mla.indexer.topk, t)
    rows = max(1, CHUNK_ELEMENTS // max(mla.indexer.n_heads * t, k * (c_kv.shape[-1] + k_pe.shape[-1]),
                                        q_nope.shape[2] * k))
    key_positions = torch.arange(t, device=c_kv.device)
    query_positions = torch.arange(s, device=c_kv.device) + past

    kl_sum, queries = 0.0, 0

    def latent_attention(q_lat: torch.Tensor) -> torch.Tensor:
        nonlocal kl_sum, queries
        out = []
        for start in range(0, s, rows):
            part = slice(start, start + rows)
            with indexer_scope():
                scores = mla.indexer.scores(q8[:, part], weights[:, part], k8, k_scale)
            if allowed is None:  # causal, built per chunk: never [s, t] at once
                rows_allowed = (key_positions <= query_positions[part, None]).expand(b, -1, -1)
            else:
                rows_allowed = allowed[:, part]
            if dense:
                indices, valid = mla.indexer.select_all(rows_allowed)
            else:
                indices, valid = mla.indexer.select(scores, rows_allowed)
            chosen = (q_lat[:, part], q_pe[:, part], c_kv, k_pe, indices, valid, mla.softmax_scale)
            if objective is None:  # inference: the Triton kernel on CUDA (kernels.sparse_mla_decode dispatches)
                o_lat = sparse_mla_decode(*chosen)
            else:  # training: the KL loss needs the probabilities
                o_lat, probs = sparse_mla_decode_ref(*chosen, return_probs=True)
                with indexer_scope():
                    part_kl, part_queries = indexer_kl(probs, scores.gather(-1, indices), valid)
                    kl_sum, queries = kl_sum + part_kl, queries + part_queries
            out.append(o_lat)
        return torch.cat(out, dim=1)

    out = mla.absorbed(q_nope, latent_attention)
    if objective is not None:
        objective.add_layer(kl_sum, queries)
    return out

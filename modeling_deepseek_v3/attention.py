"""Multi-head Latent Attention (MLA) with decoupled RoPE, and its two equal computation paths.

* expanded (prefill, training): `kv_b_proj(c_kv)` gives per-head `k_nope` and `v`; K = [k_nope; k_pe], attention
  through transformers' attention interface (sdpa / eager).
* absorbed (decoding, short queries over a cache): `kv_b_proj` is folded into the query and the output, so the
  cached latent is never expanded:  `q_lat = q_nope·W_UK`, `o_lat = softmax((q_lat·c_kvᵀ + q_pe·k_peᵀ)·scale)·c_kv`,
  `o = o_lat·W_UVᵀ`. The attention over the latent is `kernels.mla_decode` (a Triton kernel on CUDA, its torch
  reference elsewhere); on a CPU, without gradients, the attention over a cache that holds `[c_kv | k_pe]` rows (the
  dynamic latent cache) runs as torch's fused `scaled_dot_product_attention` instead, keys and values both those rows,
  which reads each cached row once per step instead of twice (`latent_sdpa`; any number of new queries, any mask).
`MultiHeadLatentAttention.use_absorbed` picks, per call, the path with fewer multiply-adds.
Over an FP8 latent cache (`cache_dtype="fp8"`, the cache hands back an `FP8Latent` for `c_kv`), the absorbed path is
`kernels.mla_decode_fp8`, which dequantises the cache a tile (Triton) or a chunk of tokens (torch) at a time; the
expanded path (a prefill) dequantises the whole cache first: it expands every cached token to all heads' keys and
values anyway, h·(n + v) values per token against c.

Dimension letters: b batch, s new tokens, t all keys (cached + new), h heads, d head dim (n nope, v value),
c kv_lora_rank, r qk_rope_head_dim.
References: DeepSeek-V2 report §2.1 (absorption); DeepSeek-V3 report §2.1.1; DeepSeek-V3 `inference/model.py`
(`MLA`, `attn_impl="absorb"`); docs/design.md (Multi-head Latent Attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration import DeepseekV3Config, DeepseekV32Config
from .fp8 import FP8Linear, dense_weight, fp8_format, make_linear
from .indexer import LightningIndexer, SparseQueries, refuse_what_is_not_built, sparse_attention
from .kernels import mla_decode, mla_decode_fp8, mla_decode_ref, use_triton
from .latent_fp8 import FP8Latent
from .layers import RMSNorm
from .private_api import attention_implementation, has_forward_hooks
from .rope import apply_rope, softmax_scale
from .shards import local_shards, sum_gradient_over_head_shards

if TYPE_CHECKING:
    from .paged_attention import PagedBatch


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over `[b, h, s, d]` inputs; returns `([b, s, h, d_v], probabilities)`.

    Accepts both mask kinds transformers builds: boolean (True = attend, from sdpa masks) or additive float.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, s, t]
    scores = _mask_scores(scores, attention_mask)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _mask_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        # finfo.min, not -inf: a fully masked row (a padding query) must not produce NaN
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def _absorbable(kv_b_proj: nn.Module) -> bool:
    """Absorption reads `kv_b_proj`'s weight directly, which is right only for a plain linear (or FP8 linear) whose
    forward is exactly `x · Wᵀ`: not a wrapper (a LoRA adds ΔW), not a module with hooks, not weights offloaded to
    meta by accelerate."""
    plain = type(kv_b_proj) in (nn.Linear, FP8Linear)
    return plain and not has_forward_hooks(kv_b_proj) and not kv_b_proj.weight.is_meta


class MultiHeadLatentAttention(nn.Module):
    """MLA of DeepSeek-V3 with checkpoint parameter names (`q_a_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, ...)."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        # read by transformers' attention functions: K and V are expanded to every head before the call
        self.num_key_value_groups = 1
        self.is_causal = True

        hidden, h, fp8 = config.hidden_size, self.num_heads, fp8_format(config)
        if self.q_lora_rank is None:
            self.q_proj = make_linear(hidden, h * self.qk_head_dim, False, fp8)
        else:
            self.q_a_proj = make_linear(hidden, self.q_lora_rank, config.attention_bias, fp8)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = make_linear(self.q_lora_rank, h * self.qk_head_dim, False, fp8)
        kv_a_out = self.kv_lora_rank + self.qk_rope_head_dim
        self.kv_a_proj_with_mqa = make_linear(hidden, kv_a_out, config.attention_bias, fp8)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = make_linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), False, fp8)
        self.o_proj = make_linear(h * self.v_head_dim, hidden, config.attention_bias, fp8)
        # DeepSeek-V3.2: the lightning indexer picks the keys each query attends to (indexer.py)
        self.indexer = LightningIndexer(config, fp8) if isinstance(config, DeepseekV32Config) else None

    @property
    def softmax_scale(self) -> float:
        # read from the config at each call, so that RoPE settings changed after construction (YaRN's mscale) apply
        return softmax_scale(self.config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        paged_batch: PagedBatch | None = None,
        attentions: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `[b, s, hidden]`.
            position_embeddings: `(cos, sin)`, each `[b, s, r/2]`.
            attention_mask: `[b, 1, s, t]` boolean (True = attend) or additive float, or None (causal, no padding).
            cache: a cache holding `c_kv` / `k_pe` per layer; updated in place.
            paged_batch: under continuous batching, the layout of the flat batch (`b = 1`, `s` tokens of many
                requests) over the paged latent cache; `attention_mask` and `cache` are then not read.
            attentions: a list that receives this call's attention probabilities `[b, h, s, t]` (`output_attentions`);
                see `attend`. Not under continuous batching.

        Returns:
            `[b, s, hidden]`.
        """
        b, s, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(hidden_states))
            q = self.q_b_proj(q_latent)
        q = q.view(b, s, -1, self.qk_head_dim)  # this rank's heads under tensor parallelism, all heads otherwise
        # split_with_sizes: the operator `Tensor.split` calls, without its Python wrapper (~1.5 µs a call, a dozen
        # calls in a decode step)
        q_nope, q_pe = q.split_with_sizes([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        cos, sin = position_embeddings
        q_pe = apply_rope(q_pe, cos, sin)

        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split_with_sizes(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin)  # ONE rope key shared by all heads
        if self.indexer is not None:
            objective = kwargs.get("indexer_objective")  # the causal LM's, in a training forward (indexer_training.py)
            refuse_what_is_not_built(cache, self.layer_idx, paged_batch, attentions,
                                     self.training and objective is None, objective, _absorbable(self.kv_b_proj))
            queries = SparseQueries(hidden_states, q_latent, q_nope, q_pe, position_embeddings)
            if paged_batch is not None:
                return self.o_proj(paged_batch.attend_sparse(self, queries, c_kv, k_pe).flatten(2))
            past, t = 0, s
            if cache is not None:
                past = cache.get_seq_length(self.layer_idx)
                if isinstance(past, torch.Tensor):  # a static layer: all its slots are keys, empty ones masked
                    past, t = past.clone(), cache.layers[self.layer_idx].max_cache_len
                else:
                    t = past + s
            allowed = latent_mask(attention_mask, b, s, t, past, c_kv.device)
            out = sparse_attention(self, queries, c_kv, k_pe, allowed, objective, cache, past)
            return self.o_proj(out.flatten(2))
        if paged_batch is not None:
            out = paged_batch.attend(self, q_nope, q_pe, c_kv, k_pe)
            return self.o_proj(out.flatten(2))
        c_kv, k_pe = c_kv.unsqueeze(1), k_pe.unsqueeze(1)  # [b, 1, s, c], [b, 1, s, r]: one "head" for the cache
        past = 0  # tokens cached before this call (a tensor for static caches)
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            if isinstance(past, torch.Tensor):
                past = past.clone()  # a static layer's own counter, which `update` advances in place
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)
        # [b, t, c] (an FP8 cache's `FP8Latent` already is), [b, t, r]
        c_kv, k_pe = c_kv if isinstance(c_kv, FP8Latent) else c_kv[:, 0], k_pe[:, 0]
        out = self.attend(q_nope, q_pe, c_kv, k_pe, attention_mask, past, attentions, **kwargs)
        return self.o_proj(out.flatten(2))

    def attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past: int | torch.Tensor = 0,
        attentions: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Attention of `s` new queries over `t` latent keys, by the cheaper path (`use_absorbed`).

        Args:
            q_nope: `[b, s, h, n]`; q_pe: `[b, s, h, r]` (rotated); c_kv: `[b, t, c]`, or an FP8 cache's
                `FP8Latent`; k_pe: `[b, t, r]` (rotated).
            attention_mask: as in `forward`, or None: causal, query i at position `past + i`.
            past: keys before the first query (a tensor for static caches).
            attentions: a list that receives the attention probabilities `[b, h, s, t]`, from either path: the
                expanded path then runs the eager attention function, the absorbed path the torch reference of the
                latent attention (slow, but exact on any device).

        Returns:
            `[b, s, h, v]`, before `o_proj`.
        """
        want_probs = attentions is not None
        if self.use_absorbed(q_nope.shape[1], c_kv.shape[1]):
            out, probs = self._absorbed(q_nope, q_pe, c_kv, k_pe, attention_mask, past, want_probs)
        else:
            out, probs = self._expanded(q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs)
        if want_probs:
            attentions.append(probs)
        return out

    def use_absorbed(self, s: int, t: int) -> bool:
        """Whether the absorbed path costs fewer multiply-adds for `s` queries over `t` keys (docs/design.md)."""
        path = self.config.mla_attention_path
        exact = _absorbable(self.kv_b_proj)
        dropout = self.training and self.config.attention_dropout > 0  # the absorbed path has no dropout
        if path == "absorbed" and not exact:
            kind = type(self.kv_b_proj)
            raise ValueError(
                "mla_attention_path='absorbed' needs kv_b_proj to be a plain (FP8) linear with its weight in memory "
                f"and no hooks, got {kind.__module__}.{kind.__qualname__} (merge adapters first, or use 'auto')"
            )
        if path == "absorbed" and dropout:
            raise ValueError(
                f"mla_attention_path='absorbed' has no attention dropout, but attention_dropout="
                f"{self.config.attention_dropout} in training; use 'auto' or 'expanded' to train with dropout"
            )
        if path != "auto":
            return path == "absorbed"
        if dropout:
            return False
        h, c, r = self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        dn, dv = self.qk_nope_head_dim, self.v_head_dim
        expanded = t * c * h * (dn + dv) + s * t * h * (dn + r + dv)
        absorbed = s * h * c * (dn + dv) + s * t * h * (2 * c + r)
        return exact and absorbed < expanded

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs):
        if isinstance(c_kv, FP8Latent):
            c_kv = c_kv.dequantise(k_pe.dtype)
        b, t, _ = c_kv.shape
        h = q_nope.shape[2]
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = kv.split_with_sizes([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, h, -1)), dim=-1)  # [b, t, h, n+r]
        query = torch.cat((q_nope, q_pe), dim=-1)  # [b, s, h, n+r]
        pad = self.qk_head_dim - self.v_head_dim
        implementation = attention_implementation(self.config)  # "eager" whenever probabilities are wanted
        if implementation == "sdpa" and pad > 0 and value.device.type == "cpu":
            # sdpa's fused CPU kernel needs equal q/k/v head dims (else its slow math path runs; CUDA's memory-efficient
            # kernel takes unequal ones): zero columns of V give zero output columns, cut off below
            value = F.pad(value, (0, pad))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        out, probs = attention(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            scaling=self.softmax_scale,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return out[..., : self.v_head_dim], probs  # [b, s, h, v], [b, h, s, t] from eager attention

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, attention_mask, past, want_probs):
        b, s, _, _ = q_nope.shape
        t = c_kv.shape[1]
        mask = latent_mask(attention_mask, b, s, t, past, k_pe.device)
        scale = self.softmax_scale
        if isinstance(c_kv, FP8Latent):
            if not want_probs:
                return self.absorbed(q_nope, lambda q_lat: mla_decode_fp8(
                    q_lat, q_pe.to(q_lat.dtype), c_kv.values, c_kv.scales, k_pe.to(q_lat.dtype), mask, scale)), None
            c_kv = c_kv.dequantise(k_pe.dtype)  # the probabilities come from the reference over the whole cache
        c_kv = sum_gradient_over_head_shards(c_kv, self.kv_b_proj.weight)

        def latents(q_lat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # under autocast q_lat comes out of its matmul in the compute dtype, the rope and latent tensors do not
            return tuple(x.to(q_lat.dtype) for x in (q_pe, c_kv, k_pe))

        if not want_probs:
            # where the dispatch would not run the Triton kernel (a CPU, outside `triton_on_cpu()`), in eager mode (the
            # storage check of `side_by_side` cannot be traced; a compiled step keeps `mla_decode`)
            fused = c_kv.device.type == "cpu" and not use_triton(c_kv) and not torch.compiler.is_compiling()
            rows = side_by_side(c_kv, k_pe) if fused else None
            if rows is not None and not (torch.is_grad_enabled() and rows.requires_grad):
                return self.absorbed(q_nope, lambda q_lat: latent_sdpa(q_lat, q_pe.to(q_lat.dtype),
                                                                       rows.to(q_lat.dtype), scale, mask)), None
            return self.absorbed(q_nope, lambda q_lat: mla_decode(q_lat, *latents(q_lat), mask, scale)), None
        formed = {}

        def with_probabilities(q_lat: torch.Tensor) -> torch.Tensor:
            q_pe_, c_kv_, k_pe_ = latents(q_lat)
            _, probs = mla_decode_ref(q_lat, q_pe_, c_kv_, k_pe_, mask, scale, return_probs=True)  # [b, s, h, t]
            # the returned probabilities [b, h, s, t] are the ones that weigh the values, so that retain_grad() on
            # them sees the gradient; in fp32 this is the reference's own product, in bf16 / fp16 the probabilities
            # are rounded to the model's dtype first, as eager attention does
            formed["probs"] = probs.transpose(1, 2).to(q_nope.dtype)
            weights = formed["probs"].transpose(1, 2).float().reshape(b, s * probs.shape[2], t)
            return torch.bmm(weights, c_kv_.float()).view(*probs.shape[:3], -1).to(q_lat.dtype)

        return self.absorbed(q_nope, with_probabilities), formed["probs"]  # [b, h, s, t]

    def absorbed(self, q_nope: torch.Tensor, latent_attention: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The absorbed path around an attention over the latents: `o = latent_attention(q_nope·W_UK)·W_UVᵀ`.

        Args:
            q_nope: `[b, s, h, n]`.
            latent_attention: maps `q_lat` `[b, s, h, c]` to `o_lat` `[b, s, h, c]` (`kernels.mla_decode` over a
                cache, or `kernels.mla_decode_paged` over pages).

        Returns:
            `[b, s, h, v]`, before `o_proj`.
        """
        with local_shards(self.kv_b_proj):  # the rows of this rank's heads under tensor parallelism
            w_kv_b = dense_weight(self.kv_b_proj, q_nope.dtype).view(q_nope.shape[2], -1, self.kv_lora_rank)
        w_uk, w_uv = w_kv_b.split_with_sizes([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [h, n, c], [h, v, c]
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk).transpose(1, 2)  # [b, s, h, c]
        o_lat = latent_attention(q_lat)  # [b, s, h, c]
        return torch.matmul(o_lat.transpose(1, 2), w_uv.transpose(1, 2)).transpose(1, 2)  # [b, s, h, v]


def latent_mask(
    attention_mask: torch.Tensor | None, b: int, s: int, t: int, past: int | torch.Tensor, device: torch.device
) -> torch.Tensor | None:
    """The mask of the absorbed path, `[b, s, t]` bool (True = attend), from the one transformers built for this layer
    (`[b, 1, s, t]` boolean from sdpa masks, or additive float holding 0 where attended), or None for plain causal
    attention of the last s of t keys. A static cache has empty slots after the tokens (t > past + s): its causal
    mask is built from the positions."""
    if attention_mask is None:
        if isinstance(past, int) and past + s == t:
            return None
        positions = torch.arange(s, device=device) + past  # query i sits at past + i
        return (torch.arange(t, device=device) <= positions[:, None]).expand(b, s, t)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attention_mask.expand(b, 1, s, t)[:, 0]


def side_by_side(c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor | None:
    """`[b, t, c + r]` rows `[c_kv | k_pe]` when `c_kv` `[b, t, c]` and `k_pe` `[b, t, r]` are the two column ranges of
    one buffer (as the dynamic latent cache stores them), viewed without a copy; None otherwise."""
    (b, t, c), r = c_kv.shape, k_pe.shape[-1]
    same_rows = (
        c_kv.dtype == k_pe.dtype
        and c_kv.untyped_storage().data_ptr() == k_pe.untyped_storage().data_ptr()
        and k_pe.storage_offset() == c_kv.storage_offset() + c
        and c_kv.stride() == k_pe.stride()
        and c_kv.stride(-1) == 1
        and (t == 1 or c_kv.stride(1) == c + r)
    )
    return c_kv.as_strided((b, t, c + r), c_kv.stride()) if same_rows else None


def latent_sdpa(
    q_lat: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor, softmax_scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`kernels.mla_decode` through torch's fused attention: the latent attention is multi-query attention with keys
    `[c_kv | k_pe]` (`rows`), values `c_kv` and queries `[q_lat | q_pe]`. The values are given as the whole rows (the
    output's last r columns, weighted `k_pe`, are dropped), so keys and values are one tensor, read once, and the fused
    kernel needs equal head dims. The heads go in as groups sharing the one key head, as many groups as torch threads
    (a divisor of the heads): the kernel splits work by head. A group's queries are its heads' `s` new queries, so
    several new tokens (speculative verification) and padding masks take the same path.

    Args:
        q_lat: `[b, s, h, c]`; q_pe: `[b, s, h, r]`; rows: `[b, t, c + r]`.
        mask: `[b, s, t]` bool (True = attend), or None: causal, query i at position `t - s + i` (as `mla_decode`).
            A query without any key gets 0 (as `mla_decode`).

    Returns:
        `o_lat` `[b, s, h, c]`.
    """
    b, s, h, c = q_lat.shape
    t = rows.shape[1]
    if mask is None and s > 1:
        mask = torch.arange(t, device=rows.device) <= torch.arange(t - s, t, device=rows.device)[:, None]  # [s, t]
    groups = max(g for g in range(1, min(h, torch.get_num_threads()) + 1) if h % g == 0)
    per_group = h // groups * s  # rows (head, query) of a group
    query = torch.cat((q_lat, q_pe), dim=-1).transpose(1, 2).reshape(b, groups, per_group, -1)
    if mask is not None:  # the same key mask for every head of a query
        mask = mask.expand(b, s, t)[:, None].expand(b, h // groups, s, t).reshape(b, 1, per_group, t)
    keys = rows[:, None]  # [b, 1, t, c + r]: one key head
    out = F.scaled_dot_product_attention(query, keys, keys, attn_mask=mask, scale=softmax_scale,
                                         enable_gqa=groups > 1)
    return out[..., :c].reshape(b, h, s, c).transpose(1, 2)

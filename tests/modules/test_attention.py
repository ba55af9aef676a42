"""MLA: absorbed path = expanded path, and the cost rule that picks between them."""

import pytest
import torch

from modeling_deepseek_v3 import MLACache

from ..utils import random_ids, random_model, tiny_config


@pytest.mark.parametrize("q_lora_rank", [32, None])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_absorbed_equals_expanded(q_lora_rank, new_tokens):
    """Same weights, same cache contents: the absorbed path reproduces the expanded one (prefix + new tokens)."""
    expanded = random_model(tiny_config(q_lora_rank=q_lora_rank, mla_attention_path="expanded"))
    absorbed = random_model(tiny_config(q_lora_rank=q_lora_rank, mla_attention_path="absorbed"))
    absorbed.load_state_dict(expanded.state_dict())
    ids = random_ids(expanded.config, 2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    outs = []
    for model in (expanded, absorbed):
        cache = MLACache(model.config)
        model(ids[:, :-new_tokens], attention_mask=mask[:, :-new_tokens], cache=cache, use_cache=True)
        outs.append(model(ids[:, -new_tokens:], attention_mask=mask, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_cost_rule_picks_absorbed_for_decode_and_expanded_for_prefill():
    attn = random_model(tiny_config()).model.layers[0].self_attn
    assert attn.use_absorbed(1, 200)
    assert attn.use_absorbed(4, 200)
    assert not attn.use_absorbed(200, 200)


def latent_attention_fp32(q_lat, q_pe, c_kv, k_pe, scale, mask):
    """The absorbed formula written out, in fp64: softmax((q_lat·c_kvᵀ + q_pe·k_peᵀ)·scale)·c_kv over the keys that
    `mask` `[b, s, t]` allows (a query allowed none gets 0)."""
    scores = (torch.einsum("bshc,btc->bsht", q_lat.double(), c_kv.double())
              + torch.einsum("bshr,btr->bsht", q_pe.double(), k_pe.double())) * scale
    allowed = mask[:, :, None, :]  # [b, s, 1, t]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bsht,btc->bshc", probs, c_kv.double())


@pytest.mark.parametrize("heads, threads", [(6, 1), (6, 2), (16, 2), (5, 2)])
@pytest.mark.parametrize("new_tokens, masked", [(1, False), (3, False), (1, True), (3, True)])
def test_latent_sdpa_equals_the_absorbed_formula(heads, threads, new_tokens, masked):
    """The fused step over a buffer of [c_kv | k_pe] rows (with room after the tokens, as the cache has) gives the
    absorbed formula's output, whatever the grouping of the heads: one new token or several (speculative
    verification), causal (no mask) or under a mask with padding and a query that sees no key."""
    from modeling_deepseek_v3.attention import latent_sdpa, side_by_side

    torch.manual_seed(0)
    b, s, t, c, r = 2, new_tokens, 37, 16, 8
    buffer = torch.randn(b, 1, 64, c + r)[:, 0]  # capacity 64, t filled
    c_kv, k_pe = buffer[:, :t, :c], buffer[:, :t, c:]
    rows = side_by_side(c_kv, k_pe)
    assert rows is not None and rows.data_ptr() == buffer.data_ptr()
    assert side_by_side(c_kv.clone(), k_pe.clone()) is None  # two separate tensors: no rows to read at once
    q_lat, q_pe = torch.randn(b, s, heads, c), torch.randn(b, s, heads, r)
    causal = (torch.arange(t) <= torch.arange(t - s, t)[:, None]).expand(b, s, t)  # query i at position t - s + i
    mask = None
    if masked:
        mask = causal & (torch.rand(b, s, t) < 0.7)
        mask[1, :, :5] = False  # left padding of row 1
        mask[1, -1] = False  # a query that sees no key
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = latent_sdpa(q_lat, q_pe, rows, 0.3, mask)
    finally:
        torch.set_num_threads(before)
    expected = latent_attention_fp32(q_lat, q_pe, c_kv, k_pe, 0.3, causal if mask is None else mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_decode_step_reads_the_dynamic_cache_rows_at_once(monkeypatch):
    """Decode steps over the dynamic cache with gradients off, as in `generate` (one new token per row or several, as
    speculative verification runs them, with or without left padding), read the cache's [c_kv | k_pe] rows through
    `latent_sdpa` and give the expanded path's logits; with gradients on they keep the latent decode kernel."""
    from modeling_deepseek_v3 import attention

    calls = []
    latent_sdpa = attention.latent_sdpa
    monkeypatch.setattr(attention, "latent_sdpa", lambda *args: calls.append(1) or latent_sdpa(*args))
    expanded = random_model(tiny_config(mla_attention_path="expanded"))
    absorbed = random_model(tiny_config(mla_attention_path="absorbed"))
    absorbed.load_state_dict(expanded.state_dict())
    ids = random_ids(expanded.config, 2, 12)
    for padded, grad, step in ((False, False, 1), (True, False, 1), (False, False, 3), (True, False, 3),
                               (False, True, 1)):
        mask = torch.ones_like(ids)
        mask[1, :4] = 0 if padded else 1
        logits = []
        for model in (expanded, absorbed):
            cache = MLACache(model.config)
            with torch.set_grad_enabled(grad):
                model(ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True)
                steps = [model(ids[:, t : t + step], attention_mask=mask[:, : t + step], cache=cache,
                               use_cache=True).logits for t in range(6, 12, step)]
            logits.append(torch.cat(steps, dim=1))
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
        # the prompt too: this model runs every forward absorbed (mla_attention_path="absorbed")
        assert len(calls) == (0 if grad else (1 + 6 // step) * expanded.config.num_hidden_layers)
        calls.clear()

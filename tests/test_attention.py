"""MLA: absorbed path = expanded path; interleaved RoPE; the cost rule; YaRN scale."""

import math

import pytest
import torch

from modeling_deepseek_v3 import MLACache
from modeling_deepseek_v3.rope import apply_rope, softmax_scale

from .utils import random_ids, random_model, tiny_config


def test_apply_rope_matches_complex_rotation():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(2, 5, 4)
    out = apply_rope(x, angles.cos(), angles.sin())
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None]  # e^{iθ} per pair
    ref = torch.view_as_real(torch.view_as_complex(x.view(2, 5, 3, 4, 2)) * rotation)
    torch.testing.assert_close(out, ref.flatten(-2), rtol=1e-6, atol=1e-6)


def test_yarn_softmax_scale():
    cfg = tiny_config()
    m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * m * m)
    assert softmax_scale(tiny_config(rope_scaling=None)) == pytest.approx(cfg.qk_head_dim**-0.5)


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

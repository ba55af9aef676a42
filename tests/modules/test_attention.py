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

"""RoPE: the interleaved rotation, the YaRN softmax scale, linear and dynamic (NTK) scaling as transformers' built-in
DeepSeek-V3 computes them; invalid RoPE settings are refused, also when assigned after construction, and keys a type
does not read are ignored with a warning, as transformers does; settings changed on the config of a built model take
effect."""

import math

import pytest
import torch
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_deepseek_v3 import DeepseekV3Config
from modeling_deepseek_v3.rope import RotaryEmbedding, apply_rope, softmax_scale

from ..utils import random_ids, random_model, tiny_config

MAX_POSITIONS = 32  # short enough that the long inputs below go past it
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def same_weights(model, **config_overrides):
    """A model with `model`'s weights and a config differing by `config_overrides`."""
    other = random_model(tiny_config(max_position_embeddings=MAX_POSITIONS, **config_overrides))
    other.load_state_dict(model.state_dict())
    return other


def test_apply_rope_matches_complex_rotation():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.randn(2, 5, 4)
    out = apply_rope(x, angles.cos(), angles.sin())
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None]  # e^{iθ} per pair
    ref = torch.view_as_real(torch.view_as_complex(x.view(2, 5, 3, 4, 2)) * rotation)
    torch.testing.assert_close(out, ref.flatten(-2), rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize(
    "layout", ["slice of a wider row", "every other column", "contiguous at an odd offset", "bf16"]
)
def test_apply_rope_matches_pairs_rotated_by_hand(layout):
    # q_pe is a slice of q: the complex view must cope with offsets and strides
    wide = torch.randn(2, 3, 4, 2 * 8 + 1)
    x = {"slice of a wider row": wide[..., 1:9], "every other column": wide[..., 1::2][..., :8],
         "contiguous at an odd offset": wide.flatten()[1:2 * 3 * 4 * 8 + 1].view(2, 3, 4, 8),
         "bf16": wide[..., :8].bfloat16()}[layout]
    angles = torch.randn(2, 3, 4) * 10
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
    ref = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    out = apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.dtype == torch.float32:  # the same products and sums; a fused multiply-add may round once less
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # the bf16 cos/sin are rounded before the product
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.02, atol=0.02)


def test_yarn_softmax_scale():
    cfg = tiny_config()
    m = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(cfg.rope_scaling["factor"]) + 1
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * m * m)
    assert softmax_scale(tiny_config(rope_scaling=None)) == pytest.approx(cfg.qk_head_dim**-0.5)


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_scaled_rope_equals_builtin(kind, tmp_path):
    ours = random_model(tiny_config(max_position_embeddings=MAX_POSITIONS, rope_scaling={"type": kind, "factor": 4.0}))
    ours.save_pretrained(tmp_path)
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert builtin.config.rope_parameters["rope_type"] == kind
    for length in (10, 3 * MAX_POSITIONS):  # within and past max_position_embeddings
        ids = random_ids(ours.config, 2, length)
        torch.testing.assert_close(ours(ids).logits, builtin(ids).logits, rtol=0, atol=1e-5)
    # decoding past max_position_embeddings: dynamic RoPE grows its base at every step, in both
    prompt = random_ids(ours.config, 1, MAX_POSITIONS - 4)
    expected = builtin.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_dynamic_rope_changes_only_inputs_past_max_positions():
    scaled = random_model(tiny_config(max_position_embeddings=MAX_POSITIONS,
                                      rope_scaling={"type": "dynamic", "factor": 4.0}))
    plain = same_weights(scaled, rope_scaling=None)
    short, long = random_ids(scaled.config, 1, MAX_POSITIONS), random_ids(scaled.config, 1, 2 * MAX_POSITIONS)
    assert torch.equal(scaled(short).logits, plain(short).logits)
    assert not torch.allclose(scaled(long).logits, plain(long).logits, atol=1e-4)


def test_linear_rope_changes_every_position():
    scaled = random_model(tiny_config(max_position_embeddings=MAX_POSITIONS,
                                      rope_scaling={"type": "linear", "factor": 4.0}))
    plain = same_weights(scaled, rope_scaling=None)
    ids = random_ids(scaled.config, 1, 10)
    assert not torch.allclose(scaled(ids).logits, plain(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "new_settings",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
         "mscale_all_dim": 0.5},  # also changes the softmax scale
        {"rope_type": "default", "rope_theta": 500.0},
    ],
    ids=["linear", "dynamic", "yarn", "theta"],
)
def test_rope_settings_changed_on_a_built_model_take_effect(new_settings):
    model = random_model(tiny_config(max_position_embeddings=MAX_POSITIONS))
    ids = random_ids(model.config, 2, 2 * MAX_POSITIONS)
    before = model(ids).logits
    model.config.rope_parameters = new_settings
    after = model(ids).logits
    built_with_them = random_model(DeepseekV3Config(**model.config.to_dict()))
    built_with_them.load_state_dict(model.state_dict())
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, built_with_them(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "rope_scaling, field, rule",
    [
        ({"type": "linear"}, "rope_scaling.factor", "is required for 'linear'"),
        ({"type": "dynamic", "factor": 0.5}, "rope_scaling.factor", ">= 1"),
        ({**YARN, "attention_factor": -2.0}, "rope_scaling.attention_factor", "finite positive"),
        ({**YARN, "truncate": "no"}, "rope_scaling.truncate", "True or False"),
    ],
    ids=["linear-no-factor", "dynamic-factor-below-1", "yarn-negative-attention-factor", "yarn-truncate-not-bool"],
)
def test_invalid_rope_settings_are_refused(rope_scaling, field, rule):
    with pytest.raises(ValueError, match=rf"`{field}` = .* is invalid: .*{rule}"):
        tiny_config(rope_scaling=rope_scaling)


def test_rope_keys_a_type_does_not_read_are_ignored_with_a_warning():
    """As transformers does (it warns about unrecognized keys): the config loads, the key changes nothing."""
    logger = logging.get_logger("modeling_deepseek_v3.configuration.configuration_deepseek_v3")
    with CaptureLogger(logger) as captured:
        config = tiny_config(rope_scaling={"type": "linear", "factor": 2.0, "original_max_position_embeddings": 64})
    assert "['original_max_position_embeddings'] are not settings of 'linear' RoPE" in captured.out
    assert "they are ignored" in captured.out
    plain = tiny_config(rope_scaling={"type": "linear", "factor": 2.0})
    torch.testing.assert_close(RotaryEmbedding(config).inv_freq, RotaryEmbedding(plain).inv_freq, rtol=0, atol=0)


def test_dynamic_rope_needs_more_than_two_rope_dims():
    with pytest.raises(ValueError, match=r"`qk_rope_head_dim` = 2 is invalid: .*r / \(r - 2\)"):
        tiny_config(qk_rope_head_dim=2, rope_scaling={"type": "dynamic", "factor": 2.0})


def test_rope_settings_assigned_after_construction_are_validated():
    config = tiny_config()
    for assign, field in (
        (lambda: setattr(config, "rope_parameters", {"rope_type": "longrope", "factor": 2.0}), "rope_scaling.type"),
        (lambda: setattr(config, "rope_scaling", {"type": "yarn"}), "rope_scaling.factor"),
        (lambda: setattr(config, "rope_parameters", {"rope_type": "linear", "factor": math.nan}),
         "rope_scaling.factor"),
        (lambda: setattr(config, "rope_theta", -1.0), "rope_theta"),
    ):
        before = dict(config.rope_parameters)
        with pytest.raises(ValueError, match=rf"`{field}`"):
            assign()
        assert config.rope_parameters == before  # nothing of the refused value was kept
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0}  # rope_theta kept from before
    assert config.rope_scaling == {"type": "linear", "factor": 2.0} and config.rope_theta == 10000.0

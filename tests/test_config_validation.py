"""DeepseekV3Config refuses values that would fail or silently mislead later: NaN and infinities in float fields,
non-booleans in boolean fields, expert row widths torch's grouped GEMM cannot take."""

import math

import pytest
import torch
import torch.nn.functional as F

from .utils import random_ids, random_model, tiny_config

FLOAT_FIELDS = ["routed_scaling_factor", "rms_norm_eps", "rope_theta", "initializer_range", "attention_dropout",
                "routing_bias_update_speed", "seq_balance_loss_alpha", "mtp_loss_weight"]
ROPE_FLOAT_KEYS = ["factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings"]
BOOLEAN_FIELDS = ["attention_bias", "norm_topk_prob", "use_cache", "tie_word_embeddings", "use_routing_bias",
                  "output_router_logits", "output_hidden_states", "return_dict"]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_float_fields_must_be_finite(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` = -?(nan|inf) is invalid: must be .*(finite|probability in)"):
        tiny_config(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("key", ROPE_FLOAT_KEYS)
def test_yarn_settings_must_be_finite(key, value):
    with pytest.raises(ValueError, match=rf"`rope_scaling.{key}` = (nan|inf) is invalid: must be a finite"):
        tiny_config(rope_scaling={**YARN, key: value})


def test_attention_dropout_is_a_probability():
    with pytest.raises(ValueError, match=r"`attention_dropout` = 1.5 is invalid: must be a probability in \[0, 1\]"):
        tiny_config(attention_dropout=1.5)


@pytest.mark.parametrize("value", ["no", "False", 1, 0.0], ids=["str-no", "str-False", "int-1", "float-0"])
@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
def test_boolean_fields_must_be_bools(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` = {value!r} is invalid: must be True(, False or None| or False)"):
        tiny_config(**{field: value})


def test_attention_bias_string_builds_no_biases():
    """The reported case: `attention_bias="no"` used to build bias parameters (a non-empty string is truthy)."""
    with pytest.raises(ValueError, match="attention_bias"):
        random_model(tiny_config(attention_bias="no"))
    assert random_model(tiny_config(attention_bias=False)).model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("elements, fails", [(4, True), (8, False)], ids=["8-bytes", "16-bytes"])
def test_torch_grouped_gemm_needs_rows_of_16_bytes(elements, fails):
    """The rule behind the expert widths, found from the crash: torch's grouped GEMM refuses operands whose rows
    (the stride of their first dimension) are not a multiple of 16 bytes; in bf16 that is 8 elements."""
    x = torch.randn(6, elements, dtype=torch.bfloat16)
    w = torch.randn(2, elements, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([3, 6], dtype=torch.int32)
    if fails:
        with pytest.raises(RuntimeError, match="strides should be multiple of 16 bytes"):
            F.grouped_mm(x, w, offs=offsets)
    else:
        assert F.grouped_mm(x, w, offs=offsets).shape == (6, 8)


@pytest.mark.parametrize("field, value", [("hidden_size", 62), ("hidden_size", 60), ("moe_intermediate_size", 30),
                                          ("moe_intermediate_size", 36)])
def test_expert_widths_must_be_multiples_of_8(field, value):
    # 60 and 36 suit fp32 (4 elements = 16 bytes) but crash as soon as the model runs in bf16 or fp16
    with pytest.raises(ValueError, match=rf"`{field}` = {value} is invalid: must be a multiple of 8: .*16 bytes"):
        tiny_config(**{field: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_widths_the_rule_accepts_run_in_every_dtype(dtype):
    model = random_model(tiny_config(hidden_size=72, moe_intermediate_size=24)).to(dtype)
    ids = random_ids(model.config, 2, 5)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()  # forward and backward through the grouped GEMM
    assert torch.isfinite(loss)
    experts = model.model.layers[1].mlp.experts
    assert all(getattr(experts, name).grad.abs().sum() > 0 for name in experts.PROJECTIONS)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 1_000_000), ("num_nextn_predict_layers", 100_000),
                                          ("n_routed_experts", 1 << 20), ("vocab_size", 1 << 30)])
def test_counts_no_machine_can_build_are_refused_before_any_module(field, value, tmp_path):
    """A `config.json` with a million layers used to run out of memory while the module tree was built; it is refused
    when the config is read, naming the field (the model below is never built)."""
    import json

    from modeling_deepseek_v3 import DeepseekV3ForCausalLM

    (tmp_path / "config.json").write_text(json.dumps({**tiny_config().to_dict(), field: value}))
    with pytest.raises(ValueError, match=rf"`{field}` = {value} is invalid: must be <= \d+"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["vocab_size", "num_hidden_layers", "hidden_size"])
def test_a_count_given_as_a_string_is_named(field):
    """transformers' own validators used to fail first on `vocab_size: "12"` with a bare comparison error."""
    with pytest.raises(ValueError, match=rf"`{field}` = '12' is invalid: must be a positive integer"):
        tiny_config(**{field: "12"})


@pytest.mark.parametrize("text, kind", [("[1, 2]", "an array"), ('"deepseek_v3"', "a string")])
def test_a_config_json_that_is_no_object_is_named(tmp_path, text, kind):
    """Its construction failed with a bare TypeError ("argument after ** must be a mapping")."""
    from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    (tmp_path / "config.json").write_text(text)
    for load in (DeepseekV3Config.from_pretrained, DeepseekV3ForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=rf"config.json must hold a JSON object of settings, not {kind}"):
            load(tmp_path)

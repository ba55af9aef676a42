"""DeepseekV3Config: the official 671B config loads and saves with the same meaning; presets; every rule."""

import json
from importlib import resources

import pytest
from transformers import AutoConfig, PreTrainedConfig
from transformers import DeepseekV3Config as BuiltinDeepseekV3Config

from modeling_deepseek_v3 import PRESET_NAMES, DeepseekV3Config, load_preset

from .utils import tiny_config


def official_json() -> dict:
    path = resources.files("modeling_deepseek_v3.configuration").joinpath("presets", "deepseek-v3-671b.json")
    return json.loads(path.read_text())


def test_official_config_loads_unchanged_and_saves_the_same_meaning(tmp_path):
    original = official_json()
    (tmp_path / "config.json").write_text(json.dumps(original))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is DeepseekV3Config
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 40
    assert config.fp8_quantization_config == original["quantization_config"]
    assert not hasattr(config, "quantization_config")  # hidden from transformers' FineGrainedFP8 quantizer
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    ignored = {"torch_dtype", "dtype", "transformers_version", "rope_theta", "rope_scaling"}
    for key, value in original.items():
        if key not in ignored:
            assert saved[key] == value, key
    # the base moves inside rope_scaling: transformers' generic config class cannot read it beside YaRN settings
    assert "rope_theta" not in saved
    assert saved["rope_scaling"] == {**original["rope_scaling"], "rope_theta": original["rope_theta"]}
    assert saved["dtype"] == "bfloat16"
    # the built-in config class (and so vLLM / SGLang style readers of rope_scaling) reads it the same way
    builtin = BuiltinDeepseekV3Config.from_pretrained(tmp_path / "saved")
    assert builtin.rope_parameters["factor"] == 40 and builtin.rope_parameters["rope_type"] == "yarn"


def test_bench_preset_has_its_documented_shape():
    c = load_preset("bench")
    got = {k: getattr(c, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "first_k_dense_replace",
        "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts",
        "moe_intermediate_size", "max_position_embeddings", "num_nextn_predict_layers")}
    assert got == dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        moe_intermediate_size=256, max_position_embeddings=8192, num_nextn_predict_layers=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_load_and_round_trip(name, tmp_path):
    config = load_preset(name)
    config.save_pretrained(tmp_path)
    back = DeepseekV3Config.from_pretrained(tmp_path)
    assert back.to_dict() == config.to_dict()


@pytest.mark.parametrize("overrides", [{}, {"rope_scaling": None, "rope_theta": 5e4},
                                       {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e4}],
                         ids=["yarn", "no-scaling", "linear"])
def test_saved_config_is_read_by_the_generic_config_class(tmp_path, overrides):
    """Trainer reads a checkpoint's config.json with `PreTrainedConfig.from_json_file` when it resumes; a top-level
    `rope_theta` next to YaRN settings made that fail (AttributeError on max_position_embeddings)."""
    config = tiny_config(**overrides)
    config.save_pretrained(tmp_path)
    generic = PreTrainedConfig.from_json_file(tmp_path / "config.json")
    assert generic.max_position_embeddings == config.max_position_embeddings
    builtin = BuiltinDeepseekV3Config.from_pretrained(tmp_path)
    assert builtin.rope_parameters["rope_theta"] == config.rope_theta
    assert builtin.rope_parameters["rope_type"] == config.rope_parameters["rope_type"]
    assert DeepseekV3Config.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


def test_rope_theta_given_twice_must_agree():
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert tiny_config(rope_theta=None, rope_scaling={**scaling, "rope_theta": 500.0}).rope_theta == 500.0
    assert tiny_config(rope_theta=500.0, rope_scaling={**scaling, "rope_theta": 500.0}).rope_theta == 500.0
    with pytest.raises(ValueError, match=r"`rope_theta` = 4.0 is invalid: differs from rope_scaling.rope_theta = 3.0"):
        tiny_config(rope_theta=4.0, rope_scaling={**scaling, "rope_theta": 3.0})


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset 'huge' is unknown"):
        load_preset("huge")


def test_transformers_rope_parameters_form_is_read():
    c = DeepseekV3Config(**{**tiny_config().to_dict(), "rope_scaling": None, "rope_theta": 1.0,
                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.0,
                                                "original_max_position_embeddings": 32}})
    assert c.rope_theta == 500.0 and c.rope_scaling == {"factor": 2.0, "original_max_position_embeddings": 32,
                                                        "type": "yarn"}


def test_rope_settings_have_one_source():
    c = tiny_config()
    c.rope_theta = 5e4
    assert c.rope_parameters["rope_theta"] == 5e4 and c.to_dict()["rope_scaling"]["rope_theta"] == 5e4
    c.rope_scaling = None
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 5e4}
    assert c.to_dict()["rope_scaling"] is None and c.to_dict()["rope_theta"] == 5e4


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
RULES = [
    ({"hidden_size": 0}, "hidden_size", "positive integer"),
    ({"vocab_size": -3}, "vocab_size", "positive integer"),
    ({"num_attention_heads": 2.5}, "num_attention_heads", "positive integer"),
    ({"kv_lora_rank": 0}, "kv_lora_rank", "positive integer"),
    ({"n_shared_experts": -1}, "n_shared_experts", "non-negative"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers", "non-negative"),
    ({"q_lora_rank": 0}, "q_lora_rank", "positive integer, or None"),
    ({"num_key_value_heads": 2}, "num_key_value_heads", "must equal num_attention_heads"),
    ({"n_group": 3}, "n_group", "must divide n_routed_experts"),
    ({"n_group": 8, "topk_group": 2}, "n_group", "at least 2 experts"),
    ({"topk_group": 5}, "topk_group", "<= n_group"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok", "topk_group \\* n_routed_experts / n_group = 4"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace", "<= num_hidden_layers"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim", "even"),
    ({"scoring_func": "relu"}, "scoring_func", "one of"),
    ({"topk_method": "greedy"}, "topk_method", "one of"),
    ({"hidden_act": "gelu"}, "hidden_act", "silu"),
    ({"mla_attention_path": "fast"}, "mla_attention_path", "one of"),
    ({"routing_bias_update_speed": -0.1}, "routing_bias_update_speed", "non-negative"),
    ({"seq_balance_loss_alpha": -1}, "seq_balance_loss_alpha", "non-negative"),
    ({"mtp_loss_weight": -0.3}, "mtp_loss_weight", "non-negative"),
    ({"use_mtp_modules": "yes"}, "use_mtp_modules", "True or False"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor", "positive"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "positive"),
    ({"rope_theta": -1}, "rope_theta", "positive"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type", "one of"),
    ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor", "required"),
    ({"rope_scaling": {**YARN, "beta_fast": -1}}, "rope_scaling.beta_fast", "positive"),
    ({"rope_scaling": {**YARN, "factor": 0.5}}, "rope_scaling.factor", ">= 1"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method", "fp8"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config.fmt", "e4m3"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 0]}},
     "quantization_config.weight_block_size", "two positive integers"),
    ({"quantization_config": {"quant_method": "fp8", "modules_to_not_convert": ["lm_head", "o_proj"]}},
     "quantization_config.modules_to_not_convert", "not supported"),
    ({"quantization_config": {"quant_method": "fp8", "scale_fmt": "e8m0"}}, "quantization_config.scale_fmt", "ue8m0"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "quantization_config.activation_scheme", "dynamic"),
]


@pytest.mark.parametrize("overrides, field, rule", RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(RULES)])
def test_every_validation_rule_names_field_value_and_rule(overrides, field, rule):
    with pytest.raises(ValueError, match=rf"`{field}` = .* is invalid: .*{rule}"):
        tiny_config(**overrides)

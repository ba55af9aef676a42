"""Official-format FP8 checkpoints: they load on CPU with FP8 weights kept in memory, compute exactly what the same
checkpoint dequantised to fp32 computes, and save back to the same bytes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.fp8 import FP8Linear

from ..utils import QUANTIZATION, SHAPE, e4m3_value, random_ids, random_model, tiny_config, weight_blocks


def is_quantized(key: str, tensor: torch.Tensor) -> bool:
    """Which tensors the official release stores in FP8: the decoder layers' projections, not the router."""
    return key.startswith("model.layers.") and tensor.dim() == 2 and not key.endswith("mlp.gate.weight")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An official-format FP8 checkpoint and the same checkpoint dequantised to fp32."""
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("fp8")
    model = random_model(tiny_config(**SHAPE))
    model.save_pretrained(root / "source")
    config = json.loads((root / "source" / "config.json").read_text())
    fp8, dequantized = {}, {}
    for key, tensor in load_file(root / "source" / "model.safetensors").items():
        if is_quantized(key, tensor):
            q, s = weight_blocks(tensor)  # the test's quantiser, from the format's definition
            fp8[key], fp8[f"{key}_scale_inv"] = q, s
            dequantized[key] = e4m3_value(q, s, (128, 128)).float()
        else:
            fp8[key] = dequantized[key] = tensor
    for name, state, extra in (("fp8", fp8, {"quantization_config": QUANTIZATION}), ("dequantized", dequantized, {})):
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({**config, **extra}))
    return root


def test_loads_on_cpu_with_fp8_weights_in_memory(folders):
    model = DeepseekV3ForCausalLM.from_pretrained(folders / "fp8", dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None  # transformers' FineGrainedFP8 quantizer never ran
    attn = model.model.layers[0].self_attn
    assert type(attn.kv_a_proj_with_mqa) is FP8Linear and attn.kv_a_proj_with_mqa.weight.dtype == torch.float8_e4m3fn
    assert attn.kv_a_proj_with_mqa.weight_scale_inv.shape == (2, 2)  # 144 rows: one full and one partial block
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_proj.dtype == torch.float8_e4m3fn and experts.gate_proj_scale_inv.shape == (4, 2, 2)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays unquantised
    assert model.config.fp8_quantization_config == QUANTIZATION


def test_logits_equal_the_dequantized_checkpoint(folders):
    fp8 = DeepseekV3ForCausalLM.from_pretrained(folders / "fp8", dtype=torch.float32)
    ref = DeepseekV3ForCausalLM.from_pretrained(folders / "dequantized", dtype=torch.float32)
    ids = random_ids(fp8.config, 2, 12)
    torch.testing.assert_close(fp8(ids).logits, ref(ids).logits, rtol=0, atol=1e-4)
    # decoding: the absorbed path reads the dequantised kv_b_proj
    assert torch.equal(fp8.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_fp8_model_takes_about_half_the_bytes_of_bf16(folders):
    fp8 = DeepseekV3ForCausalLM.from_pretrained(folders / "fp8", dtype=torch.bfloat16)
    bf16 = DeepseekV3ForCausalLM.from_pretrained(folders / "dequantized", dtype=torch.bfloat16)

    def layer_bytes(model):
        return sum(t.nbytes for n, t in model.state_dict().items() if n.startswith("model.layers."))

    ratio = layer_bytes(fp8) / layer_bytes(bf16)
    assert 0.5 <= ratio < 0.6, ratio  # 1 byte per weight + one fp32 scale per 128×128 block (+ norms, router)


def test_save_writes_the_same_fp8_checkpoint(folders, tmp_path):
    DeepseekV3ForCausalLM.from_pretrained(folders / "fp8").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == QUANTIZATION
    original = load_file(folders / "fp8" / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(original)
        for key, tensor in original.items():
            again = f.get_tensor(key)
            assert again.dtype == tensor.dtype, key
            assert torch.equal(again.view(torch.uint8), tensor.view(torch.uint8)), key


def test_random_init_of_an_fp8_model():
    model = DeepseekV3ForCausalLM(tiny_config(**SHAPE, quantization_config=QUANTIZATION))
    proj = model.model.layers[0].self_attn.q_b_proj
    w = proj.dequantize(torch.float32)
    assert torch.isfinite(w).all() and 0.01 < w.std() < 0.04  # N(0, 0.02²) through FP8
    assert torch.isfinite(model(random_ids(model.config, 1, 5)).logits).all()


def test_casting_an_fp8_model_keeps_fp8_weights_and_fp32_scales():
    model = DeepseekV3ForCausalLM(tiny_config(**SHAPE, quantization_config=QUANTIZATION))
    ids = random_ids(model.config, 1, 5)
    expected = model(ids).logits
    model.to(torch.bfloat16)
    proj, experts = model.model.layers[0].self_attn.q_b_proj, model.model.layers[1].mlp.experts
    assert proj.weight.dtype == experts.up_proj.dtype == torch.float8_e4m3fn
    assert proj.weight_scale_inv.dtype == experts.up_proj_scale_inv.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model(ids).logits.float(), expected, rtol=0, atol=2e-2)  # bf16 rounding


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_a_missing_scale_is_an_error(folders, tmp_path, ignore_mismatched_sizes):
    state = load_file(folders / "fp8" / "model.safetensors")
    del state["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folders / "fp8" / "config.json").read_text())
    with pytest.raises(ValueError, match="kv_b_proj but not its weight_scale_inv"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=ignore_mismatched_sizes)

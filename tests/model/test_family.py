"""Every released member of the DeepSeek-V3 family, at test size: its checkpoint, in its release format, loads through
the Auto classes and computes what DeepSeek's own inference code computes from it.

The fixtures under tests/fixtures/family/ (made by its `make_fixtures.py` from the `tiny-*` presets) hold, per member,
the checkpoint (FP8 e4m3 with 128×128 blocks and partial edge blocks where the release is FP8, power-of-two scales
for V3.1, bf16 otherwise; MTP weights where the release has them) and the fp32 logits of DeepSeek's V3 inference code
for a prompt and four greedy decode steps."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, KimiK2Config, load_preset
from modeling_deepseek_v3.convert import convert_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "family"
MEMBERS = ("tiny-deepseek-v3", "tiny-deepseek-v3-bf16", "tiny-deepseek-v3.1", "tiny-kimi-k2", "tiny-kimi-k2-0905",
           "tiny-moonlight")
ATOL = 1e-5  # fp32 on both sides: the same formulas, summed in other orders


def load(member: str, **kwargs) -> DeepseekV3ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(FIXTURES / member, dtype=torch.float32, **kwargs).eval()


def reference(member: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / member / "reference.safetensors")


def release_config(member: str) -> dict:
    return json.loads((FIXTURES / member / "config.json").read_text())


@pytest.mark.parametrize("member", MEMBERS)
def test_logits_equal_deepseeks_inference_code(member):
    model, ref = load(member), reference(member)
    assert type(model) is DeepseekV3ForCausalLM
    with torch.no_grad():
        logits = model(ref["prompt"][None]).logits[0]
    torch.testing.assert_close(logits, ref["prefill_logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("member", MEMBERS)
def test_greedy_decoding_equals_deepseeks_and_the_expanded_path(member):
    """Decode steps over our latent cache (absorbed attention) against DeepSeek's absorbed decode; the tokens equal
    those of the expanded attention path too."""
    ref = reference(member)
    steps = len(ref["decode_tokens"])
    out = load(member).generate(ref["prompt"][None], max_new_tokens=steps + 1, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    new = out.sequences[0, len(ref["prompt"]):]
    assert new[:steps].tolist() == ref["decode_tokens"].tolist()
    assert new[steps] == ref["decode_logits"][-1].argmax()
    torch.testing.assert_close(torch.stack(out.logits[1:])[:, 0], ref["decode_logits"], rtol=0, atol=ATOL)
    expanded = load(member, mla_attention_path="expanded").generate(ref["prompt"][None], max_new_tokens=steps + 1,
                                                                    do_sample=False)
    assert expanded.tolist() == out.sequences.tolist()


@pytest.mark.parametrize("member", MEMBERS)
def test_save_keeps_the_release_format_and_reloads_to_the_same_logits(member, tmp_path):
    model, ref = load(member), reference(member)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    release = release_config(member)
    for key in ("model_type", "architectures", "quantization_config", "q_lora_rank", "n_group", "rms_norm_eps"):
        assert saved.get(key) == release.get(key), key
    rope = dict(saved["rope_scaling"] or {})  # rope_theta is written inside rope_scaling when there is one
    assert (rope.pop("rope_theta", saved.get("rope_theta")), rope or None) == (release["rope_theta"],
                                                                              release["rope_scaling"])
    with safe_open(FIXTURES / member / "model.safetensors", "pt") as a, safe_open(tmp_path / "model.safetensors",
                                                                                 "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # FP8 payloads and their scales written back byte for byte
            if key.endswith("_scale_inv") or a.get_slice(key).get_dtype() == "F8_E4M3":
                assert torch.equal(a.get_tensor(key).view(torch.uint8) if key.endswith("weight") else
                                   a.get_tensor(key), b.get_tensor(key).view(torch.uint8) if key.endswith("weight")
                                   else b.get_tensor(key)), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ref["prompt"][None]).logits[0], ref["prefill_logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("member", MEMBERS)
def test_a_training_step_with_the_full_recipe(member, tmp_path):
    """One optimizer step from the member's weights (an FP8 release converted to bf16 first, as one fine-tunes it):
    the MTP loss where the release has MTP modules and none where it has not, the sequence-wise balance loss, every
    parameter receives a gradient, and the routing biases move."""
    folder = FIXTURES / member
    if "quantization_config" in release_config(member):
        folder = convert_checkpoint(folder, tmp_path / "bf16", "fp8-to-bf16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ids = reference(member)["prompt"][None].repeat(2, 1)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert (out.mtp_losses is not None) == (model.config.num_nextn_predict_layers > 0)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    moved = [n for n, b in model.named_buffers() if n in biases and not torch.equal(b, biases[n])]
    assert moved == list(biases)


def test_kimi_k2_loads_by_its_own_model_type_and_keeps_it():
    config = AutoConfig.from_pretrained(FIXTURES / "tiny-kimi-k2")
    assert type(config) is KimiK2Config and config.model_type == "kimi_k2"
    assert config.to_dict()["model_type"] == "kimi_k2"
    # loaded through the class directly, the config is still Kimi-K2's
    assert type(DeepseekV3ForCausalLM.from_pretrained(FIXTURES / "tiny-kimi-k2").config) is KimiK2Config


def test_v31_scales_are_powers_of_two_and_dequantise_exactly():
    """V3.1's ue8m0 scales load as stored: the dequantised weight is payload × scale, computed here by hand."""
    model = load("tiny-deepseek-v3.1")
    with safe_open(FIXTURES / "tiny-deepseek-v3.1" / "model.safetensors", "pt") as f:
        key = "model.layers.0.mlp.gate_proj.weight"  # 192 × 160: a partial block in both directions
        payload, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    by_hand = payload.float() * scale.repeat_interleave(128, 0)[:192].repeat_interleave(128, 1)[:, :160]
    assert torch.equal(model.model.layers[0].mlp.gate_proj.dequantize(torch.float32), by_hand)
    assert model.model.layers[0].mlp.gate_proj.scale_fmt == "ue8m0"  # activations quantised the same way on CUDA


def test_unimplemented_weight_formats_are_refused_before_any_weight_is_read(tmp_path):
    """Kimi-K2-Thinking's INT4 (compressed-tensors) checkpoint: refused when its config is read, naming the format and
    what is supported; the weight file here is not even a safetensors file."""
    config = release_config("tiny-kimi-k2")
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"quant_method.*'compressed-tensors'.*not implemented.*'fp8'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_release_presets_have_the_published_sizes():
    """The shipped configs of the releases build models of the sizes their authors publish (on the meta device)."""
    def main_model_parameters(name: str) -> int:
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(load_preset(name))
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))

    assert abs(main_model_parameters("deepseek-v3-671b") / 671e9 - 1) < 0.005  # "671B main model weights"
    assert 1.0e12 < main_model_parameters("kimi-k2") < 1.05e12  # "1 trillion total parameters"
    assert abs(main_model_parameters("moonlight-16b-a3b") / 16e9 - 1) < 0.01  # "16B total parameters"

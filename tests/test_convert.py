"""`deepseek-v3 convert`: FP8 <-> bf16 checkpoint conversion, shard by shard, all or nothing."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3 import convert as convert_module
from modeling_deepseek_v3.cli import main
from modeling_deepseek_v3.convert import convert_checkpoint

from .test_fp8_checkpoint import SHAPE
from .utils import random_ids, random_model, tiny_config


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("convert") / "bf16"
    random_model(tiny_config(**SHAPE)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    (folder / "tokenizer.json").write_text('{"stand-in": "tokenizer"}')
    return folder


def test_bf16_to_fp8_to_bf16_to_fp8(bf16_folder, tmp_path):
    assert len(list(bf16_folder.glob("*.safetensors"))) > 1  # several shards, with an index
    fp8 = convert_checkpoint(bf16_folder, tmp_path / "fp8", "bf16-to-fp8")
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (fp8 / "tokenizer.json").read_text() == (bf16_folder / "tokenizer.json").read_text()
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    first = tensors(fp8)
    assert set(index["weight_map"]) == set(first)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert first[key].dtype == torch.float8_e4m3fn and f"{key}_scale_inv" in first
    assert first["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router is not quantised

    original = DeepseekV3ForCausalLM.from_pretrained(bf16_folder, dtype=torch.float32)
    quantised = DeepseekV3ForCausalLM.from_pretrained(fp8, dtype=torch.float32)
    ids = random_ids(original.config, 2, 10)
    a, b = quantised(ids).logits, original(ids).logits
    assert ((a - b).norm() / b.norm()) < 0.1  # only the weights changed, each by FP8 rounding (~4%)

    back = convert_checkpoint(fp8, tmp_path / "bf16", "fp8-to-bf16")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(back, dtype=torch.float32)  # a clean bf16 checkpoint
    ours = DeepseekV3ForCausalLM.from_pretrained(back, dtype=torch.float32)
    torch.testing.assert_close(builtin(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours(ids).logits, a, rtol=0, atol=1e-2)  # q·s rounded to bf16

    again = tensors(convert_checkpoint(back, tmp_path / "fp8-again", "bf16-to-fp8"))
    assert set(again) == set(first)
    for name, tensor in first.items():  # payloads and scales reproduced bit for bit
        assert torch.equal(again[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_interrupted_conversion_leaves_nothing(bf16_folder, tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(tensors, path, metadata=metadata)

    real_save = convert_module.save_file
    monkeypatch.setattr(convert_module, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(bf16_folder, tmp_path / "fp8", "bf16-to-fp8")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(bf16_folder, tmp_path):
    with pytest.raises(ValueError, match="no FP8 quantization_config"):
        convert_checkpoint(bf16_folder, tmp_path / "x", "fp8-to-bf16")
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint(bf16_folder, bf16_folder, "bf16-to-fp8")
    with pytest.raises(ValueError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "y", "bf16-to-fp8")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "fp8-to-bf16", str(bf16_folder), str(tmp_path / "z")])
    assert exit_info.value.code == 2


def test_cli_convert(bf16_folder, tmp_path, capsys):
    assert main(["convert", "bf16-to-fp8", str(bf16_folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and "wrote" in capsys.readouterr().out


def test_fp8_from_fp32_weights_keeps_payloads_through_bf16(tmp_path):
    """A checkpoint quantised from fp32 master weights: bf16 cannot carry its scales exactly, so payloads come back
    bit for bit and scales within one bf16 rounding (documented in convert.py)."""
    from safetensors.torch import save_file

    from modeling_deepseek_v3.kernels import weight_quant_ref

    torch.manual_seed(5)
    src = tmp_path / "fp8"
    src.mkdir()
    q, s = weight_quant_ref(torch.randn(256, 384) * 0.02)  # fp32 amax: scales not derived from bf16 values
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.layers.0.mlp.down_proj.weight_scale_inv": s},
              src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": [128, 128]}}))
    (src / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    back = convert_checkpoint(src, tmp_path / "bf16", "fp8-to-bf16")
    assert not (back / "pytorch_model.bin").exists()  # weights in other formats are not copied
    again = tensors(convert_checkpoint(back, tmp_path / "fp8-again", "bf16-to-fp8"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(again[key].view(torch.uint8), q.view(torch.uint8))
    assert ((again[f"{key}_scale_inv"] - s).abs() <= s * 2**-8).all()  # one bf16 step

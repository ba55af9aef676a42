"""`deepseek-v3 convert`: FP8 <-> bf16 checkpoint conversion, shard by shard, all or nothing; every flaw of the
source folder is a clear error before anything is written, and the CLI reports it in one line."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3 import convert as convert_module
from modeling_deepseek_v3.convert import OFFICIAL_QUANTIZATION as QUANTIZATION
from modeling_deepseek_v3.convert import convert_checkpoint
from modeling_deepseek_v3_cli import main

from ..utils import SHAPE, e4m3_value, random_ids, random_model, tiny_config, weight_blocks


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


def test_bad_arguments(bf16_folder, tmp_path, capsys):
    with pytest.raises(ValueError, match="no FP8 quantization_config"):
        convert_checkpoint(bf16_folder, tmp_path / "x", "fp8-to-bf16")
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint(bf16_folder, bf16_folder, "bf16-to-fp8")
    with pytest.raises(ValueError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "y", "bf16-to-fp8")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "fp8-to-bf16", str(bf16_folder), str(tmp_path / "z")])
    assert exit_info.value.code == 2 and "no FP8 quantization_config" in capsys.readouterr().err


def test_cli_convert(bf16_folder, tmp_path, capsys):
    assert main(["convert", "bf16-to-fp8", str(bf16_folder), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and "wrote" in capsys.readouterr().out


def test_fp8_from_fp32_weights_keeps_payloads_through_bf16(tmp_path):
    """A checkpoint quantised from fp32 master weights: bf16 cannot carry its scales exactly, so payloads come back
    bit for bit and scales within one bf16 rounding (documented in convert.py)."""
    torch.manual_seed(5)
    src = tmp_path / "fp8"
    src.mkdir()
    q, s = weight_blocks(torch.randn(256, 384) * 0.02)  # fp32 amax: scales not derived from bf16 values
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.layers.0.mlp.down_proj.weight_scale_inv": s},
              src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": 256,
                                                 "intermediate_size": 384,  # the sizes of the one stored weight
                                                 "quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": [128, 128]}}))
    (src / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    back = convert_checkpoint(src, tmp_path / "bf16", "fp8-to-bf16")
    assert not (back / "pytorch_model.bin").exists()  # weights in other formats are not copied
    again = tensors(convert_checkpoint(back, tmp_path / "fp8-again", "bf16-to-fp8"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(again[key].view(torch.uint8), q.view(torch.uint8))
    assert ((again[f"{key}_scale_inv"] - s).abs() <= s * 2**-8).all()  # one bf16 step


@pytest.fixture(scope="module")
def fp8_folder(bf16_folder, tmp_path_factory):
    return convert_checkpoint(bf16_folder, tmp_path_factory.mktemp("fp8-source") / "fp8", "bf16-to-fp8")


def shard_of(folder, key: str):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def edit_tensors(path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


PROJECTION = "model.layers.1.self_attn.q_b_proj.weight"


def bf16_payload(src):
    def edit(state):
        scale = load_file(shard_of(src, PROJECTION + "_scale_inv"))[PROJECTION + "_scale_inv"]
        state[PROJECTION] = e4m3_value(state[PROJECTION], scale, (128, 128)).bfloat16()
    edit_tensors(shard_of(src, PROJECTION), edit)


def gpt2_folder(src):
    shutil.rmtree(src)
    src.mkdir()
    save_file({"h.0.attn.c_attn.weight": torch.randn(64, 192), "wte.weight": torch.randn(100, 64)},
              src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 1}))


def another_models_single_file(src):
    save_file({"other.weight": torch.zeros(2)}, src / "model.safetensors", metadata={"format": "pt"})


def deleted_shard(src):
    shard_of(src, PROJECTION).unlink()


def unlisted_shard(src):
    save_file({"extra.weight": torch.zeros(2)}, src / "model-00099-of-00099.safetensors", metadata={"format": "pt"})


def key_missing_from_index(src):
    edit_json(src / "model.safetensors.index.json", lambda index: index["weight_map"].pop(PROJECTION))


def shard_outside_folder(src):
    edit_json(src / "model.safetensors.index.json",
              lambda index: index["weight_map"].update({PROJECTION: "../elsewhere.safetensors"}))


def missing_scale(src):
    edit_tensors(shard_of(src, PROJECTION + "_scale_inv"), lambda state: state.pop(PROJECTION + "_scale_inv"))
    edit_json(src / "model.safetensors.index.json", lambda index: index["weight_map"].pop(PROJECTION + "_scale_inv"))


def scale_edit(edit):
    """A source broken by `edit(scale)` -> new scale tensor, applied to PROJECTION's block scale."""
    def break_source(src):
        key = PROJECTION + "_scale_inv"
        edit_tensors(shard_of(src, key), lambda state: state.update({key: edit(state[key])}))
    break_source.__name__ = edit.__name__
    return break_source


def nan_scale(scale):
    return scale.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan")))


def inf_scale(scale):
    return scale.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf")))


def int32_scale(scale):
    return scale.to(torch.int32)


def e4m3_scale(scale):
    return scale.to(torch.float8_e4m3fn)


def nan_payload_byte(src):
    def edit(state):
        raw = state[PROJECTION].view(torch.uint8).clone()
        raw[0, 0] = 0x7F  # e4m3's NaN
        state[PROJECTION] = raw.view(torch.float8_e4m3fn)
    edit_tensors(shard_of(src, PROJECTION), edit)


def orphan_scale(src):
    key = "model.layers.1.mlp.lost.weight_scale_inv"
    edit_tensors(shard_of(src, PROJECTION), lambda state: state.update({key: torch.ones(1, 1)}))
    edit_json(src / "model.safetensors.index.json",
              lambda index: index["weight_map"].update({key: index["weight_map"][PROJECTION]}))


def nan_bf16_weight(src):
    def edit(state):
        state[PROJECTION] = state[PROJECTION].clone()
        state[PROJECTION][1, 2] = float("nan")
    edit_tensors(shard_of(src, PROJECTION), edit)


BAD_FP8_NUMBERS = [
    # (how an FP8 source is broken, error message pattern): refused by the loader and by the converter
    (scale_edit(nan_scale), rf"{PROJECTION}_scale_inv \(in .*\) holds 1 NaN or infinite values"),
    (scale_edit(inf_scale), rf"{PROJECTION}_scale_inv \(in .*\) holds 1 NaN or infinite values"),
    (nan_payload_byte, rf"{PROJECTION} \(in .*\) holds 1 NaN or infinite values"),
    (scale_edit(int32_scale), rf"{PROJECTION}_scale_inv \(in .*\) is stored as I32; block scales must be F32 or BF16"),
    (scale_edit(e4m3_scale), rf"{PROJECTION}_scale_inv \(in .*\) is stored as F8_E4M3; block scales must be"),
    (orphan_scale, r"model.layers.1.mlp.lost.weight_scale_inv \(in .*\) is a block scale without its weight"),
]


def config_of_another_size(src):
    edit_json(src / "config.json", lambda config: config.update(moe_intermediate_size=144))


def block_size_mismatch(src):
    edit_json(src / "config.json", lambda config: config["quantization_config"].update(weight_block_size=[64, 64]))


def e5m2_format_in_config(src):
    edit_json(src / "config.json", lambda config: config["quantization_config"].update(fmt="e5m2"))


def config_not_json(src):
    (src / "config.json").write_text("{'model_type': deepseek_v3")


BROKEN_SOURCES = [
    # (how the copy of a good source is broken, source, direction, error message pattern)
    (bf16_payload, "fp8", "fp8-to-bf16", rf"{PROJECTION} is stored as BF16 next to its {PROJECTION}_scale_inv"),
    (gpt2_folder, "bf16", "bf16-to-fp8", r"config.json has model_type 'gpt2'; only checkpoints of the DeepSeek"),
    (gpt2_folder, "bf16", "fp8-to-bf16", r"config.json has model_type 'gpt2'"),
    (another_models_single_file, "bf16", "bf16-to-fp8", r"holds both model.safetensors and model.safetensors.index"),
    (deleted_shard, "bf16", "bf16-to-fp8", r"lists the shard model-0000\d-of-0000\d.safetensors, which does not exist"),
    (unlisted_shard, "bf16", "bf16-to-fp8", r"model-00099-of-00099.safetensors is not listed in .*index.json"),
    (key_missing_from_index, "bf16", "bf16-to-fp8", rf"{PROJECTION} is stored in model-\d+-of-\d+.safetensors but "
                                                    r"model.safetensors.index.json does not list it"),
    (shard_outside_folder, "bf16", "bf16-to-fp8", r"lists the shard '../elsewhere.safetensors', which is not inside"),
    (missing_scale, "fp8", "fp8-to-bf16", rf"{PROJECTION} is FP8 \(F8_E4M3\) but the checkpoint has no "
                                          rf"{PROJECTION}_scale_inv"),
    (block_size_mismatch, "fp8", "fp8-to-bf16", r"_scale_inv has shape \[\d+, \d+\], but .* in the "
                                                r"weight_block_size \[64, 64\] of config.json needs \[\d+, \d+\]"),
    (e5m2_format_in_config, "fp8", "fp8-to-bf16", r"config.json: DeepseekV3Config: `quantization_config.fmt` = 'e5m2'"),
    (config_not_json, "bf16", "bf16-to-fp8", r"config.json is not valid JSON"),
    (nan_bf16_weight, "bf16", "bf16-to-fp8", rf"{PROJECTION} \(in .*\) holds 1 NaN or infinite values"),
    (config_of_another_size, "bf16", "bf16-to-fp8", r"model.layers.1.mlp.experts.0.down_proj.weight has shape "
                                                    r"\[192, 136\] in .*, but the sizes in .*config.json give it "
                                                    r"\[192, 144\]"),
    (config_of_another_size, "fp8", "fp8-to-bf16", r"has shape .* but the sizes in .*config.json give it"),
    *((break_source, "fp8", "fp8-to-bf16", match) for break_source, match in BAD_FP8_NUMBERS),
]


@pytest.mark.parametrize("break_source, source, direction, match", BROKEN_SOURCES,
                         ids=[f"{case[0].__name__}-{case[2]}" for case in BROKEN_SOURCES])
def test_a_flawed_source_is_a_clear_error_and_one_cli_line(
    break_source, source, direction, match, bf16_folder, fp8_folder, tmp_path, capsys
):
    src = tmp_path / "src"
    shutil.copytree(bf16_folder if source == "bf16" else fp8_folder, src)
    break_source(src)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(src, tmp_path / "out", direction)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", direction, str(src), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # a flaw found in a payload comes after the progress bar of the shards before it
    assert err.endswith("\n") and err.splitlines()[-1].startswith("deepseek-v3 convert: error: ")
    assert err.count("deepseek-v3 convert: error: ") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, nothing left


def test_an_uncreatable_destination_is_one_cli_line(bf16_folder, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"cannot create .*a-file/out"):
        convert_checkpoint(bf16_folder, tmp_path / "a-file" / "out", "bf16-to-fp8")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "bf16-to-fp8", str(bf16_folder), str(tmp_path / "a-file" / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "cannot create" in err


def test_e5m2_payloads_are_dequantised_exactly(tmp_path):
    """A weight stored in e5m2 with its block scales: `q · s` in bf16, and the scale is not left behind."""
    torch.manual_seed(6)
    src = tmp_path / "fp8"
    src.mkdir()
    key = "model.layers.0.mlp.down_proj.weight"
    q = (torch.randn(256, 200) * 4).to(torch.float8_e5m2)
    s = torch.rand(2, 2) + 0.5
    save_file({key: q, f"{key}_scale_inv": s}, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": 256,
                                                 "intermediate_size": 200, "quantization_config": QUANTIZATION}))
    out = tensors(convert_checkpoint(src, tmp_path / "bf16", "fp8-to-bf16"))
    assert set(out) == {key}
    assert torch.equal(out[key].float(), (q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :200])
                       .to(torch.bfloat16).float())


def test_shards_and_files_in_subfolders(bf16_folder, tmp_path):
    """An index may keep its shards in a subfolder (transformers loads them); other subfolders (code, figures) are
    copied, hidden ones are not."""
    src = tmp_path / "src"
    shutil.copytree(bf16_folder, src)
    (src / "weights").mkdir()
    for shard in src.glob("*.safetensors"):
        shard.rename(src / "weights" / shard.name)
    edit_json(src / "model.safetensors.index.json",
              lambda index: index.update(weight_map={k: f"weights/{v}" for k, v in index["weight_map"].items()}))
    (src / "inference").mkdir()
    (src / "inference" / "model.py").write_text("# reference code\n")
    (src / ".cache").mkdir()
    (src / ".cache" / "download.lock").write_text("")
    out = convert_checkpoint(src, tmp_path / "fp8", "bf16-to-fp8")
    assert (out / "inference" / "model.py").read_text() == "# reference code\n"
    assert not (out / ".cache").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(shard.startswith("weights/") and (out / shard).is_file() for shard in index["weight_map"].values())
    ids = random_ids(tiny_config(**SHAPE), 1, 6)
    direct = DeepseekV3ForCausalLM.from_pretrained(convert_checkpoint(bf16_folder, tmp_path / "direct", "bf16-to-fp8"))
    torch.testing.assert_close(DeepseekV3ForCausalLM.from_pretrained(out)(ids).logits, direct(ids).logits,
                               rtol=0, atol=0)


@pytest.mark.parametrize("break_source, match", BAD_FP8_NUMBERS, ids=[case[0].__name__ for case in BAD_FP8_NUMBERS])
def test_bad_fp8_numbers_are_refused_by_the_loader(break_source, match, fp8_folder, tmp_path):
    """The loader applies the converter's rules to block scales and payloads: before, a NaN or infinite scale or a
    NaN payload byte loaded silently (NaN logits), and an int32 or e4m3 scale was truncated or rounded."""
    src = tmp_path / "src"
    shutil.copytree(fp8_folder, src)
    DeepseekV3ForCausalLM.from_pretrained(src)  # the intact copy loads
    break_source(src)
    with pytest.raises(ValueError, match=match):
        DeepseekV3ForCausalLM.from_pretrained(src)

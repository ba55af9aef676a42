"""Checkpoints in the official layout load back exactly through `load_state_dict` (what Trainer's resume calls), and a
Trainer run resumed from a checkpoint ends where the uninterrupted run ends: weights, routing biases and losses bit
for bit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import load_sharded_checkpoint

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer
from modeling_deepseek_v3.training import enable_fp8_training

from ..utils import QUANTIZATION, SHAPE, random_ids, random_model, tiny_config


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter and buffer bit for bit (FP8 payloads compared as bytes)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, tensor in sa.items():
        other = sb[key]
        assert tensor.dtype == other.dtype, key
        if tensor.dtype == torch.float8_e4m3fn:
            tensor, other = tensor.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(tensor, other), key


def test_the_saved_official_layout_loads_back_with_load_state_dict(tmp_path):
    """Stacked experts, MTP modules (with their copies of the shared embedding and head) and routing biases."""
    model = random_model(tiny_config(num_nextn_predict_layers=2))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in stored and "model.layers.4.eh_proj.weight" in stored
    fresh = DeepseekV3ForCausalLM(model.config)
    result = fresh.load_state_dict(stored)  # strict: any key left over would raise
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_state(fresh, model)
    assert fresh.load_state_dict(model.state_dict(), strict=True).missing_keys == []  # the in-memory layout too


def test_fp8_payloads_and_scales_load_back_exactly(tmp_path):
    model = random_model(tiny_config(**SHAPE, quantization_config=QUANTIZATION))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in stored
    fresh = DeepseekV3ForCausalLM(model.config)
    fresh.load_state_dict(stored)
    assert_same_state(fresh, model)


def test_a_sharded_checkpoint_loads_shard_by_shard(tmp_path):
    """transformers' `load_sharded_checkpoint` (Trainer's resume of a sharded checkpoint) loads each shard on its own,
    so one layer's experts arrive in parts."""
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({shard for key, shard in weight_map.items() if key.startswith("model.layers.1.mlp.experts.")}) > 1
    fresh = DeepseekV3ForCausalLM(model.config)
    load_sharded_checkpoint(fresh, tmp_path, strict=False)
    assert_same_state(fresh, model)


def test_a_partial_stack_of_another_shape_is_refused():
    model = random_model()
    with pytest.raises(ValueError, match=r"expert 2 of model.layers.1.mlp.experts.up_proj has shape \[3, 64\]"):
        model.load_state_dict({"model.layers.1.mlp.experts.2.up_proj.weight": torch.zeros(3, 64)}, strict=False)


def test_a_differing_mtp_copy_is_named_in_a_warning(tmp_path, caplog):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    stored["model.layers.3.shared_head.head.weight"] = stored["lm_head.weight"] + 1.0
    fresh = DeepseekV3ForCausalLM(model.config)
    with caplog.at_level("WARNING"):
        fresh.load_state_dict(stored)
    assert "model.layers.3.shared_head.head.weight differs from lm_head.weight" in caplog.text
    assert_same_state(fresh, model)  # the main tensor is used


# --- Trainer resume ------------------------------------------------------------------------------------------------

RUNS = {
    "yarn-mtp": dict(num_nextn_predict_layers=1),
    "no-yarn-mtp-fp8-training": dict(num_nextn_predict_layers=1, rope_scaling=None),
}
SLOW_RUNS = ("no-yarn-mtp-fp8-training",)  # FP8 training quantises every weight at every step: ~15 s on 2 cores


def train(tmp_path, name: str, trainer_class, overrides: dict, fp8: bool, resume: str | None = None, seed: int = 0):
    """3 optimizer steps of gradient accumulation 2 from a model initialised with `seed`, a checkpoint after step 2."""
    torch.manual_seed(seed)
    model = random_model(tiny_config(**overrides))
    if fp8:
        enable_fp8_training(model)
    torch.manual_seed(1)
    ids = random_ids(model.config, 12, 8)
    args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=3, save_steps=2, logging_steps=1,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = trainer_class(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train(resume_from_checkpoint=resume)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return model, losses


@pytest.mark.parametrize("trainer_class", [Trainer, DeepseekV3Trainer])
@pytest.mark.parametrize("run", [pytest.param(run, marks=[pytest.mark.slow] if run in SLOW_RUNS else [])
                                 for run in RUNS])
def test_resume_equals_the_uninterrupted_run(tmp_path, trainer_class, run):
    """2 steps, a checkpoint, 1 more step from that checkpoint into a model initialised differently = 3 steps in one
    go: every tensor (experts, MTP modules, routing biases) and the loss of step 3 bit for bit."""
    fp8 = "fp8" in run
    whole, whole_losses = train(tmp_path, "whole", trainer_class, RUNS[run], fp8)
    torch.manual_seed(0)
    initial = random_model(tiny_config(**RUNS[run]))
    moved = [n for n, b in whole.named_buffers() if n.endswith("e_score_correction_bias")
             and not torch.equal(b, initial.get_buffer(n))]
    assert len(moved) == 3  # two MoE layers and the MTP block: the biases did move during the run
    resumed, resumed_losses = train(tmp_path, "resumed", trainer_class, RUNS[run], fp8,
                                    resume=str(tmp_path / "whole" / "checkpoint-2"), seed=7)
    assert_same_state(resumed, whole)
    assert sorted(resumed_losses) == [1, 2, 3]  # 1 and 2 come from the checkpoint's trainer state
    assert resumed_losses == whole_losses


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The checkpoint after step 2 of a DeepseekV3Trainer run with an MTP module, and the same written sharded, and
    the model of the uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    whole, _ = train(root, "whole", DeepseekV3Trainer, RUNS["yarn-mtp"], fp8=False)
    single = root / "whole" / "checkpoint-2"
    sharded = root / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "model.safetensors").unlink()
    DeepseekV3ForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="200KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 100
    return {"single": single, "sharded": sharded, "whole": whole}


def without(folder: Path, key: str, into: Path) -> Path:
    """A copy of checkpoint `folder` without the tensor `key`."""
    shutil.copytree(folder, into)
    index_path = into / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shard = into / (index["weight_map"].pop(key) if index else "model.safetensors")
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    if index:
        index_path.write_text(json.dumps(index))
    return into


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("key, named", [
    ("model.layers.1.mlp.experts.3.down_proj.weight", r"model.layers.1.mlp.experts.down_proj \(experts \[3\]\)"),
    ("model.layers.3.eh_proj.weight", r"mtp.0.eh_proj.weight"),  # the MTP module, stored as layer L
    ("model.layers.2.mlp.gate.e_score_correction_bias", r"model.layers.2.mlp.gate.e_score_correction_bias"),
], ids=["expert", "mtp", "routing-bias"])
def test_a_resume_from_a_checkpoint_lacking_weights_is_refused(tmp_path, checkpoints, layout, key, named):
    incomplete = without(checkpoints[layout], key, tmp_path / "incomplete")
    if layout == "single":  # the loaded state dict's own report cannot say which experts
        named = named.split(r" \(")[0]
    with pytest.raises(ValueError, match=rf"missing keys \(1\): \['{named}'\].*Resume from a complete checkpoint"):
        train(tmp_path, "resumed", DeepseekV3Trainer, RUNS["yarn-mtp"], fp8=False, resume=str(incomplete))


def test_a_sharded_resume_reports_nothing_and_ends_where_the_whole_run_ends(tmp_path, checkpoints, caplog):
    """Per-expert and MTP-layer keys on disk are the model's stacked and `mtp.*` tensors: no false missing or
    unexpected keys, and no MTP copy compared with a main tensor of another shard, not yet loaded."""
    with caplog.at_level("WARNING"):
        resumed, _ = train(tmp_path, "resumed", DeepseekV3Trainer, RUNS["yarn-mtp"], fp8=False,
                           resume=str(checkpoints["sharded"]), seed=7)
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("transformers", "modeling_deepseek_v3"))] == []
    assert_same_state(resumed, checkpoints["whole"])


def test_an_mtp_copy_is_not_compared_with_a_main_tensor_of_another_shard(checkpoints, caplog):
    """Shard by shard (in an order that varies from run to run), the model's own head may not be loaded yet when the
    shard holding its MTP copy is: that copy is not compared."""
    folder = checkpoints["sharded"]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.3.shared_head.head.weight"]
    assert weight_map["lm_head.weight"] != shard
    fresh = DeepseekV3ForCausalLM(checkpoints["whole"].config)
    with caplog.at_level("WARNING"):
        fresh.load_state_dict(load_file(folder / shard), strict=False)
    assert "differs" not in caplog.text

"""Fine-tuning through the ecosystem: DeepseekV3Trainer (logging, bias update, checkpointing, accumulation, bf16),
PEFT LoRA on MLA, shared and routed experts, and `device_map="auto"` loading."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer, ExpertBalanceCallback

from ..utils import random_ids, random_model, tiny_config

# the recipe of docs/training.md: MLA, the dense layers' MLPs and the shared experts, and the stacked routed experts
MLA_PROJECTIONS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
LORA_MODULES = MLA_PROJECTIONS + MLP_PROJECTIONS
LORA_EXPERTS = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]


def dataset(config, rows: int = 16, length: int = 12) -> list[dict]:
    ids = random_ids(config, rows, length)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(tmp_path, **overrides) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                    learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    return TrainingArguments(**(defaults | overrides))


def biases(model) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]


@pytest.mark.parametrize("options", [
    dict(gradient_accumulation_steps=2),
    dict(gradient_checkpointing=True, bf16=True),
], ids=["accumulation", "checkpointing-bf16"])
def test_trainer_logs_balance_metrics_and_updates_the_bias(tmp_path, options):
    model = random_model()
    before = biases(model)
    trainer = DeepseekV3Trainer(model=model, args=arguments(tmp_path, **options), train_dataset=dataset(model.config))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    layers = [f"model.layers.{i}" for i in range(1, model.config.num_hidden_layers)]
    for entry in logs:
        assert entry["balance_loss"] > 0 and entry["expert_load_max_over_mean"] >= 1
        assert all(f"balance_loss/{layer}" in entry and f"expert_load_max_over_mean/{layer}" in entry
                   for layer in layers)
    for old, new in zip(before, biases(model)):
        steps = (new - old) / model.config.routing_bias_update_speed  # 3 updates of ±γ or 0 each
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.abs().max() <= 3 + 1e-3 and steps.abs().sum() > 0


def test_trainer_fine_tunes_a_saved_checkpoint(tmp_path):
    random_model().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    callback = ExpertBalanceCallback(keep_history=True)
    trainer = DeepseekV3Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(model.config),
                                callbacks=[callback])
    trainer.train()
    assert sum(isinstance(cb, ExpertBalanceCallback) for cb in trainer.callback_handler.callbacks) == 1
    assert len(callback.history) == 3
    trainer.save_model(tmp_path / "tuned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert all(torch.equal(a, b) for a, b in zip(biases(model), biases(reloaded)))


def test_a_skipped_optimizer_step_leaves_the_bias_and_drops_the_counts():
    model = random_model()
    model.train()
    ids = random_ids(model.config, 2, 6)
    model(ids, labels=ids).loss.backward()
    before = biases(model)
    skipped = type("SkippedStep", (), {"step_was_skipped": True})()  # what accelerate's optimizer reports
    ExpertBalanceCallback().on_optimizer_step(None, None, None, model=model, optimizer=skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, biases(model)))
    assert all(load.sum() == 0 for load in model.update_routing_bias().values())


def smoothed_loss(outputs, labels, num_items_in_batch=None):
    """A loss computed outside the model, as a `compute_loss_func`."""
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), label_smoothing=0.1)


@pytest.mark.parametrize("trainer_class, options", [
    (Trainer, dict(args=dict(label_smoothing_factor=0.1))),
    (DeepseekV3Trainer, dict(args=dict(label_smoothing_factor=0.1))),
    (Trainer, dict(compute_loss_func=smoothed_loss)),
], ids=["label-smoothing-Trainer", "label-smoothing-DeepseekV3Trainer", "compute_loss_func"])
def test_a_loss_computed_by_trainer_that_would_drop_mtp_and_balance_is_refused(tmp_path, trainer_class, options):
    """Trainer then calls the model without labels: the MTP modules would never train and the balance loss would be
    left out, so training stops with the reason instead."""
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = trainer_class(model=model, args=arguments(tmp_path, **options.get("args", {})),
                            train_dataset=dataset(model.config), compute_loss_func=options.get("compute_loss_func"))
    with pytest.raises(ValueError, match=r"label_smoothing_factor > 0 or a compute_loss_func\), which would leave out "
                                         r"the MTP loss .* and the sequence-wise balance loss"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_label_smoothing_trains_when_the_objective_has_no_mtp_or_balance_term(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=1, use_mtp_modules=False, seq_balance_loss_alpha=0.0))
    before = model.model.embed_tokens.weight.clone()
    trainer = Trainer(model=model, args=arguments(tmp_path, label_smoothing_factor=0.1, max_steps=1),
                      train_dataset=dataset(model.config))
    trainer.train()
    assert not torch.equal(model.model.embed_tokens.weight, before)


def test_trainer_needs_a_deepseek_v3_model(tmp_path):
    with pytest.raises(TypeError, match="containing a DeepseekV3ForCausalLM, got Linear"):
        DeepseekV3Trainer(model=torch.nn.Linear(2, 2), args=arguments(tmp_path))


def lora(model, task_type: str | None = "CAUSAL_LM") -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type=task_type,
                        target_modules=LORA_MODULES, target_parameters=LORA_EXPERTS)
    return get_peft_model(model, config)


def expected_adapted_modules(config) -> set[str]:
    """Every module the recipe adapts, from the config alone: MLA in every layer, the MLP of a dense layer, the shared
    and the routed experts of a MoE layer."""
    names = set()
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.self_attn.{n}" for n in MLA_PROJECTIONS}
        mlp = f"{layer}.mlp" if i < config.first_k_dense_replace else f"{layer}.mlp.shared_experts"
        names |= {f"{mlp}.{n}" for n in MLP_PROJECTIONS}
        if i >= config.first_k_dense_replace:
            names.add(f"{layer}.mlp.experts")
    return names


def lora_parameters(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if "lora_" in n}


def test_lora_on_mla_dense_mlps_shared_and_routed_experts(tmp_path):
    """The recipe adapts what docs/training.md says (PEFT's rewrite of targets for model_type deepseek_v3 is off for
    our classes): every adapter trains, and the saved adapter reloads to the trained logits."""
    base = random_model()
    ids = random_ids(base.config, 2, 8)
    with torch.no_grad():
        base_logits = base(ids).logits
    frozen = {n: p.clone() for n, p in base.named_parameters()}
    model = lora(base)
    adapted = {re.sub(r"(\.base_layer)*\.lora_.*", "", n) for n in lora_parameters(model)}
    assert adapted == expected_adapted_modules(base.config)
    moe_layers = base.config.num_hidden_layers - base.config.first_k_dense_replace
    assert sum(".mlp.experts." in n for n in lora_parameters(model)) == 6 * moe_layers  # A and B of 3 projections
    with torch.no_grad():
        assert (model(ids).logits - base_logits).abs().max() > 1e-3

    model.train()
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    unchanged = [n for n, p in lora_parameters(model).items() if torch.equal(p, before[n])]
    assert unchanged == []  # every adapter trained, the dense MLPs' and shared experts' included
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name

    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(random_model_like(base, frozen), tmp_path / "adapter")
    saved, loaded = lora_parameters(model), lora_parameters(reloaded)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert type(merged) is DeepseekV3ForCausalLM
        torch.testing.assert_close(merged(ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_the_example_uses_the_documented_recipe():
    path = Path(__file__).resolve().parents[2] / "examples" / "finetune.py"
    spec = importlib.util.spec_from_file_location("finetune_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.LORA_TARGET_MODULES == LORA_MODULES and example.LORA_TARGET_PARAMETERS == LORA_EXPERTS


def test_an_adapter_with_weights_matching_no_module_is_refused(tmp_path):
    """An adapter whose config no longer targets the MLPs (as PEFT's rewrite left them) would load in part: refused,
    naming the tensors."""
    base = random_model()
    base.save_pretrained(tmp_path / "base")
    lora(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base")).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = MLA_PROJECTIONS
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the adapter holds 18 tensors that match no module of this model: "
                                         r"\['base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'"):
        PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_auto_peft_model_loads_the_adapter_after_importing_the_package(tmp_path, task_type):
    """With the recipe's task type nothing more is needed; without one, PEFT imports the class the adapter names once
    the package is allowed."""
    random_model().save_pretrained(tmp_path / "base")
    model = lora(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base"), task_type=task_type).eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(model.config, 2, 6)
    options = {} if task_type else {"import_allowlist": ["modeling_deepseek_v3"]}
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", **options).eval()
    assert type(loaded.get_base_model()) is DeepseekV3ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_lora_run_is_reproduced_by_the_base_model_and_the_saved_adapter(tmp_path, caplog):
    """The base model's routers are frozen, so its routing biases stay as they were (with a warning): the fresh base
    model plus the saved adapter give the trained model's logits."""
    random_model().save_pretrained(tmp_path / "base")
    model = lora(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base"))
    ids = random_ids(model.config, 2, 8)
    with torch.no_grad():
        untrained = model.eval()(ids).logits  # base plus the adapter as initialised
    trainer = DeepseekV3Trainer(model=model, args=arguments(tmp_path, learning_rate=1e-2),
                                train_dataset=dataset(model.config))
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "routers of ['model.layers.1', 'model.layers.2'] are frozen" in caplog.text
    assert trainer.state.log_history[0]["expert_load_max_over_mean"] >= 1  # the load is still measured
    trainer.save_model(tmp_path / "adapter")
    model.eval()
    reloaded = PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        trained, fresh = model(ids).logits, reloaded.eval()(ids).logits
    assert (trained - untrained).abs().max() > 1e-2  # the adapter did train
    assert (fresh - trained).abs().max() <= 1e-6


def random_model_like(base, state) -> DeepseekV3ForCausalLM:
    fresh = DeepseekV3ForCausalLM(base.config).eval()
    fresh.load_state_dict(state | {n: b for n, b in base.named_buffers() if n in fresh.state_dict()})
    return fresh


def test_device_map_auto_loads_the_model(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    ids = random_ids(model.config, 1, 6)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

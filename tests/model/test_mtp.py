"""Multi-Token Prediction: the module formula, the training objective, the switch, the official checkpoint layout."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM
from transformers import TrainingArguments

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3Trainer
from modeling_deepseek_v3.convert import convert_checkpoint
from modeling_deepseek_v3.fp8 import FP8Linear

from ..utils import random_ids, random_model, reference_mtp_logits, rms_norm, tiny_config


@pytest.fixture(scope="module")
def mtp_model():
    torch.manual_seed(3)
    return random_model(tiny_config(num_nextn_predict_layers=2))


def test_module_forward_equals_the_formula(mtp_model):
    model = mtp_model
    eps = model.config.rms_norm_eps
    emb, prev = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    module = model.mtp[1]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    pe = model.model.rotary_emb(emb, torch.arange(7)[None].expand(2, -1))
    x = torch.cat([rms_norm(emb, module.enorm.weight, eps), rms_norm(prev, module.hnorm.weight, eps)], -1)
    expected = module.block(x @ module.eh_proj.weight.T, pe, causal)
    torch.testing.assert_close(module(emb, prev, pe, causal), expected, rtol=0, atol=1e-5)
    assert module.eh_proj.weight.shape == (64, 128) and module.eh_proj.bias is None
    assert model.mtp[0].block.self_attn.layer_idx == 3 and model.mtp[1].block.self_attn.layer_idx == 4
    assert all(type(m.block.mlp).__name__ == "MoE" for m in model.mtp)


def test_loss_is_main_plus_weighted_depth_losses(mtp_model):
    model = mtp_model
    ids = random_ids(model.config, 2, 12)
    labels = ids.clone()
    labels[0, :4] = -100  # padding-like ignored targets, seen differently by each depth
    labels[1, 9] = -100
    out = model(ids, labels=labels)
    vocab = model.config.vocab_size
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)
    depth = [F.cross_entropy(logits.reshape(-1, vocab), labels[:, k + 1 :].reshape(-1), ignore_index=-100)
             for k, logits in enumerate(reference_mtp_logits(model, ids), start=1)]
    torch.testing.assert_close(out.mtp_losses, torch.stack(depth), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, main + 0.3 / 2 * sum(depth), rtol=0, atol=1e-5)
    assert out.mtp_accuracies.shape == (2,) and ((out.mtp_accuracies >= 0) & (out.mtp_accuracies <= 1)).all()

    # Trainer's num_items_in_batch: every depth's summed loss over the same count as the main loss
    n_items = 37
    summed = [F.cross_entropy(logits.reshape(-1, vocab), labels[:, k + 1 :].reshape(-1), ignore_index=-100,
                              reduction="sum") for k, logits in enumerate(reference_mtp_logits(model, ids), start=1)]
    main_sum = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="sum")
    out = model(ids, labels=labels, num_items_in_batch=torch.tensor(n_items))
    torch.testing.assert_close(out.loss, (main_sum + 0.3 / 2 * sum(summed)) / n_items, rtol=0, atol=1e-5)


def test_a_prepared_4d_mask_gives_the_losses_of_its_2d_padding_mask(mtp_model):
    model = mtp_model
    ids = random_ids(model.config, 2, 10)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    labels = ids.masked_fill(padding == 0, -100)
    four_d = padding[:, None, None, :].bool() & torch.ones(10, 10, dtype=torch.bool).tril()  # [b, 1, s, s]
    with torch.no_grad():
        want = model(ids, attention_mask=padding, labels=labels)
        got = model(ids, attention_mask=four_d, labels=labels)
    torch.testing.assert_close(got.mtp_losses, want.mtp_losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)


def test_gradients_reach_mtp_modules_and_shared_embedding_and_head(mtp_model):
    model = mtp_model
    model.zero_grad()
    ids = random_ids(model.config, 2, 10)
    out = model(ids, labels=ids)
    shared = [model.model.embed_tokens.weight, model.lm_head.weight]
    for grad in torch.autograd.grad(out.mtp_losses.sum(), shared, retain_graph=True):
        assert grad.abs().sum() > 0  # the MTP objective itself trains the shared tensors
    out.loss.backward()
    for name, param in model.mtp.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()


def test_switch_off_computes_nothing_and_leaves_main_logits(mtp_model, tmp_path):
    model = mtp_model
    ids = random_ids(model.config, 2, 9)
    with_mtp = model(ids, labels=ids)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.mtp]
    model.config.use_mtp_modules = False
    try:
        off = model(ids, labels=ids)
    finally:
        model.config.use_mtp_modules = True
        for hook in hooks:
            hook.remove()
    assert calls == [] and off.mtp_losses is None
    vocab = model.config.vocab_size
    main = F.cross_entropy(off.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(off.loss, main)
    torch.testing.assert_close(off.logits, with_mtp.logits, rtol=0, atol=0)

    # a model without MTP modules, same main weights: the same logits (the modules never touch the main forward)
    plain = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    torch.testing.assert_close(plain(ids).logits, with_mtp.logits, rtol=0, atol=0)

    # switched off, the weights are still kept: saved and loaded
    model.config.use_mtp_modules = False
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.use_mtp_modules = True
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert back.config.use_mtp_modules is False
    assert torch.equal(back.mtp[1].eh_proj.weight, model.mtp[1].eh_proj.weight)


OFFICIAL_MTP_SUFFIXES = {
    "embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
    "shared_head.head.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
    *(f"self_attn.{p}.weight" for p in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                                        "kv_a_layernorm", "kv_b_proj", "o_proj")),
    *(f"mlp.shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    *(f"mlp.experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")),
}  # fmt: skip


@pytest.fixture(scope="module")
def saved_mtp(mtp_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp")
    mtp_model.save_pretrained(path)
    return path


def test_official_round_trip(mtp_model, saved_mtp):
    model, path = mtp_model, saved_mtp
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for layer in (3, 4):  # MTP modules k = 1, 2 of a 3-layer model
            assert {k.removeprefix(f"model.layers.{layer}.") for k in keys if k.startswith(f"model.layers.{layer}.")} \
                == OFFICIAL_MTP_SUFFIXES
            assert torch.equal(f.get_tensor(f"model.layers.{layer}.embed_tokens.weight"),
                               model.model.embed_tokens.weight)
            assert torch.equal(f.get_tensor(f"model.layers.{layer}.shared_head.head.weight"), model.lm_head.weight)
    assert not any(k.startswith("mtp.") or ".block." in k for k in keys)
    back, info = DeepseekV3ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    # saved again: the same official keys
    back.save_pretrained(path / "again")
    with safe_open(path / "again" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == keys


def test_builtin_class_loads_our_folder(mtp_model, saved_mtp):
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(saved_mtp, dtype=torch.float32).eval()
    ids = random_ids(mtp_model.config, 2, 16)
    torch.testing.assert_close(builtin(ids).logits, mtp_model(ids).logits, rtol=0, atol=1e-5)


def _rewrite(src, dst, edit, config_edit=None):
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def test_a_differing_stored_copy_warns_and_the_main_tensor_wins(mtp_model, saved_mtp, tmp_path, caplog):
    def edit(state):
        state["model.layers.4.shared_head.head.weight"][5, 7] += 0.25

    _rewrite(saved_mtp, tmp_path, edit)
    with caplog.at_level("WARNING"):
        back = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert "model.layers.4.shared_head.head.weight differs from lm_head.weight (max |difference| = 0.25)" in caplog.text
    assert "model.layers.3" not in caplog.text
    assert torch.equal(back.lm_head.weight, mtp_model.lm_head.weight)


def test_stray_or_missing_mtp_keys_are_errors(saved_mtp, tmp_path):
    (tmp_path / "stray").mkdir()
    _rewrite(saved_mtp, tmp_path / "stray", lambda s: s.update({"model.layers.3.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['model.layers.3.extra.weight'\]"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "stray")

    def drop_mtp(state):
        for key in [k for k in state if k.startswith(("model.layers.3.", "model.layers.4."))]:
            del state[key]

    (tmp_path / "no-mtp").mkdir()
    _rewrite(saved_mtp, tmp_path / "no-mtp", drop_mtp)
    with pytest.raises(ValueError, match="lacks the weights of the MTP modules.*num_nextn_predict_layers=0"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "no-mtp")
    without = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "no-mtp", num_nextn_predict_layers=0)
    assert len(without.mtp) == 0


def test_the_base_model_ignores_stored_mtp_layers(mtp_model, saved_mtp):
    ids = random_ids(mtp_model.config, 1, 6)
    base = DeepseekV3Model.from_pretrained(saved_mtp)
    torch.testing.assert_close(base(ids).last_hidden_state, mtp_model.model(ids).last_hidden_state)


def test_fp8_folder_with_an_mtp_layer(mtp_model, saved_mtp, tmp_path):
    """`deepseek-v3 convert bf16-to-fp8` quantises the MTP blocks' projections as the official release does
    (`eh_proj` and the shared copies stay unquantised); the folder loads with no missing or unexpected key, runs,
    and saves back the same bytes."""
    convert_checkpoint(saved_mtp, tmp_path / "fp8", "bf16-to-fp8")
    model, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32,
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    block = model.mtp[0].block
    assert isinstance(block.self_attn.o_proj, FP8Linear) and block.mlp.experts.gate_proj.dtype == torch.float8_e4m3fn
    assert model.mtp[0].eh_proj.weight.dtype == torch.float32
    ids = random_ids(model.config, 1, 6)
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, use_mtp=True), plain)
    model.save_pretrained(tmp_path / "again")
    original = load_file(tmp_path / "fp8" / "model.safetensors")
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(original)
        for key, tensor in original.items():
            assert torch.equal(f.get_tensor(key).view(torch.uint8), tensor.view(torch.uint8)), key


def test_trainer_trains_the_modules_and_logs_each_depth(tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=2))
    ids = random_ids(model.config, 16, 12)
    before = {name: p.clone() for name, p in model.mtp.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        for k in (1, 2):
            assert 0 < entry[f"mtp_{k}_loss"] < 10 and 0 <= entry[f"mtp_{k}_accuracy"] <= 1
        # the blocks' experts are balanced too; a module is named by its checkpoint layer, model.layers.{L + k - 1}
        assert "expert_load_max_over_mean/model.layers.3" in entry and "balance_loss/model.layers.4" in entry
    for name, param in model.mtp.named_parameters():
        assert not torch.equal(param, before[name]), name

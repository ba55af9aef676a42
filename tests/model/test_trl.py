"""TRL's trainers and DeepSeek-V3's recipe: the decoder refuses a training forward that bypasses the causal LM's
forward (TRL's fused LM head), `DeepseekV3SFTTrainer` keeps the recipe exactly as `DeepseekV3Trainer` trains it, and
TRL's MoE switch (Mixtral's auxiliary loss) is refused by name."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling_deepseek_v3 import DeepseekV3Trainer

from ..utils import random_ids, random_model, tiny_config

RECIPE_OFF = dict(use_mtp_modules=False, seq_balance_loss_alpha=0.0, routing_bias_update_speed=0.0)
BYPASSED = "bypassed DeepseekV3ForCausalLM.forward"


def mtp_model(**overrides):
    return random_model(tiny_config(num_nextn_predict_layers=1, **overrides))


def test_a_training_forward_of_the_decoder_alone_is_refused_while_the_recipe_has_a_term():
    model = mtp_model().train()
    ids = random_ids(model.config, 2, 8)
    with pytest.raises(ValueError, match=rf"{BYPASSED}.*MTP loss.*balance loss.*routing-bias update"):
        model.model(ids)
    with torch.no_grad():
        model.model(ids)  # no gradients: nothing of the recipe is lost (TRL's reference and old log-probs)
    model.eval().model(ids)
    plain = mtp_model(**RECIPE_OFF).train()
    assert plain.model(ids).last_hidden_state.requires_grad  # nothing to lose: trains as asked
    with pytest.raises(ValueError, match="output_router_logits=True.*Mixtral"):
        plain.model(ids, output_router_logits=True)


# ---- TRL ------------------------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the words `w0 ... w{vocab_size-1}`, ids equal to their number."""
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w2", bos_token="w0")


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def trl_arguments(config_class, tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                    learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False,
                    activation_checkpointing=False)
    return config_class(**(defaults | overrides))


def test_sft_trainer_keeps_the_recipe_exactly_as_deepseek_v3_trainer(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from modeling_deepseek_v3 import DeepseekV3SFTTrainer

    model = mtp_model()
    rows = random_ids(model.config, 8, 12)
    args = trl_arguments(SFTConfig, tmp_path)
    sft = copy.deepcopy(model)
    sft_trainer = DeepseekV3SFTTrainer(model=sft, args=args, train_dataset=Dataset.from_list(
        [{"input_ids": row.tolist()} for row in rows]), processing_class=word_tokenizer(model.config.vocab_size))
    sft_trainer.train()
    # the same rows, order (the sampler's seed) and hyperparameters; SFT's collator makes labels = input_ids
    reference = copy.deepcopy(model)
    DeepseekV3Trainer(model=reference, args=args, train_dataset=[
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]).train()

    before, after, expected = model.state_dict(), sft.state_dict(), reference.state_dict()
    for name in expected:
        assert torch.equal(after[name], expected[name]), name
    moved = [name for name in expected if not torch.equal(before[name], after[name])]
    assert any(name.startswith("mtp.0.") for name in moved)  # the MTP loss trained the MTP module
    assert any(name.endswith("e_score_correction_bias") for name in moved)  # the bias update ran
    logged = sft_trainer.state.log_history[0]
    assert logged["mtp_1_loss"] > 0 and logged["balance_loss"] > 0


def trl_trainer(name: str, model, tmp_path):
    """TRL's own trainer `name` over `model`, for 2 steps on a few rows of random words."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    tokenizer = word_tokenizer(model.config.vocab_size)
    rows = random_ids(model.config, 4, 6).tolist()
    if name == "sft":
        return SFTTrainer(model=model, args=trl_arguments(SFTConfig, tmp_path),
                          train_dataset=Dataset.from_list([{"input_ids": row} for row in rows]),
                          processing_class=tokenizer)
    if name == "dpo":
        data = Dataset.from_list([{"prompt": words(r[:2]), "chosen": words(r[2:4]), "rejected": words(r[4:])}
                                  for r in rows])
        return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=trl_arguments(DPOConfig, tmp_path),
                          train_dataset=data, processing_class=tokenizer)
    return GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=trl_arguments(GRPOConfig, tmp_path, per_device_train_batch_size=2, num_generations=2,
                           max_completion_length=3),
        train_dataset=Dataset.from_list([{"prompt": words(r[:3])} for r in rows]), processing_class=tokenizer,
    )


@pytest.mark.parametrize("name", ["sft", "dpo", "grpo"])
def test_trl_trainers_that_score_hidden_states_themselves_are_refused(tmp_path, name):
    pytest.importorskip("trl")
    model = mtp_model()
    trainer = trl_trainer(name, model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{BYPASSED}.*MTP loss.*DeepseekV3SFTTrainer.*use_mtp_modules=False"):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any step


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_trl_trainers_train_with_the_recipe_switched_off(tmp_path, name):
    pytest.importorskip("trl")
    model = mtp_model(**RECIPE_OFF)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trl_trainer(name, model, tmp_path).train()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # it trained


@pytest.mark.parametrize("options, message", [
    (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef=0.01.*Mixtral"),
    (dict(loss_type="dft"), "loss_type='dft'"),
    (dict(packing=True), "packing=True.*cross into the next packed sequence"),
], ids=["moe-switch", "dft", "packing"])
def test_sft_trainer_refuses_what_would_change_the_objective(tmp_path, options, message):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from modeling_deepseek_v3 import DeepseekV3SFTTrainer

    model = mtp_model()
    data = Dataset.from_list([{"input_ids": row} for row in random_ids(model.config, 4, 6).tolist()])
    with pytest.raises(ValueError, match=message):
        DeepseekV3SFTTrainer(model=model, args=trl_arguments(SFTConfig, tmp_path, **options), train_dataset=data,
                             processing_class=word_tokenizer(model.config.vocab_size))


def test_trl_moe_switch_is_refused_by_name(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from modeling_deepseek_v3 import DeepseekV3SFTTrainer

    model = mtp_model(**RECIPE_OFF)  # nothing of the recipe to lose: only the switch is refused
    tokenizer = word_tokenizer(model.config.vocab_size)
    data = Dataset.from_list([{"input_ids": row} for row in random_ids(model.config, 4, 6).tolist()])
    args = trl_arguments(SFTConfig, tmp_path, router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="output_router_logits=True.*Mixtral"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    model.save_pretrained(tmp_path / "saved")
    args = trl_arguments(SFTConfig, tmp_path, model_init_kwargs={"output_router_logits": True})
    with pytest.raises(ValueError, match="output_router_logits.*Mixtral"):
        DeepseekV3SFTTrainer(model=str(tmp_path / "saved"), args=args, train_dataset=data, processing_class=tokenizer)


def test_sft_trainer_loads_a_folder_with_the_mtp_modules(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3SFTTrainer

    model = mtp_model()
    model.save_pretrained(tmp_path / "saved")
    data = Dataset.from_list([{"input_ids": row} for row in random_ids(model.config, 4, 6).tolist()])
    trainer = DeepseekV3SFTTrainer(model=str(tmp_path / "saved"), args=trl_arguments(SFTConfig, tmp_path, max_steps=1),
                                   train_dataset=data, processing_class=word_tokenizer(model.config.vocab_size))
    assert type(trainer.model) is DeepseekV3ForCausalLM
    trainer.train()
    trainer.save_model(str(tmp_path / "tuned"))
    tuned = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "tuned")
    assert not torch.equal(tuned.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)  # trained and saved


def test_trl_given_a_folder_loads_the_built_in_class_without_the_mtp_modules(tmp_path):
    """The limit docs/training.md states: TRL resolves the checkpoint's architecture name in `transformers`, which is
    transformers' built-in class, whatever this package registered with the Auto classes."""
    pytest.importorskip("trl")
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = mtp_model()
    model.save_pretrained(tmp_path / "saved")
    data = Dataset.from_list([{"input_ids": row} for row in random_ids(model.config, 4, 6).tolist()])
    trainer = SFTTrainer(model=str(tmp_path / "saved"), args=trl_arguments(SFTConfig, tmp_path), train_dataset=data,
                         processing_class=word_tokenizer(model.config.vocab_size))
    assert type(trainer.model) is transformers.DeepseekV3ForCausalLM
    mtp_layer = f".layers.{model.config.num_hidden_layers}."  # MTP module 1 in the checkpoint's layout
    assert not any(name.startswith("mtp.") or mtp_layer in name for name in trainer.model.state_dict())

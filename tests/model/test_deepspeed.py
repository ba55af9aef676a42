"""DeepSpeed ZeRO under `DeepseekV3Trainer` on two CPU processes (gloo): the routing biases, the MTP weights (in the
checkpoint `Trainer` saves) and the logged losses equal one process training on the same global batches.
(DeepSpeed's optimizer steps flat partitions, which the model's optimizer hook does not recognise: the trainer moves
the biases itself; a plain `Trainer` is refused.) The accelerate configs shipped in examples/accelerate are started
on two CPU processes by `benchmarks/gpu_sharded.sh --dry-run` (tests/test_benchmarks.py)."""

import pytest
import torch

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer

from ..multiprocess import WORLD, run_ranks
from ..utils import random_ids, random_model, spread_routing, tiny_config

STEPS, GLOBAL_BATCH = 2, 4


def make_model():
    """A tiny model with an MTP module whose routing varies from token to token, so the ranks' loads differ."""
    torch.manual_seed(0)
    return spread_routing(random_model(tiny_config(num_nextn_predict_layers=1)))


def make_data() -> list[dict]:
    torch.manual_seed(1)
    return [{"input_ids": row, "labels": row} for row in random_ids(tiny_config(), STEPS * GLOBAL_BATCH, 8)]


def train(out_dir: str, batch: int, accumulation: int = 1, deepspeed: dict | None = None):
    from transformers import TrainingArguments

    model = make_model()
    args = TrainingArguments(output_dir=f"{out_dir}/run", per_device_train_batch_size=batch, max_steps=STEPS,
                             gradient_accumulation_steps=accumulation, logging_steps=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, deepspeed=deepspeed)
    trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=make_data())
    trainer.train()
    trainer.save_model(f"{out_dir}/saved")  # under ZeRO-3 every rank takes part in gathering the partitions
    return [(entry["loss"], entry["mtp_1_loss"]) for entry in trainer.state.log_history if "loss" in entry]


def zero_worker(rank: int, out_dir: str, stage: int, accumulation: int) -> None:
    config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    losses = train(out_dir, GLOBAL_BATCH // WORLD // accumulation, accumulation, config)
    torch.save(losses, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("stage, accumulation", [(2, 2), (3, 1)], ids=["zero2-accumulation", "zero3"])
def test_zero_on_two_gloo_ranks_trains_as_one_process(tmp_path, stage, accumulation):
    """Each global batch of 4 rows is 2 ranks x `accumulation` micro-batches under DeepSpeed, one batch in the
    reference process."""
    pytest.importorskip("deepspeed")
    run_ranks(zero_worker, str(tmp_path / "zero"), stage, accumulation)
    initial = make_model().state_dict()
    single_losses = train(str(tmp_path / "single"), GLOBAL_BATCH)
    expected = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "single" / "saved").state_dict()
    saved = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "zero" / "saved").state_dict()  # written by rank 0
    biases = [name for name in expected if name.endswith("e_score_correction_bias")]
    assert any(not torch.equal(initial[name], expected[name]) for name in biases)  # the biases moved
    for name in biases:
        assert torch.equal(saved[name], expected[name]), name
    mtp = [name for name in expected if name.startswith("mtp.")]
    assert any(not torch.equal(initial[name], expected[name]) for name in mtp)  # the MTP module trained
    for name in mtp:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    for rank in range(WORLD):
        losses = torch.load(tmp_path / "zero" / f"rank{rank}.pt")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)

def plain_trainer_worker(rank: int, out_dir: str) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=f"{out_dir}/run", per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True,
                             deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"})
    Trainer(model=make_model(), args=args, train_dataset=make_data()).train()


@pytest.mark.slow
def test_plain_trainer_under_deepspeed_is_refused_rather_than_leaving_the_biases(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(Exception, match="cannot follow DeepSpeed's optimizer steps.*DeepseekV3Trainer"):
        run_ranks(plain_trainer_worker, str(tmp_path), world=1)

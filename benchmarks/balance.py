"""Expert balance with and without the auxiliary-loss-free routing-bias update (docs/design.md, Expert balancing).

Trains the `small` preset on the packaged Shakespeare excerpt twice from the same seed, once with the bias update
(γ from the config, 0.001) and once with it frozen (γ = 0); the sequence-wise balance loss (α = 1e-4) is on in both.
The balance statistic is the one the training log prints (`expert_load_max_over_mean/<layer>`): per optimizer step,
the busiest expert's tokens over the mean expert's. Prints per MoE layer its median, min and max over the last 20
steps and both runs' final losses; the result file keeps that statistic for every step of every layer and run, and
`--out` gets one PNG per run with every expert's share of the routed tokens over the steps (and the raw loads).

    python benchmarks/balance.py --steps 150 --threads 1 --out balance-run   # docs/training.md (plots copied to docs/)

References: DeepSeek-V3 report §2.1.2 and Figure 9 (expert load with and without the auxiliary loss).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from importlib import resources
from pathlib import Path

import torch
from result_file import ResultFile  # beside this script
from transformers import TrainingArguments, default_data_collator, set_seed

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer, ExpertBalanceCallback, load_preset
from modeling_deepseek_v3.demo import make_datasets, train_tokenizer
from modeling_deepseek_v3.plots import plot_expert_load

TAIL = 20  # the last steps summarised as "end of training"


def train(gamma: float, steps: int, seed: int, vocab: int, special: int, train_ds, eval_ds) -> dict:
    set_seed(seed)
    config = load_preset("small", vocab_size=vocab, bos_token_id=special, eos_token_id=special, pad_token_id=special,
                         routing_bias_update_speed=gamma, use_cache=False)
    model = DeepseekV3ForCausalLM(config)
    history = ExpertBalanceCallback(keep_history=True)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
            learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.1,
            logging_steps=max(1, steps // 10), report_to="none", save_strategy="no", eval_strategy="no",
            use_cpu=not torch.cuda.is_available(), seed=seed, dataloader_num_workers=0,
        )
        trainer = DeepseekV3Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    data_collator=default_data_collator, callbacks=[history])
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    layers = list(history.history[0])
    loads = {layer: torch.stack([step[layer] for step in history.history]).double() for layer in layers}  # [steps, E]
    # the statistic the model logs, per step: the busiest expert's tokens over the mean expert's
    per_step = {layer: (load.max(dim=1).values / load.mean(dim=1)).tolist() for layer, load in loads.items()}
    return {"gamma": gamma, "final_train_loss": losses[-1], "eval_loss": eval_loss, "max_over_mean": per_step,
            "loads": {layer: load.tolist() for layer, load in loads.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma", type=float, default=load_preset("small").routing_bias_update_speed)
    parser.add_argument("--out", type=Path, default=Path("balance-run"), help="folder for the plots and raw loads")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/balance.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < TAIL:
        parser.error(f"--steps must be >= {TAIL}, got {args.steps}")
    args.out.mkdir(parents=True, exist_ok=True)

    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text, load_preset("small").vocab_size)
    special = tokenizer.eos_token_id
    train_ds, eval_ds, _ = make_datasets(tokenizer.backend_tokenizer.encode(text).ids, 256)

    record = ResultFile("balance", args.result_file)
    runs = [train(gamma, args.steps, args.seed, len(tokenizer), special, train_ds, eval_ds)
            for gamma in (args.gamma, 0.0)]
    for run in runs:
        loads = {layer: torch.tensor(load) for layer, load in run["loads"].items()}
        plot_expert_load(loads, args.out / f"expert_load_gamma_{run['gamma']:g}.png",
                         f"expert load, routing_bias_update_speed γ = {run['gamma']}")
    (args.out / "balance_loads.json").write_text(json.dumps(runs))

    updated, frozen = runs
    print(f"\nsmall preset, {args.steps} steps, seed {args.seed}; per-step max/mean expert load over the last {TAIL} "
          "steps: median (min-max)")
    print(f"| layer | bias update (γ={updated['gamma']:g}) | frozen bias (γ=0) |\n|---|---|---|")
    for layer in updated["max_over_mean"]:
        cells = [record.add_series(f"γ={run['gamma']:g}, {layer}: max/mean expert load per step, last {TAIL} steps",
                                   run["max_over_mean"][layer][-TAIL:], "ratio") for run in runs]  # fmt: skip
        print(f"| {layer} | " + " | ".join(f"{c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f})" for c in cells) + " |")
    record.write(extra={"args": {k: str(v) for k, v in vars(args).items()}, "tail_steps": TAIL,
                        "runs": [{k: v for k, v in run.items() if k != "loads"} for run in runs]})
    for name in ("final_train_loss", "eval_loss"):
        print(f"| {name} | {updated[name]:.4f} | {frozen[name]:.4f} |")
    print(f"| eval perplexity | {math.exp(updated['eval_loss']):.1f} | {math.exp(frozen['eval_loss']):.1f} |")
    print(f"plots and numbers in {args.out}/")


if __name__ == "__main__":
    main()

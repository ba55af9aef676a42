"""Train or fine-tune a DeepSeek-V3 with `DeepseekV3Trainer` on a text (by default the packaged Shakespeare excerpt),
optionally with LoRA adapters, on one process or several (DDP through `torchrun` / `accelerate launch`), and save
what was trained to `--out`.

    python examples/finetune.py --steps 50                                    # from scratch, `tiny` preset
    python examples/finetune.py --model path/to/checkpoint --lora --steps 50   # LoRA on a saved model
    torchrun --standalone --nproc_per_node 2 examples/finetune.py --steps 20  # DDP, 2 processes (gloo on CPU)
    torchrun --standalone --nproc_per_node 2 examples/finetune.py --fsdp 2 --ep 2 --steps 20  # sharded at load

Flags:
    --model FOLDER  a saved model folder with its tokenizer (e.g. a `deepseek-v3 demo` output); the text is encoded
                    with that tokenizer, so the token ids are the ones the model was trained on. Without it, a fresh
                    model of `--preset` and a byte-level BPE tokenizer trained on the text.
    --preset NAME   the configuration preset of a fresh model (default: tiny).
    --text PATH     UTF-8 text to train on (default: the packaged Shakespeare excerpt; its first 200,000 characters
                    are used).
    --steps N       optimizer steps (default: 50).
    --lora          train LoRA adapters (the recipe of docs/training.md) instead of all weights.
    --out FOLDER    where the adapter (with --lora) or the model is saved, with the tokenizer (default: finetune-run).
    --tp/--fsdp/--ep N  tensor-, fully-sharded-data- and expert-parallel ranks (default: 1 each).

`--tp`, `--fsdp`, `--ep` load the model split by transformers' distributed engine (`DistributedConfig`), from
`--model` or from a fresh model that rank 0 saves to `--out/initial` first. Each process prints a checksum of its
routing biases at the end: every rank prints the same one, because the routing-bias update sums the expert loads
over the data-parallel ranks before moving the biases.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator, set_seed
from transformers.distributed import DistributedConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer, load_preset
from modeling_deepseek_v3.demo import make_datasets, train_tokenizer

# the LoRA recipe of docs/training.md: every MLA projection, the dense layers' MLPs and the shared experts (modules
# named gate_proj / up_proj / down_proj), and the stacked routed experts
LORA_TARGET_MODULES = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                       "gate_proj", "up_proj", "down_proj"]
LORA_TARGET_PARAMETERS = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]


TEXT_CHARS = 200_000  # of the text, enough for the example's steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="FOLDER",
                        help="a saved model folder with its tokenizer (default: a fresh model of --preset and a BPE "
                        "tokenizer trained on the text)")
    parser.add_argument("--preset", default="tiny", help="configuration preset of a fresh model (default: tiny)")
    parser.add_argument("--text", metavar="PATH", help=f"UTF-8 text to train on, its first {TEXT_CHARS:,} characters "
                        "(default: the packaged Shakespeare excerpt)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default: 50)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--out", default="finetune-run", metavar="FOLDER",
                        help="folder for the adapter (--lora) or the model, and the tokenizer (default: finetune-run)")
    for flag, kind in (("--tp", "tensor"), ("--fsdp", "fully sharded data"), ("--ep", "expert")):
        parser.add_argument(flag, type=int, default=1, help=f"{kind}-parallel ranks (transformers' engine; default: 1)")
    return parser


def main(argv: list[str] | None = None) -> DeepseekV3Trainer:
    """Run the example with command-line arguments `argv`; returns the trainer (its `model` is what was trained and
    saved, its `state.log_history` the logs)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    set_seed(0)
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")[:TEXT_CHARS]
    else:
        data = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt")
        text = data.read_text(encoding="utf-8")[:TEXT_CHARS]
    layout = None
    if max(args.tp, args.fsdp, args.ep) > 1:
        layout = DistributedConfig(tp_size=args.tp, fsdp_size=args.fsdp, ep_size=args.ep)
        if args.lora:
            parser.error("--lora trains adapters of a replicated model: leave out --tp, --fsdp and --ep")
    tokenizer = None
    if args.model:
        # the model's own tokenizer: another one's token ids would mean other tokens to the model
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            parser.error(f"--model: {args.model} has no tokenizer this example can load; save the model's tokenizer "
                         f"beside it (tokenizer.save_pretrained) ({' '.join(str(e).split())[:200]})")
    if layout is not None and not args.model:
        args.model = f"{args.out}/initial"
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() == 0:
            DeepseekV3ForCausalLM(load_preset(args.preset, use_cache=False)).save_pretrained(args.model)
        dist.barrier()
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, distributed_config=layout)
    else:
        model = DeepseekV3ForCausalLM(load_preset(args.preset, use_cache=False))
    config = model.config
    if tokenizer is None:
        tokenizer = train_tokenizer(text, config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        parser.error(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}")
    train_ds, _, _ = make_datasets(tokenizer(text, add_special_tokens=False)["input_ids"], 128)
    if args.lora:
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=LORA_TARGET_MODULES, target_parameters=LORA_TARGET_PARAMETERS)
        model = get_peft_model(model, lora)

    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=max(1, args.steps // 5), report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only speeds copies to a GPU
        # every trainable tensor takes part in each step (the stacked experts are one tensor per projection, used
        # whichever experts get tokens), so DDP need not search for unused ones (it warns when told to and finds none)
        ddp_find_unused_parameters=False,
        # `accelerate launch` passes its mixed precision on; DeepSpeed requires TrainingArguments to agree with it
        bf16=os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16",
    )
    trainer = DeepseekV3Trainer(model=model, args=training, train_dataset=train_ds,
                                data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(args.out)  # the adapter alone with --lora (PEFT's save_pretrained), else the model
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.out)
    biases = torch.cat([b.flatten() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")])
    print(f"rank {training.process_index}: routing-bias checksum {biases.double().sum().item():.6f} "
          f"(|b| sum {biases.abs().sum().item():.6f}); final loss {trainer.state.log_history[-2]['loss']:.4f}; "
          f"saved to {args.out}")
    return trainer


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        # leave together, with the process group torn down: a rank that exits while another still works (rank 0
        # writing the checkpoint) can abort in the group's threads ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()

"""Generate with DeepSeek-V3 split over several processes by transformers' distributed engine: tensor (`--tp`),
expert (`--ep`), pipeline (`--pp`) or fully sharded (`--fsdp`) parallelism, or their combinations. Every rank runs
the script; rank 0 prints plain greedy and self-speculative (`use_mtp=True`) continuations, which are identical.

    torchrun --standalone --nproc_per_node 8 examples/parallel_generate.py --model path/to/DeepSeek-V3 --tp 8 --ep 8
    torchrun --standalone --nproc_per_node 2 examples/parallel_generate.py --tp 2 --ep 2   # a random tiny model, CPU

The product of the sizes other than --ep must equal the number of processes; --ep must be a multiple of --tp. With a
folder that has a tokenizer, the prompts are `--prompt` texts and the continuations are printed as text; without one
(the random model), the prompts are random token ids and the continuations are printed as ids. Without `--model`,
rank 0 first saves a random model of `--preset` (one MTP module) to `--out`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer
from transformers.distributed import DistributedConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder or Hub id (default: a random model of --preset)")
    parser.add_argument("--preset", default="tiny",
                        help="without --model: tiny (4 heads, 8 experts) or bench (16, 16) (default: tiny)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: attention by heads, dense MLPs and "
                        "shared experts by width, vocabulary (default: 1)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel ranks: whole routed experts per rank (default: 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    parser.add_argument("--fsdp", type=int, default=1, help="fully sharded data-parallel ranks (default: 1)")
    parser.add_argument("--ep-implementation", default="auto", choices=("auto", "all_reduce", "all_to_all"),
                        help="how --ep brings the experts their tokens: all_reduce runs every rank's experts on the "
                        "batch the ranks share and sums the outputs (needs --ep equal to --tp), all_to_all sends each "
                        "rank its experts' tokens, auto picks all_reduce at inference when the ranks share one batch "
                        "(default: auto)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt, repeatable; used when the model folder has a tokenizer (default: "
                        f"{' and '.join(repr(p) for p in DEFAULT_PROMPTS)})")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt (default: 16)")
    parser.add_argument("--out", default="parallel-generate-model",
                        help="without --model: the folder the random model is saved to (default: "
                        "parallel-generate-model)")
    return parser


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (left padding, for a batch of prompts), or None for a local folder without one."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, padding_side="left")


def main() -> None:
    args = build_parser().parse_args()
    layout = DistributedConfig(tp_size=args.tp, ep_size=args.ep, pp_size=args.pp, fsdp_size=args.fsdp,
                               ep_implementation=args.ep_implementation)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    path = args.model
    if path is None:
        path = Path(args.out)
        if dist.get_rank() == 0:
            torch.manual_seed(0)
            DeepseekV3ForCausalLM(load_preset(args.preset, num_nextn_predict_layers=1)).save_pretrained(path)
        dist.barrier()
    model = DeepseekV3ForCausalLM.from_pretrained(path, distributed_config=layout, dtype="auto")
    tokenizer = load_tokenizer(path)
    if tokenizer is not None:
        inputs = tokenizer(args.prompt or DEFAULT_PROMPTS, return_tensors="pt", padding=True).to(model.device)
    else:
        torch.manual_seed(0)  # every rank passes the same prompts
        ids = torch.randint(3, model.config.vocab_size, (2, 8), device=model.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    greedy = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
    output = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, use_mtp=True,
                            return_dict_in_generate=True)
    speculative, stats = output.sequences, output.speculative_stats
    if dist.get_rank() == 0:
        new = inputs["input_ids"].shape[1]
        if tokenizer is not None:
            show = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        else:
            show = torch.Tensor.tolist
        print(f"tp {args.tp}, ep {args.ep}, pp {args.pp}, fsdp {args.fsdp}\ngreedy:      {show(greedy[:, new:])}\n"
              f"speculative: {show(speculative[:, new:])}\nidentical: {torch.equal(greedy, speculative)}, "
              f"{stats.tokens_per_forward:.2f} tokens per verification forward")


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        # leave together, with the process group torn down: a rank that exits while another still works (rank 0
        # writing the checkpoint) can abort in the group's threads ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()

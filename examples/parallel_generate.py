"""Generate with DeepSeek-V3 split over several processes by transformers' distributed engine: tensor (`--tp`),
expert (`--ep`), pipeline (`--pp`) or fully sharded (`--fsdp`) parallelism, or their combinations. Every rank runs
the script; rank 0 prints plain greedy and self-speculative (`use_mtp=True`) continuations, which are identical.

    torchrun --standalone --nproc_per_node 8 examples/parallel_generate.py --model path/to/DeepSeek-V3 --tp 8
    torchrun --standalone --nproc_per_node 2 examples/parallel_generate.py --tp 2 --ep 2   # a random tiny model, CPU

Without `--model`, rank 0 saves a random model of `--preset` (one MTP module) to `--out` first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.distributed import DistributedConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a checkpoint folder or Hub id (default: a random model of --preset)")
    parser.add_argument("--preset", default="tiny", help="without --model: tiny (4 heads, 8 experts) or bench (16, 16)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--fsdp", type=int, default=1, help="fully sharded data-parallel ranks")
    parser.add_argument("--ep-implementation", default="auto", choices=("auto", "all_reduce", "all_to_all"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default="parallel-generate-model")
    args = parser.parse_args()

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
    torch.manual_seed(0)  # every rank passes the same prompts
    prompts = torch.randint(3, model.config.vocab_size, (2, 8), device=model.device)
    greedy = model.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False)
    output = model.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False, use_mtp=True,
                            return_dict_in_generate=True)
    speculative, stats = output.sequences, output.speculative_stats
    if dist.get_rank() == 0:
        new = prompts.shape[1]
        print(f"tp {args.tp}, ep {args.ep}, pp {args.pp}, fsdp {args.fsdp}\ngreedy:      {greedy[:, new:].tolist()}\n"
              f"speculative: {speculative[:, new:].tolist()}\nidentical: {torch.equal(greedy, speculative)}, "
              f"{stats.tokens_per_forward:.2f} tokens per verification forward")


if __name__ == "__main__":
    main()

"""Continuous batching with MTP drafting (`use_mtp=True`) against plain continuous batching, on a trained model.

The model is `benchmarks/speculative.py`'s: the `small` preset with one MTP module trained on the demo's Shakespeare
corpus (trained there once and cached; `--cache-dir` and `--steps` as in that script). 64 requests, each a held-out
passage of its own prompt length with its own `max_new_tokens` (drawn from a fixed seed), are added to a
continuous-batching manager, greedy, no EOS, at 1, 4 and 8 concurrent requests (`max_requests_per_batch`, with
`max_batch_tokens` = 64). Plain and drafting runs alternate `--repeats` times in one process, one torch thread; each
run is timed whole (the manager's start and stop included) by two clocks: the process's CPU time (all its threads;
on a shared machine it leaves out the time other processes hold the cores) and the wall clock. Every request's tokens
are checked to be the same both ways. The result file keeps every run's tokens/s by both clocks, the speed-up per
alternating pair (its median printed), and the drafting runs' acceptance per depth and tokens per main-model forward
(`SpeculativeStats` of the manager's batch processor).

    python benchmarks/speculative_batching.py                     # trains once if needed (as speculative.py)
    python benchmarks/speculative_batching.py --num-draft-tokens 2 --repeats 3 --result-file /tmp/s.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import speculative  # beside this script
import torch
from batching import blocks_for, manager_outputs  # beside this script
from result_file import ResultFile  # beside this script
from transformers import AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.demo import BLOCK_SIZE, make_datasets

PAGE_SIZE, MAX_BATCH_TOKENS = 16, 64


def draw_requests(blocks: torch.Tensor, args) -> tuple[list[list[int]], list[int]]:
    """Request i: the start of held-out block i (mod their number), of a drawn prompt length, and a drawn
    max_new_tokens."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=generator).tolist()
    new_tokens = torch.randint(args.min_new, args.max_new + 1, (args.requests,), generator=generator).tolist()
    prompts = [blocks[i % blocks.shape[0], :n].tolist() for i, n in enumerate(lengths)]
    return prompts, new_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / "results" / "speculative-model",
                        help="folder of the trained model (speculative.py's); trained there when missing")
    parser.add_argument("--steps", type=int, default=600, help="training steps when training (default: 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=48)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8],
                        help="max_requests_per_batch values (default: 1 4 8)")
    parser.add_argument("--num-draft-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="alternating pairs of runs per concurrency")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/speculative_batching.json")
    args = parser.parse_args(argv)
    record = ResultFile("speculative_batching", args.result_file)
    torch.set_num_threads(args.threads)

    if not (args.cache_dir / "config.json").is_file():
        speculative.train(args.cache_dir, args.steps, 1, None, args.seed)
    model = DeepseekV3ForCausalLM.from_pretrained(args.cache_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.cache_dir)
    _, eval_ds, _ = make_datasets(speculative.corpus_ids(tokenizer), BLOCK_SIZE)
    prompts, new_tokens = draw_requests(eval_ds.blocks, args)
    total = sum(new_tokens)
    plain = GenerationConfig(do_sample=False, eos_token_id=-1)  # no EOS: every request runs to its own length
    drafting = GenerationConfig(do_sample=False, eos_token_id=-1, use_mtp=True, num_draft_tokens=args.num_draft_tokens)
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.min_new}-"
          f"{args.max_new} new tokens each ({total} in all), greedy, {args.num_draft_tokens} draft token(s), torch "
          f"threads {torch.get_num_threads()}, {args.repeats} alternating pairs\n")
    print("| concurrent | speed-up, CPU clock | speed-up, wall clock | acceptance per depth | tokens / main forward |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for concurrent in args.concurrency:
        cb_config = ContinuousBatchingConfig(num_blocks=blocks_for(prompts, new_tokens, PAGE_SIZE),
                                             page_size=PAGE_SIZE, max_batch_tokens=MAX_BATCH_TOKENS,
                                             max_requests_per_batch=concurrent, allow_block_sharing=False)  # fmt: skip
        for config in (plain, drafting):  # warm-up, untimed
            manager_outputs(model, prompts[:2], [4, 4], cb_config, config)
        seconds = {(side, clock): [] for side in ("plain", "MTP") for clock in ("wall", "cpu")}
        for _ in range(args.repeats):
            for side, config in (("plain", plain), ("MTP", drafting)):
                cpu = time.process_time()  # every thread of the process: the manager's loop included
                outputs, wall, processor = manager_outputs(model, prompts, new_tokens, cb_config, config)
                seconds[side, "cpu"].append(time.process_time() - cpu)
                seconds[side, "wall"].append(wall)
                tokens = [output.generated_tokens for output in outputs]
                if side == "plain":
                    expected = tokens
                elif tokens != expected:
                    raise AssertionError(f"{concurrent} concurrent: drafting changed a request's tokens")
        stats = processor.speculative_stats
        row = {"concurrent": concurrent, "acceptance_per_depth": stats.acceptance_rate_per_depth,
               "tokens_per_main_forward": stats.tokens_per_forward, "batch_forwards": stats.main_forwards}  # fmt: skip
        for clock in ("cpu", "wall"):
            for side in ("plain", "MTP"):
                record.add_series(f"{concurrent} concurrent: {side} tokens/s ({clock} clock)",
                                  [total / s for s in seconds[side, clock]], "tok/s")  # fmt: skip
            ratios = [p / m for p, m in zip(seconds["plain", clock], seconds["MTP", clock])]
            record.add_series(f"{concurrent} concurrent: MTP / plain per alternating pair ({clock} clock)", ratios, "x")
            row[f"speed_up_{clock}_clock"] = statistics.median(ratios)
        rows.append(row)
        depths = ", ".join(f"{a:.0%}" for a in row["acceptance_per_depth"])
        print(f"| {concurrent} | {row['speed_up_cpu_clock']:.2f}× | {row['speed_up_wall_clock']:.2f}× | {depths} | "
              f"{row['tokens_per_main_forward']:.2f} |", flush=True)
    record.write(extra={"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "outputs_identical": True})


if __name__ == "__main__":
    main()

"""Self-speculative decoding with the MTP module: plain vs `generate(use_mtp=True)` greedy decoding on a trained model.

Trains the `small` preset with one MTP module on the demo's Shakespeare corpus (the demo's tokenizer, data,
optimiser settings and `DeepseekV3Trainer`), caches the trained folder, then generates 128 tokens greedily at batch
1 and 4 (left-padded prompts from held-out text) both ways, alternating runs, both under `torch.inference_mode()`,
and prints the acceptance rate, the tokens per main-model forward and the tokens/s of both. The two outputs are
checked to be identical.

    python benchmarks/speculative.py                      # trains once (cached in benchmarks/results/), then measures
    python benchmarks/speculative.py --threads 1 --repeats 5
    python benchmarks/speculative.py --retrain --steps 1000
    python benchmarks/speculative.py --layers 12 --cache-dir benchmarks/results/speculative-model-12-layers \
        --result-file benchmarks/results/speculative-12-layers.json

The result file (default `benchmarks/results/speculative.json`) keeps every timed run of both kinds, per batch size.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from importlib import resources
from pathlib import Path

import decode  # beside this script
import torch
from result_file import ResultFile  # beside this script
from transformers import AutoTokenizer, GenerationConfig, TrainingArguments, default_data_collator, set_seed

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Trainer, load_preset
from modeling_deepseek_v3.demo import BATCH_SIZE, BLOCK_SIZE, SPECIAL_TOKEN, make_datasets, train_tokenizer

PROMPT_LENGTHS = (32, 20, 44, 12)  # four held-out prompts, decoded in batches of 1, 2 or 4


def corpus_ids(tokenizer) -> list[int]:
    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    return tokenizer.backend_tokenizer.encode(text).ids


def train(folder: Path, steps: int, depth: int, layers: int | None, seed: int, **overrides) -> None:
    """The demo's recipe (`deepseek-v3 demo`) with `num_nextn_predict_layers = depth` (and `layers` decoder layers
    instead of the preset's, if given; `overrides` of other config fields); saves model and tokenizer."""
    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text, load_preset("small").vocab_size)
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    config = load_preset("small", vocab_size=len(tokenizer), bos_token_id=special, eos_token_id=special,
                         pad_token_id=special, num_nextn_predict_layers=depth, use_cache=False, **overrides)
    if layers is not None:
        config.num_hidden_layers = layers
    train_ds, _, _ = make_datasets(corpus_ids(tokenizer), BLOCK_SIZE)
    set_seed(seed)
    model = DeepseekV3ForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(folder / "trainer"), max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.1,
        logging_steps=max(1, steps // 10), report_to="none", use_cpu=not torch.cuda.is_available(),
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=seed,
    )  # fmt: skip
    DeepseekV3Trainer(model=model, args=args, train_dataset=train_ds, data_collator=default_data_collator).train()
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=special, eos_token_id=special, pad_token_id=special)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def held_out_losses(model, blocks: torch.Tensor) -> dict[str, float]:
    """Main next-token loss and each MTP depth's loss and accuracy on held-out blocks."""
    out = model(blocks, labels=blocks)
    vocab = model.config.vocab_size
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab), blocks[:, 1:].reshape(-1))
    result = {"main_loss": main.item(), "main_perplexity": math.exp(main.item())}
    for k, (loss, accuracy) in enumerate(zip(out.mtp_losses.tolist(), out.mtp_accuracies.tolist()), start=1):
        result[f"mtp_{k}_loss"], result[f"mtp_{k}_accuracy"] = loss, accuracy
    return result


def prompt_batches(blocks: torch.Tensor, batch: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out prompts (the start of eval block r, `PROMPT_LENGTHS[r]` tokens) in left-padded batches."""
    batches = []
    for first in range(0, len(PROMPT_LENGTHS), batch):
        lengths = PROMPT_LENGTHS[first : first + batch]
        width = max(lengths)
        ids = torch.full((len(lengths), width), pad, dtype=torch.long)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, width - length :] = blocks[first + row, :length]
            mask[row, width - length :] = 1
        batches.append((ids, mask))
    return batches


@torch.inference_mode()  # both ways alike: the speculative loop runs in inference mode anyway
def timed_generate(
    model, batches, new_tokens: int, use_mtp: bool, clock=time.perf_counter
) -> tuple[list[torch.Tensor], float, list[int]]:
    """Decode every batch; returns the outputs, the seconds taken and, speculatively, the summed statistics
    `[accepted drafts, drafts, verification row-steps, tokens they added]`."""
    outputs, seconds, totals = [], 0.0, [0, 0, 0, 0]
    for ids, mask in batches:
        start = clock()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, use_mtp=use_mtp,
                             eos_token_id=None, return_dict_in_generate=True)  # exactly `new_tokens` per row
        seconds += clock() - start
        outputs.append(out.sequences)
        if use_mtp:
            stats = out.speculative_stats
            counts = (sum(stats.accepted), len(stats.accepted) * stats.row_steps, stats.row_steps, stats.tokens)
            totals = [a + b for a, b in zip(totals, counts)]
    return outputs, seconds, totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / "results" / "speculative-model",
                        help="folder of the trained model; trained there when missing")
    parser.add_argument("--retrain", action="store_true", help="train even if the cache folder holds a model")
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    parser.add_argument("--depth", type=int, default=1, help="MTP modules to train (default: 1)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers instead of the preset's 4 (an MTP module costs about one layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], choices=[1, 2, 4],
                        help="batch sizes; the four prompts are decoded in batches of this size (default: 1 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(decode.CLOCKS), help=decode.CLOCK_HELP)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/speculative.json")
    args = parser.parse_args(argv)
    record = ResultFile("speculative", args.result_file)
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = args.cache_dir
    if args.retrain or not (folder / "config.json").is_file():
        start = time.perf_counter()
        train(folder, args.steps, args.depth, args.layers, args.seed)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s -> {folder}")
    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, eval_ds, _ = make_datasets(corpus_ids(tokenizer), BLOCK_SIZE)
    blocks = eval_ds.blocks
    quality = held_out_losses(model, blocks)
    print(f"model {folder}: {model.num_parameters() / 1e6:.2f} M parameters, {model.config.num_hidden_layers} layers, "
          f"{len(model.mtp)} MTP module(s); "
          f"held-out " + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))
    print(f"greedy, {len(PROMPT_LENGTHS)} prompts, {args.new_tokens} new tokens each, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats} alternating runs, {args.clock} clock\n")
    clock = decode.CLOCKS[args.clock]

    rows = []
    print("| batch | acceptance | tokens / main forward | plain tokens/s | speculative tokens/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        batches = prompt_batches(blocks, batch, model.config.pad_token_id)
        timed_generate(model, batches[:1], 8, False)  # warm-up
        timed_generate(model, batches[:1], 8, True)
        plain_times, spec_times = [], []
        for _ in range(args.repeats):
            plain, seconds, _ = timed_generate(model, batches, args.new_tokens, False, clock)
            plain_times.append(seconds)
            speculative, seconds, (accepted, drafted, row_steps, added) = timed_generate(
                model, batches, args.new_tokens, True, clock
            )
            spec_times.append(seconds)
            if not all(torch.equal(a, b) for a, b in zip(plain, speculative)):
                raise AssertionError(f"batch {batch}: speculative output differs from plain greedy")
        tokens = len(PROMPT_LENGTHS) * args.new_tokens
        record.add_series(f"batch {batch}: plain tokens/s", [tokens / s for s in plain_times], "tok/s")
        record.add_series(f"batch {batch}: speculative tokens/s", [tokens / s for s in spec_times], "tok/s")
        record.add_series(f"batch {batch}: speculative / plain (per alternating pair)",
                          [p / s for p, s in zip(plain_times, spec_times)], "x")  # fmt: skip
        row = {
            "batch": batch,
            "acceptance": accepted / drafted,
            "tokens_per_forward": added / row_steps,
            "plain_tokens_per_s": tokens / statistics.median(plain_times),
            "speculative_tokens_per_s": tokens / statistics.median(spec_times),
        }
        row["ratio"] = row["speculative_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print(f"| {batch} | {row['acceptance']:.1%} | {row['tokens_per_forward']:.2f} | "
              f"{row['plain_tokens_per_s']:.1f} | {row['speculative_tokens_per_s']:.1f} | {row['ratio']:.2f}× |")
    print("\nidentical outputs: yes")
    sample, _, _ = timed_generate(model, prompt_batches(blocks, 1, model.config.pad_token_id)[:1], 48, True)
    print("sample (speculative, greedy):", tokenizer.decode(sample[0][0]))
    record.write(extra={"args": {k: str(v) for k, v in vars(args).items()}, "quality": quality, "rows": rows})


if __name__ == "__main__":
    main()

"""The FP8 latent cache (`MLACache(config, cache_dtype="fp8")`) against the full-precision one: bytes, quality, speed.

1. Bytes per token and layer, both caches, at DeepSeek-V3's latent shape (kv_lora_rank 512, rope 64) in bf16.
2. Quality on a trained model: the `small` preset (kv_lora_rank 128: one whole 1×128 tile) trained briefly with the
   demo's recipe on the bundled Shakespeare corpus (cached in `--cache-dir`), then held-out blocks (the demo's eval
   split, never trained on) decoded token by token, teacher-forced, through each cache: every logit comes from a
   decode step over the cache. Reports the perplexity with each cache (fp32 scales and ue8m0) and the largest
   |logit difference| from the full-precision cache.
3. Speed: a decode step (fp32 model of two layers at DeepSeek-V3's latent shape, random weights) over a cache filled
   to 1k / 4k / 16k tokens, both caches alternating, median of a few steps; on a CPU the FP8 cache is decoded by the
   torch path, which dequantises 256 cached tokens at a time.

    python benchmarks/fp8_cache.py --result-file benchmarks/results/fp8_cache.json
    python benchmarks/fp8_cache.py --contexts 1024 4096 --steps 5 --eval-blocks 4 --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import speculative  # beside this script: the demo's training recipe
import torch
from result_file import ResultFile  # beside this script
from transformers import AutoTokenizer

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, load_preset
from modeling_deepseek_v3.demo import BLOCK_SIZE, make_datasets

CACHES = {
    "full precision": {},
    "fp8": {"cache_dtype": "fp8"},
    "fp8 ue8m0": {"cache_dtype": "fp8", "scale_fmt": "ue8m0"},
}
LATENT = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}  # DeepSeek-V3's


def bytes_per_token() -> dict[str, int]:
    config = load_preset("small", **LATENT)
    c, r = LATENT["kv_lora_rank"], LATENT["qk_rope_head_dim"]
    sizes = {}
    for name, options in CACHES.items():
        cache = MLACache(config, **options)
        cache.update(torch.randn(1, 1, 1, c, dtype=torch.bfloat16), torch.randn(1, 1, 1, r, dtype=torch.bfloat16), 0)
        sizes[name] = cache.bytes_per_token()
    return sizes


@torch.inference_mode()
def teacher_forced_logits(model, blocks: torch.Tensor, options: dict) -> torch.Tensor:
    """`[b, t, vocab]` logits of every position of `blocks`, each from a one-token decode step over the cache."""
    cache = MLACache(model.config, **options)
    logits = [model(blocks[:, i : i + 1], cache=cache, use_cache=True).logits[:, -1] for i in range(blocks.shape[1])]
    return torch.stack(logits, dim=1)


def quality(model, blocks: torch.Tensor) -> dict:
    vocab = model.config.vocab_size
    logits = {name: teacher_forced_logits(model, blocks, options) for name, options in CACHES.items()}
    full = logits["full precision"]
    result = {"eval_tokens": blocks[:, 1:].numel(), "max_abs_logit": full.abs().max().item()}
    for name, value in logits.items():
        loss = torch.nn.functional.cross_entropy(value[:, :-1].reshape(-1, vocab), blocks[:, 1:].reshape(-1))
        result[f"{name}: perplexity"] = math.exp(loss.item())
        result[f"{name}: max |logit - full precision|"] = (value - full).abs().max().item()
        agrees = value.argmax(-1) == full.argmax(-1)
        result[f"{name}: argmax agrees with full precision"] = agrees.float().mean().item()
    return result


@torch.inference_mode()
def step_seconds(model, cache: MLACache, token: torch.Tensor, position: int) -> float:
    """One decode step at `position` over `cache`, which is cropped back afterwards (the context stays fixed)."""
    start = time.perf_counter()
    model(token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
    seconds = time.perf_counter() - start
    cache.crop(-1)
    return seconds


def filled_cache(config, context: int, options: dict) -> MLACache:
    """A cache of `context` random tokens in every layer: normalised-looking latents (RMS 1) and rope keys."""
    generator = torch.Generator().manual_seed(context)
    cache = MLACache(config, **options)
    for layer in range(config.num_hidden_layers):
        c_kv = torch.randn(1, 1, context, config.kv_lora_rank, generator=generator)
        k_pe = torch.randn(1, 1, context, config.qk_rope_head_dim, generator=generator)
        cache.update(c_kv, k_pe, layer)
    return cache


def speed(contexts: list[int], steps: int, record: ResultFile) -> list[dict]:
    config = load_preset("small", num_hidden_layers=2, first_k_dense_replace=2, max_position_embeddings=32768,
                         **LATENT)  # fmt: skip
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    token = torch.tensor([[5]])
    rows = []
    for context in contexts:
        caches = {name: filled_cache(config, context, CACHES[name]) for name in ("full precision", "fp8")}
        times = {name: [] for name in caches}
        for cache in caches.values():  # warm-up
            step_seconds(model, cache, token, context)
        for _ in range(steps):  # alternating
            for name, cache in caches.items():
                times[name].append(step_seconds(model, cache, token, context))
        row = {"context": context}
        for name, samples in times.items():
            record.add_series(f"context {context}: {name} decode step", [1e3 * s for s in samples], "ms")
            row[f"{name} ms/step"] = 1e3 * statistics.median(samples)
        row["fp8 / full precision"] = row["fp8 ms/step"] / row["full precision ms/step"]
        rows.append(row)
        print(f"| {context} | {row['full precision ms/step']:.1f} | {row['fp8 ms/step']:.1f} | "
              f"{row['fp8 / full precision']:.2f}× |")
        del caches
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / "results" / "fp8-cache-model",
                        help="folder of the trained model; trained there when missing")  # fmt: skip
    parser.add_argument("--steps-train", type=int, default=100, help="training steps (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks decoded (default: 8)")
    parser.add_argument("--eval-tokens", type=int, default=128, help="tokens of each block decoded (default: 128)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=15, help="timed decode steps per cache and context (default: 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/fp8_cache.json")
    args = parser.parse_args(argv)
    record = ResultFile("fp8_cache", args.result_file)
    torch.set_num_threads(args.threads)

    sizes = bytes_per_token()
    print("bytes per token and layer (kv_lora_rank 512, rope 64, bf16):", sizes)

    folder = args.cache_dir
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        # the demo's recipe on the `small` preset, kv_lora_rank 128 (one whole tile), no MTP module
        speculative.train(folder, args.steps_train, depth=0, layers=None, seed=args.seed, kv_lora_rank=128)
        print(f"trained {args.steps_train} steps in {time.perf_counter() - start:.0f} s -> {folder}")
    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    _, eval_ds, _ = make_datasets(speculative.corpus_ids(AutoTokenizer.from_pretrained(folder)), BLOCK_SIZE)
    blocks = eval_ds.blocks[: args.eval_blocks, : args.eval_tokens]
    held_out = quality(model, blocks)
    print("held-out, teacher-forced decode:", held_out)

    print("\n| context | full precision ms/step | fp8 ms/step | fp8 / full |\n|---:|---:|---:|---:|")
    rows = speed(args.contexts, args.steps, record)
    record.write(extra={
        "args": {k: str(v) for k, v in vars(args).items()}, "bytes_per_token": sizes, "quality": held_out,
        "speed_rows": rows, "load_average_end": os.getloadavg(),
    })  # fmt: skip


if __name__ == "__main__":
    main()

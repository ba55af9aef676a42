"""Cost of one DeepSeek-V3.2 decode step's attention (DeepSeek Sparse Attention) against dense MLA, by context length.

One attention layer at the release's shape (`deepseek-v32` preset: hidden 7168, 128 heads, kv_lora_rank 512,
qk_rope_head_dim 64, 64 index heads of 128 dims, `index_topk` 2048; fp32 weights, random), over a latent cache of
`context - 1` tokens, timed for one new token: the real decode step of `MultiHeadLatentAttention.forward`, projections
included (the same on both sides except the indexer's own), cache append included.

* sparse: the layer as DeepSeek-V3.2 runs it over `MLACache(config)`: the indexer's key and queries of the new
  token, its scores over every cached key, the top 2048, and the absorbed attention over the gathered rows (up to
  2048 keys, where every key is chosen: the indexer's key, then dense attention);
* dense: the same module and weights with the indexer removed (so DeepSeek-V3's decode step): absorbed attention
  over every cached key (`attention.latent_sdpa` on a CPU).

Both caches hold the same random latents (rounded through FP8 as V3.2 caches them; the indexer's keys random FP8);
each step appends one token, and the cache is cropped back after it, so every sample sees the same context. The two
sides alternate, one sample each in turn, in one process with 1 torch thread (`--threads`). The crossover is the
shortest measured context from which on the sparse step's median is below the dense one's at every measured context
(up to `index_topk` keys both run dense attention, the sparse side plus the indexer's key of the new token).

    python benchmarks/sparse_attention.py --result-file benchmarks/results/sparse_attention.json
    python benchmarks/sparse_attention.py --contexts 2048 4096 --samples 3 --steps 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from result_file import ResultFile  # beside this script

from modeling_deepseek_v3 import MLACache, load_preset
from modeling_deepseek_v3.attention import MultiHeadLatentAttention
from modeling_deepseek_v3.indexer import fp8_round_trip, round_to_fp8


def filled_caches(config, context: int) -> tuple[MLACache, MLACache]:
    """A V3.2 cache (latents and indexer keys) and a V3 one (the same latents) of `context - 1` random tokens."""
    g = torch.Generator().manual_seed(context)
    t = context - 1
    c_kv = fp8_round_trip(torch.randn(1, 1, t, config.kv_lora_rank, generator=g))
    k_pe = torch.randn(1, 1, t, config.qk_rope_head_dim, generator=g)
    index_keys, index_scales = round_to_fp8(torch.randn(1, t, config.index_head_dim, generator=g))
    sparse, dense = MLACache(config, num_layers=1), MLACache(num_layers=1)
    sparse.update(c_kv, k_pe, 0, {"index_keys": index_keys, "index_scales": index_scales})
    dense.update(c_kv, k_pe, 0)
    return sparse, dense


def timed_steps(layer: MultiHeadLatentAttention, cache: MLACache, hidden: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """Mean ms of `steps` decode steps of `layer` over `cache`, each cropped back after it."""
    start = time.perf_counter()
    for _ in range(steps):
        layer(hidden, rope, cache=cache)
        cache.layers[0].crop(-1)  # back to context - 1 tokens
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 3072, 4096, 8192, 16384, 32768])
    parser.add_argument("--samples", type=int, default=5, help="samples per side and context")
    parser.add_argument("--steps", type=int, default=3, help="decode steps per sample (the sample is their mean)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/sparse_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = ResultFile("sparse_attention", args.result_file)

    config = load_preset("deepseek-v32", quantization_config=None)
    torch.manual_seed(0)
    sparse_layer = MultiHeadLatentAttention(config, layer_idx=0).eval()
    dense_layer = MultiHeadLatentAttention(config, layer_idx=0).eval()
    dense_layer.load_state_dict(sparse_layer.state_dict(), strict=False, assign=True)  # the same tensors
    dense_layer.indexer = None
    hidden = torch.randn(1, 1, config.hidden_size)

    rows, medians = [], {}
    for context in args.contexts:
        sparse_cache, dense_cache = filled_caches(config, context)
        angle = torch.rand(1, 1, config.qk_rope_head_dim // 2) * 2 * math.pi  # the new token's rotary angles
        rope = (angle.cos(), angle.sin())
        sides = {"sparse": (sparse_layer, sparse_cache), "dense": (dense_layer, dense_cache)}
        samples = {name: [] for name in sides}

        with torch.no_grad():
            for name in sides:
                timed_steps(*sides[name], hidden, rope, args.steps)  # warm-up
            for _ in range(args.samples):
                for name in sides:
                    samples[name].append(timed_steps(*sides[name], hidden, rope, args.steps))
        row = {"context": context}
        for name in sides:
            summary = record.add_series(f"{name} decode step ms, context {context}", samples[name], "ms")
            row[f"{name}_ms"] = medians[name, context] = summary["median"]
        row["dense_over_sparse"] = row["dense_ms"] / row["sparse_ms"]
        rows.append(row)
        print(f"context {context:6d}: sparse {row['sparse_ms']:8.2f} ms, dense {row['dense_ms']:8.2f} ms, "
              f"dense/sparse {row['dense_over_sparse']:.2f}x", flush=True)
        del sparse_cache, dense_cache

    # up to index_topk keys both sides run the same dense attention: noise may order them either way there
    faster_from = [c for c in args.contexts if all(medians["sparse", d] < medians["dense", d]
                                                   for d in args.contexts if d >= c)]
    crossover = min(faster_from) if faster_from else None
    print(f"crossover: {crossover}")
    path = record.write(extra={
        "rows": rows,
        "crossover_context": crossover,
        "crossover_rule": "the shortest measured context from which on the sparse median is below the dense one at "
                         "every measured context",
        "shape": {key: getattr(config, key) for key in (
            "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
            "qk_nope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk")},
        "dtype": "float32",
        "what": "one MultiHeadLatentAttention.forward of one new token over context - 1 cached tokens (projections "
                "and cache append included); sparse = DeepSeek-V3.2 layer over MLACache(config), dense = the same "
                "module and weights without its indexer (DeepSeek-V3's absorbed decode step)",
        "steps_per_sample": args.steps,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

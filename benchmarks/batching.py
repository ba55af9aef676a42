"""Continuous batching over the paged latent cache against padded batch `generate()`, on requests of mixed lengths.

64 requests (prompt lengths, and in the second scenario output lengths, drawn from a fixed seed), greedy, no EOS:
* same output length: `generate_batch(prompts, max_new_tokens=N)` against one left-padded `generate` of all 64;
* own output lengths: each request added to a continuous-batching manager with its own `max_new_tokens`, against
  one padded `generate` that must run to the longest (its extra tokens are not counted).
Equal accounting: every side is timed whole, from the call that starts its work to the last request's tokens in
hand. Continuous batching's time includes building its pool and starting and stopping its manager (transformers'
stop runs `gc.collect()`); the padded side's includes creating its cache. Before the timed runs every side runs once,
untimed, on the same small warm-up workload (the first 4 requests, 4 new tokens). Continuous batching runs with a
pool holding every request at once, and with a pool of `--small-pool` (a quarter) of the padded cache's token slots
(requests then wait for pages others free). Tokens/s count the requested tokens only; cache bytes are the padded
`MLACache` after `generate` against the pool allocated up front (and the most bytes live requests held). Beside the
pool, transformers' batch inputs allocate a dense attention mask for sdpa / eager that this model does not read:
printed too. Runs alternate (padded, continuous, ...) `--repeats` times; the result file keeps every run's seconds
and tokens/s and, per round, each side's speed against the padded `generate` of the same round (median, min, max
printed). Every request's tokens are checked to equal the padded batch's (left-padded greedy decoding equals
per-request decoding). The baseline is this package's padded `generate`; unless `--no-builtin`, transformers'
built-in `DeepseekV3ForCausalLM` (same weights; it caches the latent too) is timed on the padded batch as well, and
its own `generate_batch` tried.

    python benchmarks/batching.py                           # preset small, 64 requests, one thread
    python benchmarks/batching.py --preset tiny --requests 16 --repeats 1 --no-builtin --result-file /tmp/b.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from result_file import ResultFile  # beside this script
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, load_preset

WARM_UP_REQUESTS, WARM_UP_TOKENS = 4, 4  # every side runs this workload once, untimed, before the timed runs


def draw_requests(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    prompt_lengths = torch.randint(1, args.max_prompt + 1, (args.requests,), generator=generator).tolist()
    new_tokens = torch.randint(args.min_new, args.max_new + 1, (args.requests,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in prompt_lengths]
    return prompts, new_tokens


def padded_generate(model, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float, int]:
    """One left-padded batch through `generate`: (tokens per request, seconds, cache bytes)."""
    pad = model.config.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None,
                              return_dict_in_generate=True)
    start = time.perf_counter()
    cache = MLACache(model.config) if isinstance(model, DeepseekV3ForCausalLM) else None
    out = model.generate(ids, attention_mask=mask, generation_config=config, cache=cache)
    seconds = time.perf_counter() - start
    cache = out.cache
    nbytes = cache.nbytes() if isinstance(cache, MLACache) else sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
    )
    return out.sequences[:, width:].tolist(), seconds, nbytes


def batching_config(args, num_blocks: int) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(num_blocks=num_blocks, page_size=args.page_size,
                                    max_batch_tokens=args.max_batch_tokens, allow_block_sharing=False)  # fmt: skip


def blocks_for(prompts, new_tokens, page_size: int) -> int:
    """Pages that hold every request at once (each caches its prompt and all new tokens but the last)."""
    return sum(-(-(len(p) + n - 1) // page_size) for p, n in zip(prompts, new_tokens))


def generate_batch(model, prompts, max_new_tokens: int, cb_config) -> tuple[list[list[int]], float]:
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1)
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
    seconds = time.perf_counter() - start
    return [output.generated_tokens for output in outputs.values()], seconds


def manager_outputs(model, prompts, new_tokens, cb_config, config: GenerationConfig) -> tuple[list, float, object]:
    """Each request added to a manager with its own max_new_tokens: (their outputs in order, seconds, the manager's
    batch processor)."""
    start = time.perf_counter()  # the manager's start (pool) and stop are counted, as generate_batch's are
    with model.continuous_batching_context_manager(generation_config=config,
                                                   continuous_batching_config=cb_config) as manager:  # fmt: skip
        ids = [manager.add_request(prompt, max_new_tokens=n) for prompt, n in zip(prompts, new_tokens)]
        outputs = {}
        while len(outputs) < len(ids):  # results come as requests finish
            output = manager.get_result(timeout=600)
            outputs[output.request_id] = output
        processor = manager.batch_processor
    seconds = time.perf_counter() - start
    return [outputs[rid] for rid in ids], seconds, processor


def manager_run(model, prompts, new_tokens, cb_config) -> tuple[list[list[int]], float, int]:
    """Each request with its own max_new_tokens: (tokens, seconds, most bytes held by live requests)."""
    config = GenerationConfig(do_sample=False, eos_token_id=-1)
    outputs, seconds, processor = manager_outputs(model, prompts, new_tokens, cb_config, config)
    return [output.generated_tokens for output in outputs], seconds, processor.cache.peak_used_bytes()


def pool_and_mask_bytes(model, cb_config) -> tuple[int, int]:
    """The pool a manager allocates for `cb_config`, and the attention mask transformers' batch inputs allocate beside
    it for sdpa / eager ([max_batch_tokens, pool tokens + max_batch_tokens]; this model does not read it)."""
    manager = model.init_continuous_batching(continuous_batching_config=cb_config)
    processor = manager.batch_processor
    masks = processor.inputs_and_outputs.attention_mask
    mask_bytes = sum(mask.nbytes for mask in masks.values()) if isinstance(masks, dict) else getattr(masks, "nbytes", 0)
    pool = processor.cache.allocated_bytes()
    manager.batch_processor = None
    manager.destroy()
    return pool, mask_bytes


def sides(model, builtin, args, scenario: str, prompts, lengths, pools: dict) -> dict:
    """The timed sides of one scenario: this package's padded `generate` (the baseline) first, continuous batching
    with each pool, and the built-in class's padded `generate` when it is loaded."""
    longest = max(lengths)
    fns = {"padded generate": lambda: padded_generate(model, prompts, longest)}
    for label, blocks in pools.items():
        cb_config = batching_config(args, blocks)
        if scenario == "same output length":
            fns[f"continuous, {label}"] = lambda c=cb_config: generate_batch(model, prompts, longest, c)
        else:
            fns[f"continuous, {label}"] = lambda c=cb_config: manager_run(model, prompts, lengths, c)
    if builtin is not None:
        fns["built-in padded generate"] = lambda: padded_generate(builtin, prompts, longest)
    return fns


def alternate_runs(fns: dict, warm_ups: dict, repeats: int) -> dict:
    """Runs every side's warm-up once, then alternates the sides `repeats` times; keeps each one's last result and
    every run's seconds."""
    for warm_up in warm_ups.values():
        warm_up()
    seconds, results = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            results[name] = fn()
            seconds[name].append(results[name][1])
    return {name: (results[name], seconds[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=256, help="prompt lengths uniform in [1, this]")
    parser.add_argument("--new-tokens", type=int, default=32, help="output length of the same-length scenario")
    parser.add_argument("--min-new", type=int, default=16, help="own output lengths uniform in [min-new, max-new]")
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small-pool", type=float, default=0.25, help="the small pool, as a share of the padded cache")
    parser.add_argument("--no-builtin", action="store_true", help="skip transformers' built-in DeepseekV3")
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/batching.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(load_preset(args.preset)).eval()
    model.generation_config.eos_token_id = None
    prompts, new_tokens = draw_requests(args, model.config.vocab_size)
    builtin = None
    if not args.no_builtin:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(folder).eval()
        builtin.generation_config.eos_token_id = None
    print(f"preset {args.preset}, {args.requests} requests, prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens (mean {statistics.mean(map(len, prompts)):.0f}), torch "
          f"{torch.__version__}, {args.threads} thread(s), page_size {args.page_size}, max_batch_tokens "
          f"{args.max_batch_tokens}, {args.repeats} alternating runs after one warm-up")  # fmt: skip

    record = ResultFile("batching", args.result_file)
    scenarios = {
        "same output length": [args.new_tokens] * args.requests,
        "own output lengths": new_tokens,
    }
    rows = []
    for scenario, lengths in scenarios.items():
        useful = sum(lengths)
        longest = max(lengths)
        padded_tokens = args.requests * (max(map(len, prompts)) + longest - 1)
        full = blocks_for(prompts, lengths, args.page_size)
        # the small pool still holds the longest request
        small = max(int(padded_tokens * args.small_pool) // args.page_size,
                    blocks_for([max(prompts, key=len)], [longest], args.page_size))  # fmt: skip
        pools = {"pool for all at once": full, f"pool {args.small_pool:g} of padded": small}
        fns = sides(model, builtin, args, scenario, prompts, lengths, pools)
        warm_prompts = prompts[:WARM_UP_REQUESTS]
        warm_lengths = [WARM_UP_TOKENS] * len(warm_prompts)
        warm_pool = blocks_for(warm_prompts, warm_lengths, args.page_size)
        warm_ups = sides(model, builtin, args, scenario, warm_prompts, warm_lengths, dict.fromkeys(pools, warm_pool))
        results = alternate_runs(fns, warm_ups, args.repeats)

        reference = [tokens[:n] for tokens, n in zip(results["padded generate"][0][0], lengths)]
        padded_seconds, padded_bytes = results["padded generate"][1], results["padded generate"][0][2]
        print(f"\n{scenario}: {useful} tokens requested (longest {longest}); padded cache {padded_bytes / 2**20:.2f} "
              f"MiB for {padded_tokens} token slots")  # fmt: skip
        print(f"  {'':36s} {'tokens/s':>9s} {'vs padded (min-max)':>20s} {'cache MiB':>10s} {'padded/this':>11s}"
              "  same tokens")  # fmt: skip
        for name, ((tokens, _, *extra), seconds) in results.items():
            if name.startswith("continuous"):
                cb_config = batching_config(args, pools[name.removeprefix("continuous, ")])
                nbytes, mask = pool_and_mask_bytes(model, cb_config)
                note = f"  (batch mask {mask / 2**20:.2f} MiB"
                note += f"; live requests held at most {extra[0] / 2**20:.2f} MiB)" if extra else ")"
            else:
                nbytes, note = extra[0], ""
            same = [t[:n] for t, n in zip(tokens, lengths)] == reference
            if not same:
                raise AssertionError(f"{scenario}, {name}: tokens differ from the padded generate's")
            speed = record.add_series(f"{scenario}, {name}: tokens/s", [useful / s for s in seconds], "tok/s")
            record.add_series(f"{scenario}, {name}: seconds", seconds, "s")
            ratios = [p / s for p, s in zip(padded_seconds, seconds)]  # per round: the same load on both
            if name != "padded generate":
                record.add_series(f"{scenario}, {name}: speed vs padded generate", ratios, "x")
            rows.append({"scenario": scenario, "side": name, "requested_tokens": useful, "cache_bytes": nbytes,
                         "padded_cache_bytes": padded_bytes, "padded_cache_over_this": padded_bytes / nbytes})
            print(f"  {name:36s} {speed['median']:9.1f} {statistics.median(ratios):8.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) {nbytes / 2**20:10.2f} {padded_bytes / nbytes:10.2f}x"
                  f"  yes{note}")  # fmt: skip
    record.write(extra={"args": vars(args), "rows": rows})

    if builtin is not None:
        outputs = builtin.generate_batch(prompts[:2], generation_config=GenerationConfig(max_new_tokens=2),
                                         continuous_batching_config=batching_config(args, 64))  # fmt: skip
        errors = {output.error for output in outputs.values()}
        print(f"\nbuilt-in DeepseekV3ForCausalLM.generate_batch: {errors or 'returned no outputs'}")


if __name__ == "__main__":
    main()

"""Decode and prefill throughput of modeling_deepseek_v3 vs transformers' built-in DeepseekV3ForCausalLM.

Both models hold the same weights (exchanged through save_pretrained) and run in this process, alternating, with
the same greedy loop: prefill a random context, then decode one token per forward over the cache.
`--compile` adds our decoding compiled by torch.compile over a static latent cache (`MLAStaticCache`), against our
eager decoding over the default dynamic cache, alternating the same way.

    python benchmarks/decode.py                       # preset bench, contexts 256 1024 4096
    python benchmarks/decode.py --contexts 256 --steps 16 --dtype bfloat16
    python benchmarks/decode.py --compile --contexts 256    # also compiled vs eager (compiles once per context)
    python benchmarks/decode.py --profile --contexts 256    # ours only: ms per decode step by component
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import step_profile  # beside this script
import torch
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, MLAStaticCache, load_preset

# how a run is timed: elapsed time, or the CPU time of this process (all its threads)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = ("wall: elapsed time; cpu: this process's CPU time (time.process_time), which on a shared machine leaves "
              "out the time other processes hold the cores (meaningful with 1 thread)")


def sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def new_cache(model):
    return MLACache(model.config) if isinstance(model, DeepseekV3ForCausalLM) else DynamicCache(config=model.config)


class Decoder:
    """How a model decodes: eagerly over a new dynamic cache per run, or (`max_cache_len` given) through
    `torch.compile(model.forward, fullgraph=True, **compile_options)` over one static cache that each run resets:
    the compiled graph, and on CUDA a captured CUDA graph, belongs to that cache's tensors."""

    def __init__(self, model, max_cache_len: int | None = None, **compile_options) -> None:
        self.model = model
        self.step = model
        self.static_cache = None
        if max_cache_len is not None:
            cache_class = MLAStaticCache if isinstance(model, DeepseekV3ForCausalLM) else StaticCache
            self.static_cache = cache_class(config=model.config, max_cache_len=max_cache_len)
            self.step = torch.compile(model.forward, fullgraph=True, **compile_options)

    def new_cache(self):
        if self.static_cache is None:
            return new_cache(self.model)
        self.static_cache.reset()
        return self.static_cache


@torch.inference_mode()
def decode_tokens_per_s(decoder: Decoder, context: torch.Tensor, steps: int, clock=time.perf_counter) -> float:
    """Tokens/s of `steps` greedy decode steps after an eager prefill of `context`, timed by `clock`."""
    cache = decoder.new_cache()
    logits = decoder.model(context, cache=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    sync(token)
    start = clock()
    for _ in range(steps):
        logits = decoder.step(token, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
    sync(token)
    return steps * context.shape[0] / (clock() - start)


@torch.inference_mode()
def prefill_tokens_per_s(model, context: torch.Tensor, clock=time.perf_counter) -> float:
    sync(context)
    start = clock()
    model(context, cache=new_cache(model), use_cache=True, logits_to_keep=1)
    sync(context)
    return context.numel() / (clock() - start)


def alternate(fn, first, second, repeats: int, *args) -> tuple[float, float]:
    """Median of `repeats` alternating runs (first, second, first, ...) so drift hits both equally."""
    a, b = [], []
    for _ in range(repeats):
        a.append(fn(first, *args))
        b.append(fn(second, *args))
    return statistics.median(a), statistics.median(b)


def compiled_vs_eager(model, args) -> list[tuple[str, float, float]]:
    """Per context: tokens/s of our eager decoding (dynamic cache) and of our compiled static-cache decoding."""
    rows = []
    for context_len in args.contexts:
        context = torch.randint(0, model.config.vocab_size, (args.batch, context_len), device=args.device)
        compiled = Decoder(model, max_cache_len=context_len + args.steps + 1)
        start = time.perf_counter()
        decode_tokens_per_s(compiled, context, 2)  # compiles
        print(f"compiled the decode step for context {context_len} in {time.perf_counter() - start:.0f} s")
        a, b = alternate(decode_tokens_per_s, Decoder(model), compiled, args.repeats, context, args.steps,
                         CLOCKS[args.clock])
        rows.append((f"decode tokens/s @ context {context_len}", a, b))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help=CLOCK_HELP)
    parser.add_argument("--compile", action="store_true",
                        help="also time our decoding compiled over a static cache against our eager decoding")
    parser.add_argument("--profile", action="store_true",
                        help="only profile our generate(): ms per decode step by component, at each context")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(load_preset(args.preset)).to(dtype)
    if args.profile:
        profile(ours.to(args.device).eval(), args)
        return
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype)
    ours, builtin = ours.to(args.device).eval(), builtin.to(args.device).eval()
    vocab = ours.config.vocab_size
    print(f"preset {args.preset}, {args.dtype}, device {args.device}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, {args.clock} clock")

    # warm-up (allocator, first-call overheads)
    warm = torch.randint(0, vocab, (args.batch, 32), device=args.device)
    alternate(decode_tokens_per_s, Decoder(ours), Decoder(builtin), 1, warm, 4)

    rows = []
    for context_len in args.contexts:
        context = torch.randint(0, vocab, (args.batch, context_len), device=args.device)
        a, b = alternate(decode_tokens_per_s, Decoder(ours), Decoder(builtin), args.repeats, context, args.steps,
                         CLOCKS[args.clock])
        rows.append((f"decode tokens/s @ context {context_len}", a, b))
    context = torch.randint(0, vocab, (args.batch, args.prefill), device=args.device)
    a, b = alternate(prefill_tokens_per_s, ours, builtin, args.repeats, context, CLOCKS[args.clock])
    rows.append((f"prefill tokens/s @ {args.prefill}", a, b))

    cache_ours, cache_builtin = new_cache(ours), new_cache(builtin)
    with torch.inference_mode():
        ours(warm, cache=cache_ours, use_cache=True)
        builtin(warm, cache=cache_builtin, use_cache=True)
    per_token_builtin = sum(k.nbytes + v.nbytes for k, v, _ in cache_builtin) // warm.numel()
    per_token_ours = cache_ours.nbytes() // warm.numel()

    compiled_rows = compiled_vs_eager(ours, args) if args.compile else []

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [{"measure": n, "ours": a, "builtin": b} for n, a, b in rows],
                       "compiled": [{"measure": n, "eager": a, "compiled": b} for n, a, b in compiled_rows],
                       "cache_bytes_per_token": {"ours": per_token_ours, "builtin": per_token_builtin}}, f, indent=1)
    print(f"\n{'measure':<34}{'ours':>14}{'built-in':>14}{'ours/built-in':>16}")
    for name, a, b in rows:
        print(f"{name:<34}{a:>14.1f}{b:>14.1f}{a / b:>15.2f}x")
    print(f"{'cache bytes / token (all layers)':<34}{per_token_ours:>14d}{per_token_builtin:>14d}"
          f"{per_token_ours / per_token_builtin:>15.2f}x")
    if compiled_rows:
        print(f"\n{'ours':<34}{'eager':>14}{'compiled':>14}{'compiled/eager':>16}")
        for name, a, b in compiled_rows:
            print(f"{name:<34}{a:>14.1f}{b:>14.1f}{b / a:>15.2f}x")


def profile(model, args) -> None:
    """The `--profile` run: a per-component breakdown of our decode step at each context (see step_profile.py)."""
    print(f"preset {args.preset}, {args.dtype}, device {args.device}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for context_len in args.contexts:
        context = torch.randint(0, model.config.vocab_size, (args.batch, context_len), device=args.device)
        result = step_profile.profile_decode(model, context, args.steps, args.repeats, eos_token_id=None)
        step_profile.print_breakdown(f"context {context_len}", result)
        results[context_len] = result
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "profile": results}, f, indent=1)


if __name__ == "__main__":
    main()

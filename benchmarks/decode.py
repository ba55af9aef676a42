"""Decode and prefill throughput of modeling_deepseek_v3 vs transformers' built-in DeepseekV3ForCausalLM.

Both models hold the same weights (exchanged through save_pretrained) and run in this process, alternating. Decode
is timed through `generate()` inside `torch.inference_mode()` (greedy, a random context and its all-ones attention
mask, each class with its own default cache), from the end of the prefill to the last new token: a logits processor
notes the clock once per new token, so the prefill is left out and every decode step is timed whole (the model's
forward and generate's own per-step work: token choice, mask and ids update, stop check). `--plain-generate` adds our
`generate()` called plainly, under the `torch.no_grad()` it sets itself, against it inside inference mode.
`--compile` adds our decoding compiled by torch.compile over a static latent cache (`MLAStaticCache`), against our
eager decoding over the default dynamic cache, alternating the same way (a plain forward loop: generate compiles by
itself only on accelerators).

Every run writes a result file (`--result-file`, default `benchmarks/results/decode.json`, or
`decode-profile.json` with `--profile`).

    python benchmarks/decode.py                       # preset bench, contexts 256 1024 4096
    python benchmarks/decode.py --contexts 256 1024 4096 16384 --steps 32 32 32 8   # steps per context
    python benchmarks/decode.py --contexts 256 --steps 16 --dtype bfloat16
    python benchmarks/decode.py --compile --contexts 256    # also compiled vs eager (compiles once per context)
    python benchmarks/decode.py --plain-generate --builtin-max-context 0   # ours: plain generate() vs inference mode
    python benchmarks/decode.py --profile --contexts 256    # ours only: ms per decode step by component
"""

from __future__ import annotations

import argparse
import tempfile
import time

import step_profile  # beside this script
import torch
from result_file import ResultFile  # beside this script
from step_profile import StepClock, sync  # beside this script
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache, StaticCache

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, MLAStaticCache, load_preset

# how a run is timed: elapsed time, or the CPU time of this process (all its threads)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = ("wall: elapsed time; cpu: this process's CPU time (time.process_time), which on a shared machine leaves "
              "out the time other processes hold the cores (meaningful with 1 thread)")


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


def generate_tokens_per_s(model, context: torch.Tensor, steps: int, clock=time.perf_counter,
                          inference_mode: bool = True) -> float:
    """Tokens/s of `steps` decode steps of greedy `generate()` after the prefill of `context` (all-ones mask), each
    class over its own default cache; inside `torch.inference_mode()`, or (`inference_mode=False`) called plainly,
    under the `torch.no_grad()` generate sets itself, where every operation still does autograd's bookkeeping."""
    step_clock = StepClock(clock, context.device)
    with torch.inference_mode(inference_mode):
        model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=steps + 1,
                       min_new_tokens=steps + 1, do_sample=False, pad_token_id=model.config.eos_token_id,
                       logits_processor=LogitsProcessorList([step_clock]))
    times = step_clock.times
    if len(times) != steps + 1:
        raise RuntimeError(f"generate produced {len(times)} tokens, expected {steps + 1}")
    return steps * context.shape[0] / (times[-1] - times[0])


@torch.inference_mode()
def decode_tokens_per_s(decoder: Decoder, context: torch.Tensor, steps: int, clock=time.perf_counter) -> float:
    """Tokens/s of `steps` greedy decode steps of a plain forward loop after an eager prefill of `context`, timed by
    `clock` (the compiled-vs-eager comparison)."""
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


def alternate(fn, first, second, repeats: int, *args) -> tuple[list[float], list[float]]:
    """`repeats` alternating runs (first, second, first, ...) so drift hits both equally; every sample of each.
    `second` None: only `first` runs."""
    a, b = [], []
    for _ in range(repeats):
        a.append(fn(first, *args))
        if second is not None:
            b.append(fn(second, *args))
    return a, b


def steps_per_context(args) -> dict[int, int]:
    if len(args.steps) not in (1, len(args.contexts)):
        raise ValueError(f"--steps takes one value or one per context ({len(args.contexts)}), got {args.steps}")
    steps = args.steps * len(args.contexts) if len(args.steps) == 1 else args.steps
    return dict(zip(args.contexts, steps))


def compiled_vs_eager(model, args, record: ResultFile) -> list[tuple[str, float, float]]:
    """Per context: tokens/s of our eager decoding (dynamic cache) and of our compiled static-cache decoding."""
    rows = []
    for context_len, steps in steps_per_context(args).items():
        context = torch.randint(0, model.config.vocab_size, (args.batch, context_len), device=args.device)
        compiled = Decoder(model, max_cache_len=context_len + steps + 1)
        start = time.perf_counter()
        decode_tokens_per_s(compiled, context, 2)  # compiles
        print(f"compiled the decode step for context {context_len} in {time.perf_counter() - start:.0f} s")
        a, b = alternate(decode_tokens_per_s, Decoder(model), compiled, args.repeats, context, steps,
                         CLOCKS[args.clock])
        a = record.add_series(f"ours eager decode tok/s (forward loop), context {context_len}", a, "tok/s")
        b = record.add_series(f"ours compiled decode tok/s (forward loop), context {context_len}", b, "tok/s")
        rows.append((f"decode tokens/s @ context {context_len}", a["median"], b["median"]))
    return rows


def plain_vs_inference_mode(model, args, record: ResultFile) -> list[tuple[str, float, float]]:
    """Per context: tokens/s of our `generate()` inside `torch.inference_mode()` and called plainly, alternating."""
    rows = []
    for context_len, steps in steps_per_context(args).items():
        context = torch.randint(0, model.config.vocab_size, (args.batch, context_len), device=args.device)
        a, b = alternate(lambda mode, *rest: generate_tokens_per_s(model, *rest, inference_mode=mode), True, False,
                         args.repeats, context, steps, CLOCKS[args.clock])
        a = record.add_series(f"ours decode tok/s inside inference_mode, context {context_len}", a, "tok/s")
        b = record.add_series(f"ours decode tok/s plain generate(), context {context_len}", b, "tok/s")
        rows.append((f"decode tokens/s @ context {context_len}", a["median"], b["median"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--steps", type=int, nargs="+", default=[32],
                        help="decode steps per measurement: one value, or one per context")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help=CLOCK_HELP)
    parser.add_argument("--compile", action="store_true",
                        help="also time our decoding compiled over a static cache against our eager decoding")
    parser.add_argument("--plain-generate", action="store_true",
                        help="also time our generate() called plainly (under its own no_grad) against it inside "
                             "torch.inference_mode(), as the comparison with the built-in class runs it")
    parser.add_argument("--profile", action="store_true",
                        help="only profile our generate(): ms per decode step by component, at each context")
    parser.add_argument("--builtin-max-context", type=int, default=4096,
                        help="longer contexts run ours only: the built-in prefill materialises [heads, t, t] scores "
                             "(16 GB in fp32 at 16k tokens)")
    parser.add_argument("--result-file", help="where the result file goes (default benchmarks/results/decode.json, "
                                              "decode-profile.json with --profile)")
    args = parser.parse_args(argv)
    steps = steps_per_context(args)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(load_preset(args.preset)).to(dtype)
    if args.profile:
        profile(ours.to(args.device).eval(), args, steps)
        return
    record = ResultFile("decode", args.result_file)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype)
    ours, builtin = ours.to(args.device).eval(), builtin.to(args.device).eval()
    vocab = ours.config.vocab_size
    print(f"preset {args.preset}, {args.dtype}, device {args.device}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, {args.clock} clock")

    # warm-up (allocator, first-call overheads)
    warm = torch.randint(0, vocab, (args.batch, 32), device=args.device)
    alternate(generate_tokens_per_s, ours, builtin, 1, warm, 4)

    rows = []
    for context_len, n in steps.items():
        context = torch.randint(0, vocab, (args.batch, context_len), device=args.device)
        other = builtin if context_len <= args.builtin_max_context else None
        a, b = alternate(generate_tokens_per_s, ours, other, args.repeats, context, n, CLOCKS[args.clock])
        a = record.add_series(f"ours decode tok/s, context {context_len}", a, "tok/s")["median"]
        b = record.add_series(f"built-in decode tok/s, context {context_len}", b, "tok/s")["median"] if b else None
        rows.append((f"decode tokens/s @ context {context_len}", a, b))
    context = torch.randint(0, vocab, (args.batch, args.prefill), device=args.device)
    a, b = alternate(prefill_tokens_per_s, ours, builtin, args.repeats, context, CLOCKS[args.clock])
    a = record.add_series(f"ours prefill tok/s, {args.prefill} tokens", a, "tok/s")["median"]
    b = record.add_series(f"built-in prefill tok/s, {args.prefill} tokens", b, "tok/s")["median"]
    rows.append((f"prefill tokens/s @ {args.prefill}", a, b))

    cache_ours, cache_builtin = new_cache(ours), new_cache(builtin)
    with torch.inference_mode():
        ours(warm, cache=cache_ours, use_cache=True)
        builtin(warm, cache=cache_builtin, use_cache=True)
    per_token_builtin = sum(k.nbytes + v.nbytes for k, v, _ in cache_builtin) // warm.numel()
    per_token_ours = cache_ours.nbytes() // warm.numel()

    compiled_rows = compiled_vs_eager(ours, args, record) if args.compile else []
    plain_rows = plain_vs_inference_mode(ours, args, record) if args.plain_generate else []

    record.write(extra={
        "args": vars(args), "package": modeling_deepseek_v3.__file__,
        "rows": [{"measure": n, "ours": a, "builtin": b, "ours_over_builtin": a / b if b else None}
                 for n, a, b in rows],
        "compiled": [{"measure": n, "eager": a, "compiled": b} for n, a, b in compiled_rows],
        "plain_generate": [{"measure": n, "inference_mode": a, "plain": b} for n, a, b in plain_rows],
        "cache_bytes_per_token": {"ours": per_token_ours, "builtin": per_token_builtin},
    })
    print(f"\n{'measure':<34}{'ours':>14}{'built-in':>14}{'ours/built-in':>16}")
    for name, a, b in rows:
        if b is None:
            print(f"{name:<34}{a:>14.1f}{'(not run)':>14}")
        else:
            print(f"{name:<34}{a:>14.1f}{b:>14.1f}{a / b:>15.2f}x")
    print(f"{'cache bytes / token (all layers)':<34}{per_token_ours:>14d}{per_token_builtin:>14d}"
          f"{per_token_ours / per_token_builtin:>15.2f}x")
    if compiled_rows:
        print(f"\n{'ours':<34}{'eager':>14}{'compiled':>14}{'compiled/eager':>16}")
        for name, a, b in compiled_rows:
            print(f"{name:<34}{a:>14.1f}{b:>14.1f}{b / a:>15.2f}x")
    if plain_rows:
        print(f"\n{'ours generate()':<34}{'inference_mode':>16}{'plain':>10}{'plain/inference':>17}")
        for name, a, b in plain_rows:
            print(f"{name:<34}{a:>16.1f}{b:>10.1f}{b / a:>16.2f}x")


def profile(model, args, steps: dict[int, int]) -> None:
    """The `--profile` run: a per-component breakdown of our decode step at each context (see step_profile.py)."""
    record = ResultFile("decode-profile", args.result_file)
    print(f"preset {args.preset}, {args.dtype}, device {args.device}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for context_len, n in steps.items():
        context = torch.randint(0, model.config.vocab_size, (args.batch, context_len), device=args.device)
        result = step_profile.profile_decode(model, context, n, args.repeats, eos_token_id=None)
        step_profile.print_breakdown(f"context {context_len}", result)
        record.add_series(f"ours untraced generate step ms, context {context_len}",
                          result.pop("untraced_step_ms_samples"), "ms")
        results[context_len] = result
    record.write(extra={"args": vars(args), "package": modeling_deepseek_v3.__file__, "profile": results})


if __name__ == "__main__":
    main()

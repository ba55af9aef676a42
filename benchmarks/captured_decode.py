"""End-to-end decoding at DeepSeek-V3's real widths: ms per token of our model and of transformers' built-in
DeepseekV3ForCausalLM on the same weights, eager and with the decode step compiled with `mode="reduce-overhead"`
over a static cache, which on CUDA captures the whole step as a CUDA graph (our Triton latent-decode and grouped-GEMM
kernels inside it, as custom operators).

The model is `--layers` layers of the deepseek-v3-671b preset (hidden 7168, 128 heads, q_lora 1536, kv_lora 512,
256 routed experts top-8 plus a shared one, vocabulary 129280; the first layer dense, the others MoE) in bf16 with
random weights, so the GPU has real work per launch. Weights go from ours to the built-in class through
save_pretrained in a temporary folder (in /dev/shm when it exists). A check compares the captured step's logits with
the eager step's.

    python benchmarks/captured_decode.py            # on a CUDA machine: benchmarks/results/captured_decode.json
    python benchmarks/captured_decode.py --dry-run --result-file /tmp/c.json   # CPU, tiny widths, backend "eager"

A failing check prints BAD and makes the exit status 1; a path that fails to run is reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

import decode  # beside this script
import torch
from result_file import ResultFile  # beside this script
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset


def build_models(config, dtype: torch.dtype, device: str):
    """Ours with random weights, built on `device` in `dtype`, and the built-in class loaded from its saved copy."""
    torch.set_default_dtype(dtype)  # parameters are created in `dtype` on the device, never in fp32 on the host
    try:
        with torch.device(device):
            ours = DeepseekV3ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    ours = ours.to(dtype).eval()
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        ours.save_pretrained(folder)
        builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    return ours, builtin


@torch.inference_mode()
def captured_vs_eager_logits(ours, context: torch.Tensor, compile_options: dict) -> float:
    """Max |captured - eager| of the first decode step's logits, relative to the largest eager logit. The compiled
    step runs three times over the reset static cache and the last is compared: under `reduce-overhead` the first
    calls warm up and record the CUDA graph, the third replays it."""
    eager_cache, compiled = decode.new_cache(ours), decode.Decoder(ours, context.shape[1] + 2, **compile_options)
    token = ours(context, cache=eager_cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    eager = ours(token, cache=eager_cache, use_cache=True, logits_to_keep=1).logits.float()
    for _ in range(3):
        cache = compiled.new_cache()
        ours(context, cache=cache, use_cache=True, logits_to_keep=1)
        captured = compiled.step(token, cache=cache, use_cache=True, logits_to_keep=1).logits.float()
    return ((captured - eager).abs().max() / eager.abs().max()).item()


def timed(results: dict, name: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, or None (with the error recorded) when that path fails."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # a path that cannot run (e.g. the built-in class failing to compile) is a result
        traceback.print_exc()
        results["failures"].append({"path": name, "error": f"{type(error).__name__}: {error}"[:2000]})
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the first dense), default 2")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths: checks the script, not the GPU")
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/captured_decode.json")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("captured_decode.py needs a CUDA GPU (or --dry-run)")
    widths = dict(num_hidden_layers=args.layers, first_k_dense_replace=1, num_nextn_predict_layers=0,
                  quantization_config=None)
    if args.dry_run:
        config = load_preset("tiny", **widths)
        compile_options, contexts = {"backend": "eager"}, sorted({min(c, 64) for c in args.contexts})
        args.steps, args.repeats = min(args.steps, 4), 1  # the script runs; nothing here is a measurement
    else:
        config = load_preset("deepseek-v3-671b", **widths)
        compile_options, contexts = {"mode": "reduce-overhead"}, args.contexts
    record = ResultFile("captured_decode", args.result_file)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "layers": args.layers, "widths": "tiny" if args.dry_run else "DeepSeek-V3",
               "dtype": "bfloat16", "compile": compile_options,
               "checks": {}, "rows": [], "failures": []}
    start = time.perf_counter()
    ours, builtin = build_models(config, dtype, device)
    print(f"{args.layers} layers at {results['widths']} widths, "
          f"{ours.num_parameters() / 1e9:.2f} B parameters each, built in {time.perf_counter() - start:.0f} s")

    vocab = config.vocab_size
    error = timed(results, "captured step check", captured_vs_eager_logits, ours,
                  torch.randint(0, vocab, (1, contexts[0]), device=device), compile_options)
    if error is not None:
        results["checks"]["captured step logits vs eager"] = {"rel_err": error, "tol": 2e-2, "ok": error <= 2e-2}
        print(f"{'ok ' if error <= 2e-2 else 'BAD'} captured step logits vs eager: relative error {error:.2e}")
    for context_len in contexts:
        context = torch.randint(0, vocab, (1, context_len), device=device)
        decoders = {}
        for who, model in (("ours", ours), ("builtin", builtin)):
            decoders[f"{who}_eager_ms"] = decode.Decoder(model)
            decoders[f"{who}_captured_ms"] = timed(results, f"{who} captured, context {context_len}", decode.Decoder,
                                                   model, context_len + args.steps + 1, **compile_options)
        for name, decoder in list(decoders.items()):  # warm-up: compiles and captures; a path that fails is dropped
            if decoder is None or timed(results, f"{name}, context {context_len}", decode.decode_tokens_per_s,
                                        decoder, context, 3) is None:
                del decoders[name]
        times = {name: [] for name in decoders}
        for _ in range(args.repeats):  # the paths in turn, so that drift hits all of them alike
            for name, decoder in decoders.items():
                times[name].append(1e3 / decode.decode_tokens_per_s(decoder, context, args.steps))
        row = {"context": context_len} | {name: statistics.median(ms) for name, ms in times.items()}
        for name, ms in times.items():
            record.add_series(f"context {context_len}: {name.removesuffix('_ms').replace('_', ' ')} ms per token",
                              ms, "ms")
        results["rows"].append(row)
        print(row, flush=True)
    print_table(results)
    record.write(extra=results)
    if not all(c["ok"] for c in results["checks"].values()) or results["failures"]:
        raise SystemExit(1)


def print_table(results: dict) -> None:
    print(f"\nend-to-end decode, {results['layers']} layers at {results['widths']} widths, bf16, batch 1, ms per token "
          f"({results['device']})")
    print(f"{'context':>8}{'ours eager':>12}{'ours captured':>15}{'built-in eager':>16}{'built-in captured':>19}"
          f"{'built-in eager / ours captured':>32}")

    def ms(value) -> str:
        return "failed" if value is None else f"{value:.3f}"

    for row in results["rows"]:
        ratio = row.get("builtin_eager_ms"), row.get("ours_captured_ms")
        speedup = f"{ratio[0] / ratio[1]:.2f}x" if None not in ratio else "-"
        print(f"{row['context']:>8}{ms(row.get('ours_eager_ms')):>12}{ms(row.get('ours_captured_ms')):>15}"
              f"{ms(row.get('builtin_eager_ms')):>16}{ms(row.get('builtin_captured_ms')):>19}{speedup:>32}")
    for failure in results["failures"]:
        print(f"BAD {failure['path']}: {failure['error'][:300]}")


if __name__ == "__main__":
    main()

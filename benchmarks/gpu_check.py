"""GPU check of the model: CUDA results equal the CPU reference, then decode/prefill timings vs the built-in class.

Run by `benchmarks/gpu_check.sh` on a machine with an NVIDIA GPU. Prints a table and writes the result file
(`--result-file`, default `benchmarks/results/gpu_check.json`; the decode runs' own result files beside it, as
`decode_b<batch>.json`). `--dry-run` runs the same steps on the CPU at tiny shapes (the "GPU" model is a second CPU
copy; the CUDA-only host-sync check is skipped): it checks the script, not a GPU.

    python benchmarks/gpu_check.py --result-file "$OUT/gpu_check.json"
    python benchmarks/gpu_check.py --dry-run --result-file /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import decode  # the CPU benchmark beside this script, reused with --device cuda
import torch
from result_file import ResultFile  # beside this script

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, load_preset
from modeling_deepseek_v3.kernels import grouped_mm, grouped_mm_ref

results: dict = {"checks": {}}


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (got.float().cpu() - ref.float().cpu()).abs().max().item()
    results["checks"][name] = {"max_abs_err": err, "tol": tol, "ok": err <= tol}
    print(f"{'ok ' if err <= tol else 'BAD'} {name}: max abs err {err:.3e} (tol {tol:g})", flush=True)


def random_model(**overrides) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(load_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


@torch.inference_mode()
def correctness(device: str) -> None:
    torch.manual_seed(0)
    cpu = random_model()
    gpu = random_model().to(device)
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(3, cpu.config.vocab_size, (3, 40))
    check("logits cuda fp32 vs cpu", gpu(ids.to(device)).logits, cpu(ids).logits, 1e-4)
    tokens_cpu = cpu.generate(ids[:, :8], max_new_tokens=32, do_sample=False)
    tokens_gpu = gpu.generate(ids[:, :8].to(device), max_new_tokens=32, do_sample=False)
    ok = torch.equal(tokens_cpu, tokens_gpu.cpu())
    results["checks"]["greedy 32 tokens cuda == cpu"] = {"ok": ok}
    print(f"{'ok ' if ok else 'BAD'} greedy 32 tokens cuda == cpu", flush=True)
    for path in ("expanded", "absorbed"):
        gpu.config.mla_attention_path = path
        cache = MLACache(gpu.config)
        gpu(ids[:, :-2].to(device), cache=cache, use_cache=True)
        out = gpu(ids[:, -2:].to(device), cache=cache, use_cache=True).logits
        if path == "expanded":
            expanded = out
    check("absorbed vs expanded (cuda fp32)", out, expanded, 1e-4)
    gpu.config.mla_attention_path = "auto"
    bf16 = gpu.to(torch.bfloat16)
    if device == "cuda":
        host_sync_check(bf16, ids)
    bf16_tokens = bf16.generate(ids[:, :8].to(device), max_new_tokens=16, do_sample=False)
    results["checks"]["bf16 generate runs"] = {"ok": bf16_tokens.shape == (3, 24)}
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.5)):
        counts = torch.tensor([70, 0, 129, 1, 300, 12, 0, 64])
        x = torch.randn(int(counts.sum()), 256, device=device, dtype=dtype)
        w = torch.randn(8, 512, 256, device=device, dtype=dtype).transpose(1, 2)
        offsets = counts.cumsum(0).to(torch.int32).to(device)
        check(f"grouped_mm {dtype} vs reference", grouped_mm(x, w, offsets), grouped_mm_ref(x, w, offsets), tol)


def host_sync_check(bf16, ids: torch.Tensor) -> None:
    """A bf16 decode step on CUDA must not read anything back to the host (that would stall the GPU queue every
    token). (The Triton grouped GEMMs find each tile's expert on the device; the decode kernel reads the mask as it
    is.)"""
    cache = MLACache(bf16.config)
    token = bf16(ids.cuda(), cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    # the first decode step autotunes the Triton kernels for its shapes (timing configs synchronises): check the next
    token = bf16(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        bf16(token, cache=cache, use_cache=True)
        sync_free, detail = True, ""
    except RuntimeError:
        frames = traceback.extract_tb(sys.exc_info()[2])
        sync_free, detail = False, " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in frames[-4:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    results["checks"]["bf16 decode step has no host sync"] = {"ok": sync_free, "detail": detail}
    print(f"{'ok ' if sync_free else 'BAD'} bf16 decode step has no host sync {detail}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, not a GPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --dry-run)")
    record = ResultFile("gpu_check", args.result_file)
    out_dir = record.path.parent
    results.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                   torch=torch.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 comparisons
    correctness(device)
    # the end-to-end decode benchmark at the preset bench; a dry run times the tiny preset over short contexts
    shape = ["--contexts", "256", "1024", "4096", "--steps", "64", "--repeats", "3"]
    if args.dry_run:
        shape = ["--preset", "tiny", "--contexts", "16", "--prefill", "16", "--steps", "2", "--repeats", "1"]
    timings = {}
    for batch in (1, 16):
        path = out_dir / f"decode_b{batch}.json"
        print(f"\n== decode benchmark, bf16, batch {batch}", flush=True)
        decode.main(["--dtype", "bfloat16", "--device", device, "--batch", str(batch), *shape,
                     "--result-file", str(path)])  # fmt: skip
        timings[f"batch{batch}"] = json.loads(Path(path).read_text())
    results["timings"] = timings
    record.write(extra=results)
    bad = [name for name, c in results["checks"].items() if not c["ok"]]
    print("\nall correctness checks passed" if not bad else f"\nFAILED checks: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""GPU check of the decode and MoE kernels: each against its torch reference, then timings at DeepSeek-V3's shapes.

1. Checks, on fresh random inputs: latent-attention decode (fp32 and bf16; left padding, speculative queries,
   forced splits) against `mla_decode_ref`, and over a paged pool (rows of different lengths) against
   `mla_decode_paged_ref`; DeepSeek-V3.2's sparse latent decode (each query over its chosen rows, some slots
   invalid) against `sparse_mla_decode_ref` in fp32; grouped matmul and fused SwiGLU, forward and every gradient,
   against autograd through their references; the FP8 grouped GEMM against `fp8_grouped_gemm_ref`.
2. Latent decode at DeepSeek-V3's head shapes (128 heads, c 512, r 64, one new token, bf16), batch {1, 16, 64} ×
   context {1k, 8k, 32k}: median of CUDA-event timings, L2 flushed before each run. Achieved GB/s counts the bytes
   the kernel must move: c_kv and k_pe read, q_lat and q_pe read, o_lat written. The model's torch absorbed path is
   timed beside it.
2b. Sparse latent decode (DeepSeek-V3.2) at the same head shapes, 2048 chosen keys per query (random rows), batch
   {1, 16, 64} × context {8k, 32k}: the Triton kernel and the torch gather path, timed as above; the bytes counted are
   the chosen rows read (k × (c + r) per query), the queries read and o_lat written.
3. Routed experts at DeepSeek-V3's shapes (hidden 7168, moe_intermediate 2048, 256 experts, top-8, 4096 tokens):
   TFLOP/s per projection group, 2·rows·H·I FLOPs per projection (rows = tokens × top-k), for the Triton bf16 kernels
   (fused gate+up SwiGLU, down), torch's bf16 `grouped_mm` with a separate SiLU·up, and the Triton FP8 kernels
   (activation quantisation included).

    python benchmarks/kernels_gpu.py                     # on a CUDA machine: benchmarks/results/kernels_gpu.json
    python benchmarks/kernels_gpu.py --dry-run --result-file /tmp/k.json   # CPU, tiny shapes: the script runs

The result file keeps every timed run (series "... us" / "... ms") beside the rows printed. A failing check prints
BAD and makes the exit status 1; the timings still run and the result file is still written.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from result_file import ResultFile  # beside this script

from modeling_deepseek_v3.kernels import (
    act_quant,
    act_quant_ref,
    fp8_grouped_gemm,
    fp8_grouped_gemm_ref,
    grouped_mm,
    grouped_mm_ref,
    grouped_swiglu,
    grouped_swiglu_ref,
    mla_decode,
    mla_decode_paged,
    mla_decode_paged_ref,
    mla_decode_ref,
    sparse_mla_decode,
    sparse_mla_decode_ref,
    weight_quant,
    weight_quant_ref,
)
from modeling_deepseek_v3.kernels.latent_decode import mla_decode_triton

H200_PEAK_GBS = 4800.0
results: dict = {"checks": {}, "decode": [], "sparse_decode": [], "moe": [], "failures": []}


def record(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    results["checks"][name] = {"rel_err": err, "tol": tol, "ok": ok}
    print(f"{'ok ' if ok else 'BAD'} {name}: relative error {err:.2e} (tol {tol:g})", flush=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the largest reference value."""
    got, ref = got.detach().float(), ref.detach().float()
    return ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def guarded(section: str, fn, *args) -> None:
    """Run one section; an exception is a failed check that does not stop the rest."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - report and carry on, the remaining sections still run
        detail = traceback.format_exc(limit=3)
        results["failures"].append({"section": section, "error": detail})
        print(f"BAD {section} raised:\n{detail}", flush=True)


# ---- 1. checks ----------------------------------------------------------------------------------------------------


def check_decode(device: str, shapes, dtypes) -> None:
    for (b, s, h, c, r, t, pad, splits), dtype in ((shape, dtype) for shape in shapes for dtype in dtypes):
        q_lat, q_pe = torch.randn(b, s, h, c, device=device), torch.randn(b, s, h, r, device=device)
        c_kv, k_pe = torch.randn(b, t, c, device=device), torch.randn(b, t, r, device=device)
        q_lat, q_pe, c_kv, k_pe = (x.to(dtype) for x in (q_lat, q_pe, c_kv, k_pe))
        mask = None
        if pad:  # row j left-padded by j·pad keys, queries causal among themselves
            mask = (torch.arange(t, device=device) <= torch.arange(t - s, t, device=device)[:, None]).repeat(b, 1, 1)
            for row in range(b):
                mask[row, :, : row * pad] = False
        scale = (c // 4) ** -0.5
        if splits is None:  # the public op, splits chosen for the GPU
            got = mla_decode(q_lat, q_pe, c_kv, k_pe, mask, scale)
        else:
            got = mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, scale, num_splits=splits)
        ref = mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, scale)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        name = f"mla_decode b{b} s{s} h{h} t{t} {'padded' if pad else 'causal'} splits {splits or 'auto'} {dtype}"
        record(name, rel_err(got, ref), tol)


def check_paged_decode(device: str, shapes, dtypes) -> None:
    """The paged decode (continuous batching) on rows of different lengths whose pages are scattered over one
    interleaved [pages, P, c + r] pool, against its reference."""
    for (seq_lens, s, h, c, r, page), dtype in ((shape, dtype) for shape in shapes for dtype in dtypes):
        b, width = len(seq_lens), max(-(-n // page) for n in seq_lens)
        pool = torch.randn(2 * b * width, page, c + r, device=device).to(dtype)
        block_table = torch.randperm(pool.shape[0], device=device)[: b * width].view(b, width).to(torch.int32)
        lens = torch.tensor(seq_lens, device=device, dtype=torch.int32)
        q_lat, q_pe = (torch.randn(b, s, h, d, device=device).to(dtype) for d in (c, r))
        args = (q_lat, q_pe, pool[..., :c], pool[..., c:], block_table, lens, (c // 4) ** -0.5)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        name = f"mla_decode_paged rows {seq_lens} s{s} h{h} page {page} {dtype}"
        record(name, rel_err(mla_decode_paged(*args), mla_decode_paged_ref(*args)), tol)


def sparse_inputs(device: str, b: int, s: int, h: int, c: int, r: int, t: int, k: int, dtype: torch.dtype,
                  invalid: float) -> tuple:
    """Random queries and latent cache, k random rows of the t keys per query, a fraction `invalid` of the slots
    marked invalid (their index -1, never read)."""
    q_lat, q_pe = (torch.randn(b, s, h, d, device=device).to(dtype) for d in (c, r))
    c_kv, k_pe = (torch.randn(b, t, d, device=device).to(dtype) for d in (c, r))
    indices = torch.randint(0, t, (b, s, k), device=device)
    valid = torch.rand(b, s, k, device=device) >= invalid
    return q_lat, q_pe, c_kv, k_pe, indices.masked_fill(~valid, -1), valid


def check_sparse_decode(device: str, shapes, dtypes) -> None:
    """DeepSeek-V3.2's sparse latent decode (the public op: the Triton kernel on CUDA) against its reference in
    fp32."""
    for (b, s, h, c, r, t, k, invalid), dtype in ((shape, dtype) for shape in shapes for dtype in dtypes):
        q_lat, q_pe, c_kv, k_pe, indices, valid = sparse_inputs(device, b, s, h, c, r, t, k, dtype, invalid)
        scale = (c // 4) ** -0.5
        got = sparse_mla_decode(q_lat, q_pe, c_kv, k_pe, indices, valid, scale)
        ref = sparse_mla_decode_ref(*(x.float() for x in (q_lat, q_pe, c_kv, k_pe)), indices, valid, scale)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        record(f"sparse_mla_decode b{b} s{s} h{h} t{t} k{k} invalid {invalid} {dtype}", rel_err(got, ref), tol)


def autograd_pair(fn, ref_fn, dy: torch.Tensor, *inputs):
    """`(outputs and gradients of fn, the same of ref_fn in fp32)` for the same inputs."""
    pairs = []
    for f, cast in ((fn, lambda x: x), (ref_fn, lambda x: x.float())):
        leaves = [cast(x).detach().requires_grad_() for x in inputs]
        out = f(*leaves)
        pairs.append([out, *torch.autograd.grad(out, leaves, cast(dy))])
    return pairs


def check_moe(device: str, n: int, k: int, counts, dtypes) -> None:
    offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    e, t = len(counts), sum(counts)
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        x = torch.randn(t, k, device=device, dtype=dtype)
        w_gate, w_up = ((torch.randn(e, n, k, device=device) * k**-0.5).to(dtype).transpose(1, 2) for _ in range(2))
        dy = torch.randn(t, n, device=device, dtype=dtype)
        ours, ref = autograd_pair(lambda a, b: grouped_mm(a, b, offsets), lambda a, b: grouped_mm_ref(a, b, offsets),
                                  dy, x, w_gate)
        for name, got, want in zip(("out", "dx", "dw"), ours, ref):
            record(f"grouped_mm {name} T{t} N{n} K{k} E{e} {dtype}", rel_err(got, want), tol)
        swiglu = lambda a, b, c: grouped_swiglu(a, b, c, offsets)  # noqa: E731
        swiglu_ref = lambda a, b, c: grouped_swiglu_ref(a, b, c, offsets)  # noqa: E731
        ours, ref = autograd_pair(swiglu, swiglu_ref, dy, x, w_gate, w_up)
        for name, got, want in zip(("out", "dx", "dw_gate", "dw_up"), ours, ref):
            record(f"grouped_swiglu {name} T{t} N{n} K{k} E{e} {dtype}", rel_err(got, want), tol)
    a, a_s = act_quant_ref(torch.randn(t, k, device=device))
    w, w_s = weight_quant_ref(torch.randn(e, n, k, device=device) * 0.05)
    # Hopper's FP8 tensor cores accumulate each 128-wide block with ~14 mantissa bits before the fp32 promotion
    for out_dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
        got = fp8_grouped_gemm(a, a_s, w, w_s, offsets, out_dtype)
        ref = fp8_grouped_gemm_ref(a, a_s, w, w_s, offsets, out_dtype=out_dtype)
        record(f"fp8_grouped_gemm T{t} N{n} K{k} E{e} {out_dtype}", rel_err(got, ref), tol)


# ---- timing ---------------------------------------------------------------------------------------------------------


def times_ms(fn, device: str, runs: int) -> list[float]:
    """Every time of `fn` over `runs` calls after two warm-up calls (which also autotune): CUDA events, with the L2
    cache flushed before each run, so a cache smaller than L2 is still read from memory."""
    fn()
    fn()
    if device != "cuda":
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_decode(device: str, batches, contexts, h: int, c: int, r: int, runs: int) -> None:
    dtype = torch.bfloat16
    results["decode_shape"] = f"bf16, one new token, h{h} c{c} r{r}"
    scale = 192**-0.5
    for b in batches:
        for t in contexts:
            q_lat, q_pe, c_kv, k_pe = (torch.randn(*shape, device=device, dtype=dtype)
                                       for shape in ((b, 1, h, c), (b, 1, h, r), (b, t, c), (b, t, r)))
            with torch.inference_mode():
                samples = times_ms(lambda: mla_decode(q_lat, q_pe, c_kv, k_pe, None, scale), device,  # noqa: B023
                                   runs)
                torch_samples = times_ms(lambda: mla_decode_ref(q_lat, q_pe, c_kv, k_pe, None, scale),  # noqa: B023
                                         device, runs)
            ms, ms_torch = statistics.median(samples), statistics.median(torch_samples)
            moved = sum(x.nbytes for x in (c_kv, k_pe, q_lat, q_pe)) + q_lat.nbytes  # + o_lat written, as q_lat
            row = {"batch": b, "context": t, "us": ms * 1e3, "gb_per_s": moved / ms / 1e6,
                   "torch_us": ms_torch * 1e3, "speedup_vs_torch": ms_torch / ms,
                   "us_samples": [x * 1e3 for x in samples], "torch_us_samples": [x * 1e3 for x in torch_samples]}
            row["fraction_of_h200_peak"] = row["gb_per_s"] / H200_PEAK_GBS
            results["decode"].append(row)
            print(f"decode b{b:<3} t{t:<6} {row['us']:9.1f} us {row['gb_per_s']:8.0f} GB/s   torch absorbed "
                  f"{row['torch_us']:9.1f} us ({row['speedup_vs_torch']:.2f}x)", flush=True)


def time_sparse_decode(device: str, batches, contexts, k: int, h: int, c: int, r: int, runs: int) -> None:
    results["sparse_decode_shape"] = f"bf16, one new token, h{h} c{c} r{r}, k{k} chosen keys"
    scale = 192**-0.5
    for b in batches:
        for t in contexts:
            args = sparse_inputs(device, b, 1, h, c, r, t, k, torch.bfloat16, 0.0)
            with torch.inference_mode():
                samples = times_ms(lambda: sparse_mla_decode(*args, scale), device, runs)  # noqa: B023
                torch_samples = times_ms(lambda: sparse_mla_decode_ref(*args, scale), device, runs)  # noqa: B023
            ms, ms_torch = statistics.median(samples), statistics.median(torch_samples)
            q_lat, q_pe, c_kv, k_pe = args[:4]
            moved = b * k * (c_kv[0, 0].nbytes + k_pe[0, 0].nbytes) + 2 * q_lat.nbytes + q_pe.nbytes
            row = {"batch": b, "context": t, "us": ms * 1e3, "gb_per_s": moved / ms / 1e6, "torch_us": ms_torch * 1e3,
                   "us_samples": [x * 1e3 for x in samples], "torch_us_samples": [x * 1e3 for x in torch_samples]}
            results["sparse_decode"].append(row)
            print(f"sparse decode b{b:<3} t{t:<6} {row['us']:9.1f} us {row['gb_per_s']:8.0f} GB/s   torch gather "
                  f"{row['torch_us']:9.1f} us", flush=True)


def fp8_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128-block FP8 copies of stacked `[E, N, K]` weights, one expert at a time (the whole stack in fp32 would
    not fit beside it)."""
    pairs = [weight_quant(w[e]) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def time_moe(device: str, tokens: int, hidden: int, inter: int, experts: int, top_k: int, runs: int) -> None:
    dtype = torch.bfloat16
    results["moe_shape"] = f"bf16, {tokens} tokens x top-{top_k}, E{experts} H{hidden} I{inter}"
    chosen = torch.rand(tokens, experts, device=device).topk(top_k, dim=-1).indices.flatten()
    order = chosen.argsort(stable=True)
    offsets = torch.bincount(chosen, minlength=experts).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)[order // top_k]  # [T·K, H], grouped by expert
    gate, up = (torch.randn(experts, inter, hidden, device=device, dtype=dtype).mul_(hidden**-0.5) for _ in range(2))
    down = torch.randn(experts, hidden, inter, device=device, dtype=dtype).mul_(inter**-0.5)
    hidden_act = torch.randn(x.shape[0], inter, device=device, dtype=dtype)  # the input of down_proj
    gate_t, up_t, down_t = gate.transpose(1, 2), up.transpose(1, 2), down.transpose(1, 2)
    (gate_q, gate_s), (up_q, up_s), (down_q, down_s) = fp8_experts(gate), fp8_experts(up), fp8_experts(down)

    def fp8_gate_up():
        q, s = act_quant(x)
        return F.silu(fp8_grouped_gemm(q, s, gate_q, gate_s, offsets)) * fp8_grouped_gemm(q, s, up_q, up_s, offsets)

    def fp8_down():
        return fp8_grouped_gemm(*act_quant(hidden_act), down_q, down_s, offsets)

    paths = {
        "gate+up": {"triton bf16": lambda: grouped_swiglu(x, gate_t, up_t, offsets),  # SiLU·up fused
                    "torch bf16 grouped_mm": lambda: F.silu(F.grouped_mm(x, gate_t, offs=offsets))
                    * F.grouped_mm(x, up_t, offs=offsets),
                    "triton fp8": fp8_gate_up},
        "down": {"triton bf16": lambda: grouped_mm(hidden_act, down_t, offsets),
                 "torch bf16 grouped_mm": lambda: F.grouped_mm(hidden_act, down_t, offs=offsets),
                 "triton fp8": fp8_down},
    }
    rows = x.shape[0]
    totals: dict[str, float] = {}
    with torch.inference_mode():
        for group, variants in paths.items():
            flops = 2 * rows * hidden * inter * (2 if group == "gate+up" else 1)
            for variant, fn in variants.items():
                samples = times_ms(fn, device, runs)
                ms = statistics.median(samples)
                totals[variant] = totals.get(variant, 0.0) + ms
                results["moe"].append({"projections": group, "path": variant, "ms": ms, "tflops": flops / ms / 1e9,
                                       "ms_samples": samples})
    for variant, ms in totals.items():
        results["moe"].append({"projections": "all three", "path": variant, "ms": ms,
                               "tflops": 2 * rows * 3 * hidden * inter / ms / 1e9})
    torch_ms = {r["projections"]: r["ms"] for r in results["moe"] if r["path"] == "torch bf16 grouped_mm"}
    for r in results["moe"]:
        r["speedup_vs_torch_bf16"] = torch_ms[r["projections"]] / r["ms"]
        print(f"moe {r['projections']:<10} {r['path']:<28} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s "
              f"({r['speedup_vs_torch_bf16']:.2f}x torch bf16)", flush=True)


def print_table(results: dict) -> None:
    """The decode and MoE tables and the checks' verdict of one run (also printed by `gpu_summary.py`)."""
    print(f"\nlatent decode ({results.get('decode_shape')}; {results.get('device')})\n{'':<38}{'us':>9}{'GB/s':>8}"
          f"{'of 4.8 TB/s':>13}{'torch us':>10}{'speed-up':>10}")
    for r in results["decode"]:
        print(f"{'batch ' + str(r['batch']) + ', context ' + str(r['context']):<38}{r['us']:>9.1f}"
              f"{r['gb_per_s']:>8.0f}{r['fraction_of_h200_peak']:>12.0%} {r['torch_us']:>10.1f}"
              f"{r['speedup_vs_torch']:>9.2f}x")
    print(f"\nrouted experts ({results.get('moe_shape')})\n{'projections':<38}{'path':<30}{'ms':>8}{'TFLOP/s':>9}"
          f"{'vs torch':>10}")
    for r in results["moe"]:
        print(f"{r['projections']:<38}{r['path']:<30}{r['ms']:>8.3f}{r['tflops']:>9.1f}"
              f"{r['speedup_vs_torch_bf16']:>9.2f}x")
    bad = [name for name, c in results["checks"].items() if not c["ok"]] + [f["section"] for f in results["failures"]]
    print(f"\n{len(results['checks'])} kernel checks, " + (f"FAILED: {bad}" if bad else "all passed"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result-file", default=None, help="default: benchmarks/results/kernels_gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, not the kernels")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels_gpu.py needs a CUDA GPU (or --dry-run)")
    record = ResultFile("kernels_gpu", args.result_file)
    torch.manual_seed(0)
    results.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                   torch=torch.__version__, triton=triton.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are exact fp32
    if args.dry_run:
        # (b, s, h, c, r, t, left padding per row, forced splits); dry-run decode runs the reference (no Triton)
        decode_shapes = [(2, 1, 8, 64, 16, 100, 7, None), (2, 3, 8, 64, 16, 77, 0, None)]
        paged_shapes = [((37, 100, 5), 1, 8, 64, 16, 16)]
        sparse_shapes = [(2, 3, 8, 64, 16, 100, 20, 0.3)]  # (b, s, h, c, r, t, k, invalid fraction)
        sparse_timing = ((1, 2), (64, 256), 20)  # batches, contexts, chosen keys
        moe_shape, moe_counts = (40, 64), [5, 0, 17, 3]
        batches, contexts, heads, c, r = (1, 2), (64, 256), 8, 64, 16
        moe_timing = (16, 256, 128, 8, 2)
    else:
        decode_shapes = [(3, 1, 128, 512, 64, 1000, 300, None), (2, 3, 128, 512, 64, 777, 0, None),
                         (4, 2, 16, 512, 64, 4099, 1000, 7), (2, 8, 16, 512, 64, 300, 0, 1)]
        paged_shapes = [((1000, 37, 4099, 256, 2), 1, 128, 512, 64, 64), ((300, 5000), 3, 16, 512, 64, 256)]
        sparse_shapes = [(3, 1, 128, 512, 64, 5000, 2048, 0.0), (2, 3, 16, 512, 64, 1000, 777, 0.4)]
        sparse_timing = ((1, 16, 64), (8192, 32768), 2048)
        moe_shape, moe_counts = (2048, 1536), [300, 0, 129, 1, 700, 12, 0, 64]
        batches, contexts, heads, c, r = (1, 16, 64), (1024, 8192, 32768), 128, 512, 64
        moe_timing = (4096, 7168, 2048, 256, 8)
    guarded("decode checks", check_decode, device, decode_shapes, (torch.float32, torch.bfloat16))
    guarded("paged decode checks", check_paged_decode, device, paged_shapes, (torch.float32, torch.bfloat16))
    guarded("sparse decode checks", check_sparse_decode, device, sparse_shapes, (torch.float32, torch.bfloat16))
    guarded("moe checks", check_moe, device, *moe_shape, moe_counts, (torch.float32, torch.bfloat16))
    guarded("decode timings", time_decode, device, batches, contexts, heads, c, r, args.runs)
    guarded("sparse decode timings", time_sparse_decode, device, *sparse_timing, heads, c, r, args.runs)
    guarded("moe timings", time_moe, device, *moe_timing, args.runs)
    print_table(results)
    for r in results["decode"]:
        label = f"latent decode batch {r['batch']}, context {r['context']}"
        record.add_series(f"{label}: triton us", r["us_samples"], "us")
        record.add_series(f"{label}: torch absorbed us", r["torch_us_samples"], "us")
    for r in results["sparse_decode"]:
        label = f"sparse latent decode batch {r['batch']}, context {r['context']}"
        record.add_series(f"{label}: triton us", r["us_samples"], "us")
        record.add_series(f"{label}: torch gather us", r["torch_us_samples"], "us")
    for r in results["moe"]:
        if "ms_samples" in r:  # the "all three" rows are sums of the medians of the others
            record.add_series(f"routed experts {r['projections']}, {r['path']}: ms", r["ms_samples"], "ms")
    record.write(extra=results)
    if results["failures"] or not all(c["ok"] for c in results["checks"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

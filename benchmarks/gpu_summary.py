"""The one table at the end of `gpu_check.sh`: reads the result files of its steps (kernels_gpu.json, gpu_check.json,
fp8.json, captured_decode.json) from a folder, prints their headline numbers together and writes all of them to
gpu_all.json there.

    python benchmarks/gpu_summary.py "$OUT"
"""

from __future__ import annotations

import json
import os
import sys

import captured_decode  # beside this script
import kernels_gpu

STEPS = ("kernels_gpu", "gpu_check", "fp8", "captured_decode")


def load(folder: str, step: str) -> dict | None:
    """A step's numbers, or None when it failed before writing them."""
    path = os.path.join(folder, f"{step}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def failed_checks(checks: dict) -> list[str]:
    return [name for name, c in checks.items() if not (c["ok"] if isinstance(c, dict) else c)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "."
    data = {step: load(folder, step) for step in STEPS}
    print("\n" + "=" * 110 + "\nGPU check summary")
    for step, numbers in data.items():
        if numbers is None:
            print(f"BAD {step}: no results (the step failed before writing them)")
            continue
        bad = failed_checks(numbers.get("checks", {}))
        print(f"{'BAD' if bad else 'ok '} {step}: {len(numbers.get('checks', {}))} checks" +
              (f", failed: {bad}" if bad else ", all passed"))
    if data["kernels_gpu"] is not None:
        kernels_gpu.print_table(data["kernels_gpu"])
    if data["gpu_check"] is not None:
        print(f"\n{'end-to-end decode benchmark, bf16 (decode.py result files)':<80}{'median':>12}")
        for batch, run in data["gpu_check"].get("timings", {}).items():
            for label, series in run.get("series", {}).items():
                print(f"{batch + ' ' + label:<80}{series['median']:>12.2f} {series['unit']}")
    if data["fp8"] is not None:
        print(f"\n{'FP8 GEMM (M N K)':<44}{'FP8 TFLOP/s':>12}{'bf16 TFLOP/s':>14}{'FP8/bf16':>10}")
        for r in data["fp8"].get("timings", []):
            print(f"{str((r['m'], r['n'], r['k'])):<44}{r['fp8_tflops']:>12.1f}{r['bf16_tflops']:>14.1f}"
                  f"{r['fp8_tflops'] / r['bf16_tflops']:>9.2f}x")
    if data["captured_decode"] is not None:
        captured_decode.print_table(data["captured_decode"])
    with open(os.path.join(folder, "gpu_all.json"), "w") as f:
        json.dump(data, f, indent=1)
    if any(numbers is None for numbers in data.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

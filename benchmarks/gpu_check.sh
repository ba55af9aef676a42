#!/usr/bin/env bash
# One prepared GPU check (planned at about 5 minutes on an H200, under 8): the latent-attention decode and grouped-GEMM
# MoE kernels against their references, then their GB/s and TFLOP/s at DeepSeek-V3's shapes (kernels_gpu.py); CUDA
# correctness of the model against the CPU reference and decode/prefill timings against transformers' built-in
# DeepseekV3ForCausalLM (gpu_check.py); every FP8 kernel against its reference, whole FP8 models and FP8 training
# against the CPU, and FP8 GEMM TFLOP/s (fp8.py); end-to-end ms per token at DeepSeek-V3's widths (2 layers), eager
# and with the decode step captured as a CUDA graph, against the built-in class (captured_decode.py, about 3 minutes
# more); last, one summary table of all of them (gpu_summary.py).
# Result files land in $OUT (or the current folder), all together in gpu_all.json. A failed check prints BAD and
# makes the exit status 1 without stopping the later steps. Needs an NVIDIA GPU with torch; the project and
# transformers>=5.24 are installed from wheels in .whl/ when present (a machine without network), else from this
# checkout.
#
# `bash benchmarks/gpu_check.sh --dry-run` runs the same steps on the CPU at tiny shapes, with this checkout and the
# Python environment as they are (nothing installed, no nvidia-smi; fp8.py runs its CPU part): it shows that every
# step starts and writes its result file, so a GPU session does not lose its minutes to a script that cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=(--dry-run)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import this checkout's package
elif [ $# -gt 0 ]; then
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
    exit 2
elif compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
else
    python3 -m pip install -q -e .
fi
[ ${#dry_run[@]} -gt 0 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
status=0
python3 benchmarks/kernels_gpu.py "${dry_run[@]}" --result-file "$OUT/kernels_gpu.json" || status=1
python3 benchmarks/gpu_check.py "${dry_run[@]}" --result-file "$OUT/gpu_check.json" || status=1
python3 benchmarks/fp8.py --result-file "$OUT/fp8.json" || status=1
python3 benchmarks/captured_decode.py "${dry_run[@]}" --result-file "$OUT/captured_decode.json" || status=1
python3 benchmarks/gpu_summary.py "$OUT" || status=1
exit $status

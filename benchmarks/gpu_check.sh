#!/usr/bin/env bash
# One prepared GPU check (planned at about 5 minutes on an H200, under 8): the latent-attention decode and grouped-GEMM
# MoE kernels against their references, then their GB/s and TFLOP/s at DeepSeek-V3's shapes (kernels_gpu.py); CUDA
# correctness of the model against the CPU reference and decode/prefill timings against transformers' built-in
# DeepseekV3ForCausalLM (gpu_check.py); every FP8 kernel against its reference, whole FP8 models and FP8 training
# against the CPU, and FP8 GEMM TFLOP/s (fp8.py); end-to-end ms per token at DeepSeek-V3's widths (2 layers), eager
# and with the decode step captured as a CUDA graph, against the built-in class (captured_decode.py, about 3 minutes
# more); last, one summary table of all of them (gpu_summary.py).
# Numbers land in $OUT (or the current folder) as JSON, all together in gpu_all.json. A failed check prints BAD and
# makes the exit status 1 without stopping the later steps. Needs an NVIDIA GPU with torch; the project and
# transformers>=5.24 are installed from wheels in .whl/ when present (a machine without network), else from this
# checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
else
    python3 -m pip install -q -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1
status=0
python3 benchmarks/kernels_gpu.py --json "${OUT:-.}/kernels_gpu.json" || status=1
python3 benchmarks/gpu_check.py || status=1
python3 benchmarks/fp8.py --json "${OUT:-.}/fp8.json" || status=1
python3 benchmarks/captured_decode.py --json "${OUT:-.}/captured_decode.json" || status=1
python3 benchmarks/gpu_summary.py "${OUT:-.}" || status=1
exit $status

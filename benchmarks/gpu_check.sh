#!/usr/bin/env bash
# One prepared GPU check: CUDA correctness of the model against the CPU reference, then timings against
# transformers' built-in DeepseekV3ForCausalLM. Needs an NVIDIA GPU with torch; the project and transformers>=5.24
# are installed from wheels in .whl/ when present (a machine without network), else from this checkout.
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
python3 benchmarks/gpu_check.py

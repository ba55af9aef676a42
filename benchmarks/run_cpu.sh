#!/usr/bin/env bash
# Re-runs the CPU benchmarks whose result files back the figures in README.md and docs/, and rewrites those files in
# benchmarks/results/ (commit them with the text that quotes them). One torch thread each, as the docs' figures were
# taken: on a shared machine threads that wait for busy cores slow every step many times over.
#
#   bash benchmarks/run_cpu.sh           # the docs' sizes, rewrites benchmarks/results/*.json; long: balance and
#                                        # speculative decoding train models (hours on a loaded 2-core CPU)
#   bash benchmarks/run_cpu.sh --quick   # every script at tiny sizes, a few minutes on 2 cores; writes to
#                                        # benchmarks/results/quick/ (ignored by git), never over the committed files
#
# The scripts import this checkout's package (PYTHONPATH), so a result file's commit is the code that ran.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

run() {
    echo "+ $*"
    "$@"
}

if [ "${1:-}" = "--quick" ]; then
    results=benchmarks/results/quick
    mkdir -p "$results"
    run python benchmarks/dispatch_traffic.py --tokens 512 --result-file "$results/dispatch_traffic.json"
    run python benchmarks/parallel_memory.py --result-file "$results/parallel_memory.json"
    run python benchmarks/fp8.py --result-file "$results/fp8.json"
    run python benchmarks/decode.py --preset tiny --contexts 64 --prefill 64 --steps 4 --repeats 1 --threads 1 --plain-generate \
        --result-file "$results/decode.json"
    run python benchmarks/batching.py --preset tiny --requests 8 --max-prompt 32 --min-new 4 --max-new 16 \
        --new-tokens 8 --repeats 1 --no-builtin --result-file "$results/batching.json"
    run python benchmarks/balance.py --steps 20 --threads 1 --out "$results/balance-run" \
        --result-file "$results/balance.json"
    run python benchmarks/speculative.py --retrain --steps 10 --new-tokens 8 --batches 1 --repeats 1 --threads 1 \
        --cache-dir "$results/speculative-model" --result-file "$results/speculative.json"
    run python benchmarks/speculative_batching.py --cache-dir "$results/speculative-model" --requests 8 \
        --concurrency 1 4 --min-new 4 --max-new 12 --repeats 1 --result-file "$results/speculative_batching.json"
elif [ $# -eq 0 ]; then
    run python benchmarks/dispatch_traffic.py
    run python benchmarks/parallel_memory.py
    run python benchmarks/fp8.py
    run python benchmarks/decode.py --threads 1 --clock cpu --result-file benchmarks/results/decode.json
    run python benchmarks/batching.py --no-builtin --small-pool 0.33 --repeats 3
    run python benchmarks/balance.py --steps 150 --threads 1 --out balance-run
    cp balance-run/expert_load_gamma_*.png docs/  # the plots docs/training.md shows
    run python benchmarks/speculative.py --retrain --threads 1
    run python benchmarks/speculative_batching.py  # the model speculative.py just trained
else
    echo "usage: bash benchmarks/run_cpu.sh [--quick]" >&2
    exit 2
fi

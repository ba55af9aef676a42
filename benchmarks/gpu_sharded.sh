#!/usr/bin/env bash
# GPU check of sharded training and generation, prepared but not yet run on GPUs (about 5 minutes planned):
#  1. DeepseekV3Trainer on the `tiny` preset (examples/finetune.py) on every GPU of the machine under accelerate FSDP2
#     and DeepSpeed ZeRO-3 (examples/accelerate/*.yaml; DeepSpeed only where it is installed): every rank must end
#     with the same routing-bias checksum;
#  2. with 2 or more GPUs, on 2 of them, transformers' own engine: training under --fsdp 2 --ep 2 and --tp 2 (the
#     same checksum on both ranks), and examples/parallel_generate.py under tp, tp+ep (both dispatches), pp and
#     fsdp+ep, where greedy and self-speculative tokens must be identical.
# Logs land in $OUT (or the current folder). A failed check prints BAD and makes the exit status 1 without stopping
# the later ones.
#
# `bash benchmarks/gpu_sharded.sh --dry-run` runs the same checks on 2 CPU processes (gloo; accelerate's FSDP2 config
# then runs plain DDP, it warns), 2 training steps and 4 new tokens each, with this checkout's package: it shows that
# every command starts and prints what its check reads, so a GPU session does not lose its minutes to a script that
# cannot run. Training under --tp is skipped there: accelerate refuses a tensor-parallel Trainer on CPU processes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
STEPS=20
NEW_TOKENS=16
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    GPUS=2 STEPS=2 NEW_TOKENS=4 DRY_RUN=1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [ $# -gt 0 ]; then
    echo "usage: bash benchmarks/gpu_sharded.sh [--dry-run]" >&2
    exit 2
else
    GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
fi
export PYTHONUNBUFFERED=1
status=0

report() {  # name, log, condition already evaluated ($?)
    if [ "$3" -eq 0 ]; then echo "ok  $1"; else echo "BAD $1 (see $2)"; status=1; fi
}

train() {  # name, processes, command...: every process prints the same routing-bias checksum
    local name=$1 processes=$2 log="$OUT/$1.log"
    shift 2
    "$@" > "$log" 2>&1
    local ran=$? printed distinct moved
    printed=$(grep -c "routing-bias checksum" "$log")
    distinct=$(grep -o "routing-bias checksum [^ ]*" "$log" | sort -u | wc -l)
    # the biases moved: a fresh model's are all 0
    moved=$(grep -o "|b| sum [0-9.]*" "$log" | awk '$3 > 0' | wc -l)
    [ "$ran" -eq 0 ] && [ "$printed" -eq "$processes" ] && [ "$distinct" -eq 1 ] && [ "$moved" -eq "$processes" ]
    report "$name" "$log" $?
}

generate() {  # name, layout flags: greedy and speculative tokens identical
    local name=$1 log="$OUT/$1.log"
    shift
    torchrun --standalone --nproc_per_node 2 examples/parallel_generate.py "$@" --new-tokens "$NEW_TOKENS" \
        --out "$OUT/parallel-generate-model" \
        > "$log" 2>&1 && grep -q "identical: True" "$log"
    report "$name" "$log" $?
}

train accelerate-fsdp2 "$GPUS" accelerate launch --config_file examples/accelerate/fsdp2.yaml \
    --num_processes "$GPUS" examples/finetune.py --steps "$STEPS" --out "$OUT/run-fsdp2"
if python3 -c "import deepspeed" 2> /dev/null; then
    train accelerate-zero3 "$GPUS" accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml \
        --num_processes "$GPUS" examples/finetune.py --steps "$STEPS" --out "$OUT/run-zero3"
else
    echo "skip accelerate-zero3: deepspeed is not installed"
fi
if [ "$GPUS" -ge 2 ]; then
    train engine-fsdp-ep 2 torchrun --standalone --nproc_per_node 2 examples/finetune.py --fsdp 2 --ep 2 \
        --steps "$STEPS" --out "$OUT/run-fsdp-ep"
    if [ "$DRY_RUN" = 1 ]; then  # accelerate refuses a tensor-parallel Trainer on CPU processes (MULTI_CPU)
        echo "skip engine-tp: Trainer over a tensor-parallel model needs GPUs"
    else
        train engine-tp 2 torchrun --standalone --nproc_per_node 2 examples/finetune.py --tp 2 --steps "$STEPS" \
            --out "$OUT/run-tp"
    fi
    generate generate-tp --tp 2
    generate generate-tp-ep-all-reduce --tp 2 --ep 2 --ep-implementation all_reduce
    generate generate-tp-ep-all-to-all --tp 2 --ep 2 --ep-implementation all_to_all
    generate generate-pp --pp 2
    generate generate-fsdp-ep --fsdp 2 --ep 2
else
    echo "skip transformers' engine checks: they need 2 GPUs, found $GPUS"
fi
exit $status

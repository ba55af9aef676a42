"""The GPU scripts start: their CPU dry runs (tiny shapes, the torch references or Triton's interpreter) finish and
write their result files, so a GPU session does not lose its minutes to a script that cannot run."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_dry(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(["bash", f"benchmarks/{script}", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_the_summary(tmp_path):
    result = run_dry("gpu_check.sh", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for step in ("kernels_gpu", "gpu_check", "fp8", "captured_decode"):
        record = json.loads((tmp_path / f"{step}.json").read_text())
        assert record["benchmark"] == step
        if step in ("kernels_gpu", "captured_decode"):  # the GPU scripts' own dry runs, each with raw samples
            assert record["device"] == "cpu (dry run)"
            assert record["series"] and all(len(s["samples"]) == s["n"] >= 1 for s in record["series"].values())
    assert "BAD" not in result.stdout and "GPU check summary" in result.stdout
    assert set(json.loads((tmp_path / "gpu_all.json").read_text())) == {"kernels_gpu", "gpu_check", "fp8",
                                                                         "captured_decode"}


@pytest.mark.slow
def test_gpu_sharded_dry_run_passes_every_check_on_cpu_processes(tmp_path):
    result = run_dry("gpu_sharded.sh", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "BAD ", "skip "))]
    assert [line.split()[1] for line in checks if line.startswith("ok ")] == [
        "accelerate-fsdp2", "accelerate-zero3", "engine-fsdp-ep", "generate-tp", "generate-tp-ep-all-reduce",
        "generate-tp-ep-all-to-all", "generate-pp", "generate-fsdp-ep"], checks
    assert "skip engine-tp: Trainer over a tensor-parallel model needs GPUs" in checks


def test_gpu_scripts_refuse_an_unknown_argument():
    for script in ("gpu_check.sh", "gpu_sharded.sh"):
        result = subprocess.run(["bash", f"benchmarks/{script}", "--dryrun"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and f"usage: bash benchmarks/{script} [--dry-run]" in result.stderr

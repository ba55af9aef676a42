"""The GPU scripts start: their CPU dry runs (tiny shapes, the torch references or Triton's interpreter) finish and
write their result files, so a GPU session does not lose its minutes to a script that cannot run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["kernels_gpu.py", "captured_decode.py"])
def test_gpu_script_dry_run_writes_its_results(script, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--dry-run", "--result-file", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] == "cpu (dry run)"
    assert record["series"] and all(len(s["samples"]) == s["n"] >= 1 for s in record["series"].values())


def run_dry(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(["bash", f"benchmarks/{script}", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_the_summary(tmp_path):
    result = run_dry("gpu_check.sh", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for step in ("kernels_gpu", "gpu_check", "fp8", "captured_decode"):
        assert json.loads((tmp_path / f"{step}.json").read_text())["benchmark"] == step
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

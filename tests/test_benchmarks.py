"""The GPU scripts start: their CPU dry runs (tiny shapes, the torch references or Triton's interpreter) finish and
write their result files, so a GPU session does not lose its minutes to a script that cannot run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["kernels_gpu.py", "captured_decode.py"])
def test_gpu_script_dry_run_writes_its_results(script, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--dry-run", "--result-file", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["device"] == "cpu (dry run)"

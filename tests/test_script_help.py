"""The example and benchmark scripts answer `--help` with their usage, every flag explained, and do nothing else."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})


@pytest.mark.parametrize("path", ["benchmarks/parallel_memory.py", "examples/parallel_generate.py"])
def test_help_prints_the_usage_and_runs_nothing(path):
    done = run_script(path, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
    assert "| inference layout" not in done.stdout  # parallel_memory.py's table: the computation did not run


def test_parallel_memory_refuses_unknown_arguments():
    done = run_script("benchmarks/parallel_memory.py", "--tp", "8")
    assert done.returncode == 2 and "unrecognized arguments: --tp 8" in done.stderr


def test_every_flag_of_parallel_generate_is_explained():
    spec = importlib.util.spec_from_file_location("parallel_generate", ROOT / "examples" / "parallel_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = [a for a in module.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} >= {"model", "tp", "ep", "ep_implementation", "prompt", "new_tokens", "out"}
    assert [a.dest for a in actions if not a.help] == []

"""The example and benchmark scripts answer `--help` with their usage, every flag explained, and do nothing else."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(path: str, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python path args...`, run in this process as the interpreter runs a script
    (its folder first on sys.path, `__main__`): a fresh interpreter would spend 5 s importing torch and transformers
    again before the script reads its arguments."""
    monkeypatch.syspath_prepend(str((ROOT / path).parent))
    monkeypatch.setattr(sys, "argv", [path, *args])
    try:
        runpy.run_path(str(ROOT / path), run_name="__main__")
        status = 0
    except SystemExit as exited:
        status = exited.code or 0
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("path", ["benchmarks/parallel_memory.py", "examples/parallel_generate.py"])
def test_help_prints_the_usage_and_runs_nothing(path, monkeypatch, capsys):
    status, out, err = run_script(path, "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0, err[-2000:]
    assert out.startswith("usage: "), out[:500]
    assert "| inference layout" not in out  # parallel_memory.py's table: the computation did not run


def test_parallel_memory_refuses_unknown_arguments(monkeypatch, capsys):
    status, _, err = run_script("benchmarks/parallel_memory.py", "--tp", "8", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and "unrecognized arguments: --tp 8" in err


def test_every_flag_of_parallel_generate_is_explained():
    spec = importlib.util.spec_from_file_location("parallel_generate", ROOT / "examples" / "parallel_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = [a for a in module.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} >= {"model", "tp", "ep", "ep_implementation", "prompt", "new_tokens", "out"}
    assert [a.dest for a in actions if not a.help] == []

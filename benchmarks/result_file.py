"""One JSON result file per benchmark run, committed under `benchmarks/results/`.

Every figure the README or `docs/` quotes names the file it comes from. A file holds what is needed to judge and
repeat the run: the command, the git commit (and whether the tree had uncommitted changes), the date, the machine
(CPU model, cores, torch threads, load average at the start and end; GPU model and driver where one was used), the
versions of torch / transformers / triton, every raw sample, and the median / min / max of each series it reports.

    from result_file import ResultFile              # beside the benchmark scripts
    record = ResultFile("decode")                  # notes the start (load average, clock)
    record.add_series("ours decode tok/s, context 256", samples)
    record.write(extra={"rows": rows})             # benchmarks/results/decode.json, or --result-file's path
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a run used: CPU, threads, memory, load, and the GPU when CUDA is available."""
    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["gpu_driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["gpu_driver"] = None
    return info


def summary(samples: list[float]) -> dict:
    """Median, min and max of one series (what the README and docs quote), beside its raw samples."""
    if not samples:
        raise ValueError("summary: a series needs at least one sample")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": list(samples)}


class ResultFile:
    """The record of one benchmark run; `write()` puts it in `benchmarks/results/<name>.json` (or `path`)."""

    def __init__(self, name: str, path: str | os.PathLike | None = None) -> None:
        self.name = name
        self.path = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_at_start = os.getloadavg()
        self.series: dict[str, dict] = {}

    def add_series(self, label: str, samples: list[float], unit: str) -> dict:
        """Records a measured series (every raw sample) under `label`; returns its summary."""
        if label in self.series:
            raise ValueError(f"ResultFile.add_series: series {label!r} was already recorded")
        self.series[label] = {"unit": unit, **summary(samples)}
        return self.series[label]

    def write(self, extra: dict | None = None) -> Path:
        record = {
            "benchmark": self.name,
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {**machine(), "load_average_start": self.load_at_start,
                        "load_average_end": os.getloadavg()},
            "versions": {p: _version(p) for p in ("torch", "transformers", "triton", "modeling-deepseek-v3")},
            "series": self.series,
            **(extra or {}),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"result file: {self.path}")
        return self.path

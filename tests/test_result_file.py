"""The benchmarks' result files carry what a reader needs to judge and repeat a run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.path.insert(0, "benchmarks")
from result_file import ResultFile
record = ResultFile("probe", path=sys.argv[1])
record.add_series("probe tok/s", [3.0, 1.0, 2.0, 10.0], unit="tok/s")
try:
    record.add_series("probe tok/s", [1.0], unit="tok/s")
except ValueError as error:
    print("refused:", error)
record.write(extra={"rows": [1, 2]})
"""


def test_result_file_records_command_commit_machine_versions_and_raw_samples(tmp_path):
    out = tmp_path / "probe.json"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "refused: ResultFile.add_series: series 'probe tok/s' was already recorded" in run.stdout
    record = json.loads(out.read_text())
    series = record["series"]["probe tok/s"]
    assert series["samples"] == [3.0, 1.0, 2.0, 10.0]
    assert (series["median"], series["min"], series["max"], series["n"]) == (2.5, 1.0, 10.0, 4)
    assert record["rows"] == [1, 2]
    assert len(record["commit"]) == 40
    assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["torch_threads"] >= 1
    assert len(record["machine"]["load_average_start"]) == 3
    assert record["versions"]["torch"] and record["versions"]["transformers"]

"""The `deepseek-v3` command line: argument errors, and the `demo` subcommand end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modeling_deepseek_v3.demo import run_demo
from modeling_deepseek_v3.transformers_patch import PATCH_ENV_VAR
from modeling_deepseek_v3_cli import main

ROOT = Path(__file__).resolve().parents[1]
# Enough text for BPE to learn a few hundred merges and for two blocks of 256 tokens.
SMALL_CORPUS = """\
ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

"""


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--preset", "no-such-preset"],
        ["demo", "--steps", "0"],
        ["demo", "--steps", "ten"],
        ["demo", "--max-new-tokens", "0"],
        ["demo", "--compare-tokens", "0"],
        ["demo", "--threads", "0"],
        ["demo", "--threads", "two"],
        ["no-such-command"],
        [],
        ["remote-code", "folder", "--port", "8000"],  # only serve and lm-eval pass arguments on to a tool
    ],
    ids=["unknown-preset", "steps-0", "steps-not-int", "max-new-tokens-0", "compare-tokens-0", "threads-0",
         "threads-not-int", "unknown-command", "no-command", "unknown-option"],
)
def test_bad_arguments_exit_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: deepseek-v3" in capsys.readouterr().err


def test_a_bad_thread_count_is_named_with_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    for value, shown in (("two", "'two'"), ("0", "0"), ("1.5", "'1.5'")):
        with pytest.raises(SystemExit):
            main(["demo", "--threads", value])
        assert f"argument --threads: must be a whole number >= 1, got {shown}" in capsys.readouterr().err


def test_help_and_argument_errors_import_neither_torch_nor_transformers() -> None:
    """`deepseek-v3 --help` and a mistyped argument answer at once: the package (torch, transformers) is imported only
    by a command that runs."""
    script = (
        "import sys\n"
        "from modeling_deepseek_v3_cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['demo', '--threads', 'two'], ['convert', 'nowhere']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'modeling_deepseek_v3') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != PATCH_ENV_VAR}  # with it, the package is imported at once
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
    assert "usage: deepseek-v3 demo" in done.stdout and "--threads THREADS" in done.stdout


def test_the_command_line_offers_what_the_commands_accept() -> None:
    import modeling_deepseek_v3_cli
    from modeling_deepseek_v3.convert import DIRECTIONS
    from modeling_deepseek_v3.demo import DEMO_PRESETS

    assert modeling_deepseek_v3_cli.DEMO_PRESETS == DEMO_PRESETS
    assert modeling_deepseek_v3_cli.CONVERT_DIRECTIONS == DIRECTIONS
    assert modeling_deepseek_v3_cli.PATCH_ENV_VAR == PATCH_ENV_VAR


@pytest.fixture
def unpatched(monkeypatch):
    """Undo what a pass-through command did to this process: the patch and its environment variable."""
    from modeling_deepseek_v3 import restore_transformers

    monkeypatch.delenv(PATCH_ENV_VAR, raising=False)
    yield
    restore_transformers()


def test_lm_eval_help_is_lm_evals_own_after_our_note(capsys, unpatched) -> None:
    pytest.importorskip("lm_eval")
    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deepseek-v3 lm-eval: `lm-eval` with this package's DeepSeek-V3 classes")
    assert "usage: lm-eval" in out and "Language Model Evaluation Harness" in out  # lm-eval's own help


def test_serve_without_the_serving_extra_exits_cleanly(capsys, unpatched) -> None:
    from transformers.utils.import_utils import is_serve_available

    if is_serve_available():
        pytest.skip("transformers' serving extra is installed")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "some/folder"])
    assert exc.value.code == 2
    assert 'pip install "transformers[serving]"' in capsys.readouterr().err


def test_missing_corpus_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"preset": "no-such-preset"}, "preset"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"compare_tokens": 0}, "compare_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"threads": 0}, "threads must be an int >= 1"),
        ({"threads": 1.5}, "threads must be an int >= 1"),
    ],
    ids=["steps-0", "unknown-preset", "max-new-tokens-0", "compare-tokens-0", "empty-prompt", "threads-0",
         "threads-float"],
)
def test_run_demo_rejects_bad_arguments(kwargs: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run_demo(out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # validation happens before any work


def test_run_demo_rejects_empty_or_missing_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        run_demo(corpus=empty, out=tmp_path / "out")
    with pytest.raises(ValueError, match="not an existing file"):
        run_demo(corpus=tmp_path / "missing.txt", out=tmp_path / "out")


def test_run_demo_rejects_the_full_size_preset(tmp_path: Path) -> None:
    # 671B parameters cannot be trained in the demo; it must fail before allocating anything.
    with pytest.raises(ValueError, match="not one of the demo presets"):
        run_demo(preset="deepseek-v3-671b", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    # the README's command with fewer steps: default preset `small` and the packaged corpus
    assert main(["demo", "--steps", "8", "--out", str(out), "--max-new-tokens", "20", "--compare-tokens", "16"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "loss.png",
                 "expert_load.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(out))  # embedding rows == tokenizer size
    captured = capsys.readouterr()
    printed = captured.out
    assert "held-out next-token loss" in printed
    # short log lines naming each loss, not the full dicts
    assert "[demo] step 8/8: next-token loss " in printed and "{'loss'" not in printed
    assert "it/s]" not in captured.err and "it/s]" not in printed  # no progress bars between the demo's lines
    assert config.get("use_mtp_modules", True) is True  # switched off for the evaluation only
    assert "\nROMEO:" in printed  # the sample is printed, and it continues the default prompt
    assert "tokens per main-model forward" in printed and "outputs identical: yes" in printed
    assert f"plots: {out / 'loss.png'}, {out / 'expert_load.png'}" in printed


@pytest.mark.slow
def test_demo_custom_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_CORPUS * 16, encoding="utf-8")  # ~4 KB
    assert 3_000 < corpus.stat().st_size < 8_000
    out = tmp_path / "demo"
    report = run_demo(steps=3, out=out, preset="tiny", corpus=corpus, prompt="JULIET:", max_new_tokens=10,
                      compare_tokens=8)
    assert isinstance(report.sample, str) and report.sample.startswith("JULIET:")
    assert report.identical and 0 <= report.acceptance_rate <= 1 and 1 <= report.tokens_per_forward <= 2
    assert all(path.is_file() for path in report.plots)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_demo_runs_with_the_threads_it_is_given_and_restores_torchs(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_CORPUS * 16, encoding="utf-8")
    default = torch.get_num_threads()
    threads = default + 1  # not torch's default, so the printed count shows the setting took effect
    run_demo(steps=1, out=tmp_path / "demo", preset="tiny", corpus=corpus, max_new_tokens=2, threads=threads,
             compare_tokens=4)
    printed = capsys.readouterr().out
    assert f"[demo] torch uses {threads} CPU threads; on a shared or busy machine `--threads 1`" in printed
    assert torch.get_num_threads() == default


def test_demo_refuses_a_folder_that_is_not_its_own_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint folder given as --out is left as it is: the demo would delete its shards and leave its index."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    files = {"model.safetensors.index.json": '{"weight_map": {}}', "model-00001-of-00002.safetensors": "shard",
             "config.json": "{}"}
    for name, text in files.items():
        (checkpoint / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(checkpoint), "--steps", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "is not empty and is not the output of an earlier demo run" in err
    assert {p.name: p.read_text() for p in checkpoint.iterdir()} == files
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_demo(out=tmp_path / "a-file")


@pytest.mark.slow
def test_demo_replaces_its_own_earlier_output(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_CORPUS * 16, encoding="utf-8")
    out = tmp_path / "demo"
    run_demo(steps=1, out=out, preset="tiny", corpus=corpus, max_new_tokens=2, compare_tokens=4)
    record = json.loads((out / "demo-output.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    # as if the earlier run had saved a sharded checkpoint: its index must not outlive the new single file
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    (out / "demo-output.json").write_text(json.dumps({"files": record["files"] + ["model.safetensors.index.json"]}))
    (out / "notes.txt").write_text("mine")  # not the demo's: kept
    run_demo(steps=1, out=out, preset="tiny", corpus=corpus, max_new_tokens=2, seed=1, compare_tokens=4)
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "demo-output.json").read_text())["files"] == record["files"]
    AutoTokenizer.from_pretrained(out)


@pytest.mark.slow
def test_a_rerun_after_an_interrupted_demo_save_replaces_it(tmp_path: Path) -> None:
    """A demo interrupted while saving left a model without its tokenizer and no record of its files, and the rerun
    refused the folder as not its own; the record is now written first, and the rerun replaces what was saved."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL_CORPUS * 16, encoding="utf-8")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # what an interruption after the model's first shards leaves: the record of the files to keep, a partial save
    (out / "demo-output.json").write_text(json.dumps({"unfinished": True, "kept": ["notes.txt"]}))
    (out / "model-00001-of-00002.safetensors").write_text("partial")
    (out / ".unfinished-save").write_text("")
    run_demo(steps=1, out=out, preset="tiny", corpus=corpus, max_new_tokens=2, compare_tokens=4)
    assert not (out / "model-00001-of-00002.safetensors").exists() and not (out / ".unfinished-save").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads((out / "demo-output.json").read_text())["files"]
    AutoTokenizer.from_pretrained(out)

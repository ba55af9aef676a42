"""`deepseek-v3 serve` and `deepseek-v3 lm-eval`: transformers' and lm-eval's own command lines, run in this process
after `apply_to_transformers()`, so that they load DeepSeek-V3 checkpoints with this package's classes.

A separate command (`transformers serve`, `lm_eval`) never imports this package, so neither the patch nor the
environment variable can reach it; running the tool's own entry point here keeps every flag, endpoint and output of the
tool. `DEEPSEEK_V3_PATCH_TRANSFORMERS=1` is also set in the environment, so the processes a tool starts from it
(`transformers serve --api-server-count N` spawns them, which imports this package again) apply the patch too.

References: docs/serving.md; transformers `cli/transformers.py` (its typer app), lm-eval `lm_eval/__main__.py`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .transformers_patch import PATCH_ENV_VAR, apply_to_transformers


def _patch_this_process_and_its_children() -> None:
    os.environ[PATCH_ENV_VAR] = "1"
    apply_to_transformers()


def _exit_status(run: Callable[[], object]) -> int:
    """Run a tool's entry point, which may end with `sys.exit`; returns its exit status."""
    try:
        run()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message") exits with 1 after printing it
        return 1
    return 0


def run_transformers_serve(args: list[str]) -> int:
    """`transformers serve ARGS` (same flags, same OpenAI-compatible endpoints) with this package's classes: the model
    given on the command line or in a request loads as `modeling_deepseek_v3.DeepseekV3ForCausalLM`, and
    `--continuous-batching` runs over its paged latent cache. Returns the exit status.

    Raises:
        ImportError: if transformers' serving extra is missing (`pip install "transformers[serving]"`).
    """
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError('deepseek-v3 serve runs transformers serve, which needs: pip install "transformers[serving]"')
    _patch_this_process_and_its_children()
    # transformers' `main()` adds only an update check (a network call) before running this app
    from transformers.cli.transformers import app

    return _exit_status(lambda: app(args=["serve", *args], prog_name="deepseek-v3"))


def run_lm_eval(args: list[str]) -> int:
    """`lm-eval ARGS` (e.g. `run --model hf --model_args pretrained=FOLDER --tasks ...`) with this package's classes.
    Returns the exit status.

    Raises:
        ImportError: if lm-eval is not installed (`pip install lm-eval`).
    """
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise ImportError("deepseek-v3 lm-eval runs lm-eval's command line: pip install lm-eval") from e
    _patch_this_process_and_its_children()
    # lm-eval's command line reads sys.argv (and edits it)
    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        return _exit_status(cli_evaluate)
    finally:
        sys.argv = argv

"""Console entry point `deepseek-v3`; argument parsing only, the work lives in the package modules it calls.

This module is outside the `modeling_deepseek_v3` package on purpose: importing the package imports torch and
transformers and registers the Auto classes (seconds), and `deepseek-v3 --help` or a mistyped argument should answer at
once. Each command imports what it runs only once its arguments have parsed.

References: docs/design.md (The rooms), `modeling_deepseek_v3.demo.run_demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator

# `modeling_deepseek_v3.transformers_patch.PATCH_ENV_VAR`, which `serve` and `lm-eval` set for the processes their tool
# starts. transformers serve runs its model in a spawned process, which imports this module (the main module's import)
# and nothing else of ours: importing the package here applies the patch in that process too.
PATCH_ENV_VAR = "DEEPSEEK_V3_PATCH_TRANSFORMERS"
if PATCH_ENV_VAR in os.environ:
    import modeling_deepseek_v3  # noqa: F401

# The choices the parser offers, without importing their modules; tests/test_cli.py checks that they equal
# `modeling_deepseek_v3.demo.DEMO_PRESETS` and `modeling_deepseek_v3.convert.DIRECTIONS`.
DEMO_PRESETS = ("tiny", "small", "bench")
CONVERT_DIRECTIONS = ("fp8-to-bf16", "bf16-to-fp8")
# Commands that run another tool's command line: every argument after the command's name is the tool's, `--help`
# included (it prints the tool's own help, after `PASS_THROUGH_NOTE`).
PASS_THROUGH = {"serve": "transformers serve", "lm-eval": "lm-eval"}
PASS_THROUGH_NOTE = (
    "deepseek-v3 {command}: `{tool}` with this package's DeepSeek-V3 classes (transformers.DeepseekV3ForCausalLM and "
    "the other DeepSeek-V3 names patched, see docs/serving.md); all flags are {tool}'s:\n"
)


class UserError(Exception):
    """An error a user's input caused (an argument, file or folder): reported in one line, without a traceback.
    Anything else is a bug and keeps its traceback."""


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-v3", description="DeepSeek-V3 for Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a tokenizer and a small model on Shakespeare, save them and sample (offline, CPU is fine)",
        description="Train a byte-level BPE tokenizer and a DeepSeek-V3 from scratch, save both, reload and sample.",
    )
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps (default: 300)")
    demo.add_argument(
        "--out",
        default="./deepseek-v3-demo",
        help="output folder (default: ./deepseek-v3-demo): new, empty, or the output of an earlier demo run, whose "
        "saved files are replaced; any other non-empty folder is refused, so no checkpoint is overwritten",
    )
    demo.add_argument("--preset", choices=DEMO_PRESETS, default="small", help="model preset (default: small)")
    demo.add_argument("--corpus", metavar="PATH", default=None, help="UTF-8 text file (default: packaged Shakespeare)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--prompt", default="ROMEO:", help="text to continue (default: 'ROMEO:')")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=60, help="tokens to generate (default: 60)")
    demo.add_argument(
        "--compare-tokens",
        type=_positive_int,
        default=64,
        help="tokens per held-out prompt in the comparison of speculative and plain decoding (default: 64)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); on a shared or busy machine 1 can be much faster",
    )

    convert = sub.add_parser(
        "convert",
        help="convert a checkpoint folder between the official FP8 format and bf16, one shard at a time",
        description="Convert SRC into a new folder DST: fp8-to-bf16 dequantises every FP8 weight and drops "
        "quantization_config; bf16-to-fp8 quantises the decoder projections into 128x128 FP8 blocks.",
    )
    convert.add_argument("direction", choices=CONVERT_DIRECTIONS)
    convert.add_argument("src", help="checkpoint folder (config.json + safetensors)")
    convert.add_argument("dst", help="new folder to create")

    remote = sub.add_parser(
        "remote-code",
        help="make a saved folder load with trust_remote_code=True in processes that never import this package",
        description="Write auto_map into FOLDER/config.json and a small code file beside it, so that "
        "AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True) returns this package's classes "
        "(installed) without `import modeling_deepseek_v3` first. Same as save_pretrained(..., remote_code=True).",
    )
    remote.add_argument("folder", help="a saved DeepSeek-V3 checkpoint folder")

    sub.add_parser(
        "serve",
        add_help=False,
        help="`transformers serve` (OpenAI-compatible server, same flags) with this package's classes; "
        "`deepseek-v3 serve --help` lists its flags",
    )
    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-eval's command line (`lm-eval run --model hf ...`, same flags) with this package's classes; "
        "`deepseek-v3 lm-eval --help` lists its flags",
    )
    return parser


def _demo(args: argparse.Namespace, _: list[str]) -> int:
    from modeling_deepseek_v3.demo import DemoArgumentError, run_demo

    with _as_user_errors(DemoArgumentError, OSError):
        run_demo(steps=args.steps, out=args.out, preset=args.preset, corpus=args.corpus, seed=args.seed,
                 prompt=args.prompt, max_new_tokens=args.max_new_tokens, threads=args.threads,
                 compare_tokens=args.compare_tokens)
    return 0


def _convert(args: argparse.Namespace, _: list[str]) -> int:
    from modeling_deepseek_v3.convert import convert_checkpoint

    with _as_user_errors(ValueError, OSError):
        convert_checkpoint(args.src, args.dst, args.direction)
    print(f"wrote {args.dst}")
    return 0


def _remote_code(args: argparse.Namespace, _: list[str]) -> int:
    from modeling_deepseek_v3.checkpoint import write_remote_code

    with _as_user_errors(ValueError, OSError):
        path = write_remote_code(args.folder)
    print(f"wrote {path} and auto_map in {args.folder}/config.json")
    return 0


def _pass_through(args: argparse.Namespace, tool_args: list[str]) -> int:
    from modeling_deepseek_v3.launch import run_lm_eval, run_transformers_serve

    if {"-h", "--help"} & set(tool_args):
        print(PASS_THROUGH_NOTE.format(command=args.command, tool=PASS_THROUGH[args.command]))
    with _as_user_errors(ImportError):
        return (run_transformers_serve if args.command == "serve" else run_lm_eval)(tool_args)


@contextlib.contextmanager
def _as_user_errors(*types: type[Exception]) -> Iterator[None]:
    """Inside the block, the exceptions of `types` become `UserError`s."""
    try:
        yield
    except types as e:
        raise UserError(str(e)) from e


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "demo": _demo, "convert": _convert, "remote-code": _remote_code, "serve": _pass_through, "lm-eval": _pass_through,
}


def main(argv: list[str] | None = None) -> int:
    """Run the `deepseek-v3` command line; returns the process exit status.

    A user error (`UserError`: a bad argument, file or folder) exits with status 2 and one line on stderr, an
    interruption (Ctrl-C) with status 130; neither prints a traceback.
    """
    parser = build_parser()
    args, tool_args = parser.parse_known_args(argv)
    if args.command not in PASS_THROUGH and tool_args:
        parser.error(f"unrecognized arguments: {' '.join(tool_args)}")
    try:
        return COMMANDS[args.command](args, tool_args)
    except UserError as e:
        parser.exit(2, f"deepseek-v3 {args.command}: error: {' '.join(str(e).split())}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"deepseek-v3 {args.command}: interrupted\n")


if __name__ == "__main__":
    raise SystemExit(main())

"""Every code block of README.md and docs/*.md runs as written.

Each page's `python` blocks run in order in one namespace (a block may use what an earlier block of its page
defined), its `bash` blocks by bash in between, in one process per page (forked from a runner that imported torch and
transformers once, not this package), in a fresh folder, offline and with an empty Hugging Face cache. A block that
cannot run here (the 671B checkpoint, several processes, a server that runs until stopped) has
`<!-- not run: REASON -->` on the line above its fence. Every block names its language; `text` (formulas, printed
output) never runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash")
LANGUAGES = (*RUNNABLE, "text")
FENCE = re.compile(r"^( *)```(.*)$")  # indented under a list item too
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
SLOW_PAGES = {"docs/fp8.md"}  # over 20 s on a loaded 2-core machine (fp8: two `deepseek-v3 convert` processes)
TIMEOUT_S = 300  # per page
# imported once by the page runner, before it forks a process per page (not this package: a page imports it itself)
PRELOADED = ("torch", "transformers", "transformers.trainer", "transformers.pipelines", "peft", "tokenizers")


@dataclasses.dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason given by a `<!-- not run: ... -->` line above the fence


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown page, in order."""
    page = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent = fence.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == f"{indent}```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: the code block is never closed")
        code = "".join(line[len(indent) :] + "\n" for line in lines[i + 1 : end])
        marker = NOT_RUN.match(lines[i - 1].strip()) if i > 0 else None
        blocks.append(Block(page, i + 1, fence.group(2).strip(), code, marker.group(1).strip() if marker else None))
        i = end + 1
    return blocks


def problems_of(blocks: list[Block]) -> list[str]:
    """What the page's blocks break of the rules in this module's docstring."""
    problems = []
    for block in blocks:
        where = f"{block.page}:{block.line}"
        if block.language not in LANGUAGES:
            problems.append(f"{where}: the block's language must be one of {LANGUAGES}, got {block.language!r}")
        if block.not_run is not None and block.language not in RUNNABLE:
            problems.append(f"{where}: a {block.language or 'unnamed'} block never runs, so it takes no not-run mark")
        if block.not_run == "":
            problems.append(f"{where}: `<!-- not run: -->` must give its reason")
    return problems


def run_blocks(blocks: list[Block]) -> str | None:
    """Run a page's runnable blocks in order in this process (its cwd the page's folder) until one fails; returns the
    failed block's `page:line` (its traceback printed), or None."""
    namespace = {"__name__": "__main__"}
    for block in blocks:
        where = f"{block.page}:{block.line}"
        print(f"--- {where} ({block.language})", flush=True)
        start = time.perf_counter()
        try:
            if block.language == "python":
                # padded with empty lines so that a traceback gives the line of the page
                exec(compile("\n" * block.line + block.code, block.page, "exec"), namespace)
            else:
                subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], check=True)
        except BaseException:  # SystemExit included
            traceback.print_exc()
            return where
        print(f"--- {where}: {time.perf_counter() - start:.1f} s", flush=True)
    return None


def serve_pages() -> None:
    """The page runner, a process of its own (POSIX: it forks): import the heavy third-party modules once (seconds on a
    loaded machine), then, for each page sent as a JSON line on stdin, fork a child that runs it and answer with the
    child's exit status. The child starts with this package not imported, as a reader's process does."""
    for name in PRELOADED:
        importlib.import_module(name)
    for line in sys.stdin:
        page = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_forked(Path(page["folder"]), [Block(**fields) for fields in page["blocks"]])
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
    os._exit(0)  # nothing to clean up; an interpreter's orderly exit after torch takes seconds


def _run_forked(folder: Path, blocks: list[Block]) -> None:
    os.chdir(folder / "run")
    with open(folder / "output.txt", "w") as output:
        os.dup2(output.fileno(), 1)  # stdout and stderr of the blocks and of the commands they start
        os.dup2(output.fileno(), 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the runner's requests are not the blocks' input
    signal.alarm(TIMEOUT_S)
    failed = run_blocks(blocks)
    if failed:
        print(f"FAILED {failed}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


@pytest.fixture(scope="module")
def run_page(tmp_path_factory):
    """`run_page(blocks, folder)` runs the blocks in `folder/run`, writes their output to `folder/output.txt` and
    returns the exit status (nonzero: a block failed, or the page ran out of time)."""
    home = tmp_path_factory.mktemp("hf-home")  # empty: a block cannot lean on a model cached on this machine
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "DEEPSEEK_V3_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        PYTHONPATH=str(ROOT),  # this checkout's package, for the `deepseek-v3` command too
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        # torch's default of one thread per core is many times slower on a loaded machine (README, the demo)
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-c", "from tests.test_docs_code_blocks import serve_pages; serve_pages()"]
    servers = []  # started by the first page with blocks to run

    def run(blocks: list[Block], folder: Path) -> int:
        if not servers:
            servers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                            cwd=home, env=env))
        server = servers[0]
        (folder / "run").mkdir()
        server.stdin.write(json.dumps({"folder": str(folder), "blocks": [dataclasses.asdict(b) for b in blocks]}))
        server.stdin.write("\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the page runner ended (status {server.wait()}); its error is in the captured stderr")
        return json.loads(answer)["status"]

    yield run
    for server in servers:
        server.stdin.close()
        server.wait(timeout=60)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.slow] * (str(p.relative_to(ROOT)) in SLOW_PAGES)) for p in PAGES],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_code_blocks_run_as_written(path: Path, tmp_path: Path, run_page) -> None:
    blocks = code_blocks(path)
    problems = problems_of(blocks)
    assert not problems, "\n".join(problems)
    runnable = [block for block in blocks if block.language in RUNNABLE and block.not_run is None]
    status = run_page(runnable, tmp_path) if runnable else 0
    if status != 0:
        output = (tmp_path / "output.txt").read_text()
        failed = re.findall(r"^FAILED (\S+)$", output, re.MULTILINE)
        if status == -signal.SIGALRM:
            pytest.fail(f"{path.name} ran over {TIMEOUT_S} s:\n{output[-4000:]}")
        where = failed[-1] if failed else path.name
        pytest.fail(f"the block at {where} failed (exit status {status}):\n{output[-4000:]}")


def test_the_rules_catch_an_unnamed_language_and_a_reasonless_mark(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```\nx\n```\n<!-- not run: -->\n```python\nx\n```\n<!-- not run: too big -->\n```text\nx\n```\n"
                    "- a list item:\n\n  ```python\n  y = 1\n  ```\n")
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.not_run) for b in blocks] == [(1, "", None), (5, "python", ""),
                                                                 (9, "text", "too big"), (14, "python", None)]
    assert blocks[3].code == "y = 1\n"
    assert len(problems_of(blocks)) == 3

"""Every measured figure in README.md and docs/*.md cites the committed result file it comes from.

A figure is a speed-up or ratio (`1.25×`, `0.9x`), a rate (`tok/s`, `tokens/s`, `TFLOP/s`, `GB/s`) or a size in
MB / MiB; a table is a figure when it names such a unit and holds numbers. It must cite an existing file under
`benchmarks/results/`, tracked by git, in its own paragraph (or list item), or, for a table, in the table or the
caption paragraph right before or after it. Fenced code blocks (commands, a sample run's output) are not checked.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)?"
# a ratio: a number and × or x, not a product of sizes (`128×128`, `8 × 256`, `× (192 + 128)`)
RATIO = rf"{NUMBER}\s?[×x](?![\w(]|\s*[\d(])"
UNITS = r"(?:tok(?:en)?s?/s|TFLOP/s|GB/s|GiB|MiB|MB)\b"
FIGURE = re.compile(rf"{RATIO}|{NUMBER}(?:\s?[-–]\s?\d+(?:\.\d+)?)?\s?{UNITS}")
UNIT_NAMED = re.compile(rf"[×]|{UNITS}|\bx\b")
CITATION = re.compile(r"benchmarks/results/[\w./-]+\.json")


def blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(kind, first line number, lines) of each paragraph, list item and table outside fenced code."""
    found: list[tuple[str, int, list[str]]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or not line.strip():
            found.append(("gap", number, []))
            continue
        kind = "table" if line.lstrip().startswith("|") else "text"
        starts = kind == "text" and re.match(r"\s*([-*]|\d+\.)\s|#", line)
        if found and found[-1][0] == kind and not starts:
            found[-1][2].append(line)
        else:
            found.append((kind, number, [line]))
    return [block for block in found if block[0] != "gap"]


def is_figure(kind: str, lines: list[str], caption: list[str]) -> bool:
    if kind == "table":  # a unit in the table or its caption, numbers in the cells
        return bool(UNIT_NAMED.search("\n".join(lines + caption))) and any(
            re.search(r"\|\s*[\d.]+", row) for row in lines[2:])
    return bool(FIGURE.search("\n".join(lines)))


def is_caption(block: tuple[str, int, list[str]]) -> bool:
    """A paragraph of text, not a heading or a list item."""
    return block[0] == "text" and not re.match(r"\s*([-*]|\d+\.)\s|#", block[2][0])


def uncited_figures(page: str, text: str, tracked: set[str]) -> list[str]:
    """`page:line: text` for each line of a figure that cites no tracked result file (or cites a missing one)."""
    found = blocks(text)
    problems = []
    for i, (kind, start, lines) in enumerate(found):
        caption = []
        if kind == "table":  # the paragraph right before or after it (at most one blank line between)
            end = start + len(lines) - 1
            before = found[i - 1] if i > 0 else None
            after = found[i + 1] if i + 1 < len(found) else None
            if before and is_caption(before) and start - (before[1] + len(before[2]) - 1) <= 2:
                caption += before[2]
            if after and is_caption(after) and not after[2][-1].rstrip().endswith(":") and after[1] - end <= 2:
                caption += after[2]  # (a paragraph ending in ":" introduces what follows it)
        if not is_figure(kind, lines, caption):
            continue
        cited = CITATION.findall("\n".join(lines + caption))
        missing = [path for path in cited if path not in tracked]
        if cited and not missing:
            continue
        reason = f"cites {missing} (not tracked by git)" if missing else "cites no benchmarks/results/ file"
        for offset, line in enumerate(lines):
            if kind == "table" or FIGURE.search(line):
                problems.append(f"{page}:{start + offset}: {reason}: {line.strip()[:120]}")
    return problems


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_every_figure_in_readme_and_docs_cites_a_committed_result_file():
    tracked = tracked_files()
    problems = [p for page in PAGES for p in uncited_figures(page.relative_to(ROOT).as_posix(), page.read_text(),
                                                             tracked)]
    assert not problems, "figures without a committed result file:\n" + "\n".join(problems)


def test_the_check_finds_an_uncited_figure_and_accepts_a_cited_one():
    tracked = {"benchmarks/results/batching.json"}
    page = (
        "Continuous batching runs at 1.25× the padded batch's speed.\n\n"
        "Continuous batching runs at 1.25× (`benchmarks/results/batching.json`).\n\n"
        "Blocks of 128×128 values, batch 8 × 256 tokens: no figure.\n\n"
        "- a list item at 97.2 tok/s\n"
        "- a list item at 97.2 tok/s (`benchmarks/results/decode.json`)\n\n"
        "| measure | tokens/s |\n|---|---:|\n| decode | 97.2 |\n\n"
        "Caption (`benchmarks/results/batching.json`):\n\n| measure | speed-up |\n|---|---:|\n| decode | 2.3× |\n"
    )
    problems = uncited_figures("page.md", page, tracked)
    assert [p.split(":")[1] for p in problems] == ["1", "7", "8", "10", "11", "12"], problems
    assert "not tracked by git" in problems[2] and "cites no" in problems[0]

"""Package rules: the import direction of docs/design.md, the public API, and the Auto registration."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import modeling_deepseek_v3

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_deepseek_v3"


def imports_of(path: Path) -> set[str]:
    """Top-level names imported by a file, with relative imports resolved to their sibling module names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_know_nothing_of_models(path):
    stdlib = {"__future__", "math", "os", "collections", "collections.abc", "contextlib"}
    allowed = stdlib | {"torch", "torch.nn.functional", "triton", "triton.language"}
    for name in imports_of(path):
        assert name.startswith(".") or name in allowed, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "configuration").glob("*.py")), ids=lambda p: p.name)
def test_configuration_knows_nothing_of_modules(path):
    for name in imports_of(path):
        assert "modeling_deepseek_v3" not in name and name not in ("torch", ".."), f"{path.name} imports {name}"


def test_kernel_reference_needs_no_triton():
    assert imports_of(PACKAGE / "kernels" / "reference.py") <= {"__future__", "torch"}


# Each room imports only rooms of a lower level (docs/design.md, "The rooms"); a new room must be placed here.
LEVELS = {
    "kernels": 0, "configuration": 0,
    "private_api": 1, "dtypes": 1, "metrics": 1, "inputs": 1, "outputs": 1, "dispatch_traffic": 1, "latent_fp8": 1,
    "speculation": 1,
    "fp8": 2, "rope": 2, "cache": 2, "paged_cache": 2, "shards": 2, "rank_inputs": 2, "batch_requests": 2,
    "indexer_training": 2,
    "layers": 3, "balancing": 3, "indexer": 3,
    "moe": 4, "mtp": 4, "paged_attention": 4,
    "attention": 5, "checkpoint": 5, "generation": 5, "speculative_batching": 5, "parallel": 5,
    "continuous_batching": 6,
    "model": 7,
    "training": 8, "trainer": 8, "peft_fp8": 8, "convert": 8, "heads": 8,
    "demo": 9, "sft_trainer": 9, "plots": 1, "transformers_patch": 9,
    "launch": 10,
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_rooms_import_only_lower_rooms(path):
    if path.name == "__init__.py":
        return
    room = path.stem
    assert room in LEVELS, f"{path.name} is a new room: give it a level in LEVELS"
    for name in imports_of(path):
        if name.startswith("modeling_deepseek_v3."):
            name = "." + name.split(".", 1)[1]
        if not name.startswith(".") or name == ".":
            continue
        target = name.lstrip(".").split(".")[0]
        assert LEVELS[target] < LEVELS[room], f"{room} (level {LEVELS[room]}) imports {target} ({LEVELS[target]})"


def test_nothing_imports_the_cli():
    for path in PACKAGE.glob("*.py"):
        assert not any(n.endswith("cli") for n in imports_of(path)), path.name


def test_public_api():
    for name in modeling_deepseek_v3.__all__:
        assert hasattr(modeling_deepseek_v3, name), name


def test_the_trainers_are_imported_on_first_use():
    """Every process that only runs the model (a rank, a server, a command) imports the package: transformers' Trainer
    (and with it datasets and pandas) waits until a trainer class is used."""
    script = (
        "import sys\n"
        "import modeling_deepseek_v3\n"
        "print(sorted(m for m in ('transformers.trainer', 'datasets', 'pandas') if m in sys.modules))\n"
        "from transformers import Trainer\n"
        "print(issubclass(modeling_deepseek_v3.DeepseekV3Trainer, Trainer))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "True"], result.stdout


def test_auto_registration():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3")
    assert type(config) is modeling_deepseek_v3.DeepseekV3Config
    model_class = AutoModelForCausalLM._model_mapping[modeling_deepseek_v3.DeepseekV3Config]
    assert model_class is modeling_deepseek_v3.DeepseekV3ForCausalLM


def test_nothing_in_the_repository_shadows_an_installed_distribution():
    """Every name the repository root makes importable (a folder with `__init__.py`, a `.py` file) is this package's
    own or the test suite's: `python -m ...` and scripts started in the root put the root first on `sys.path`."""
    importable = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    assert importable <= {"modeling_deepseek_v3", "modeling_deepseek_v3_cli", "tests"}, importable
    others = {name for name, dists in importlib.metadata.packages_distributions().items()
              if set(dists) != {"modeling-deepseek-v3"}}
    assert not importable & others, importable & others


def test_imports_from_the_repository_root_with_the_hub_kernels_package():
    """From the repository root (first on `sys.path`, as for `python -m pytest`, notebooks and DeepSpeed launches):
    the package imports, `import kernels` gives the Hugging Face hub package, and a tiny model runs a forward."""
    pytest.importorskip("kernels")  # transformers >= 5.25 installs it
    script = (
        "import modeling_deepseek_v3, kernels, pathlib, torch\n"
        "from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset\n"
        f"assert not pathlib.Path(kernels.__file__).resolve().is_relative_to({str(ROOT)!r}), kernels.__file__\n"
        "assert hasattr(kernels, 'get_kernel'), dir(kernels)\n"
        "torch.manual_seed(0)\n"
        "model = DeepseekV3ForCausalLM(load_preset('tiny')).eval()\n"
        "logits = model(torch.randint(3, 100, (1, 5))).logits\n"
        "assert logits.shape[:2] == (1, 5) and torch.isfinite(logits).all()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

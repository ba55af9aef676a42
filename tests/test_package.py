"""Package rules: the import direction of DESIGN §1 / style.md, the public API, and the Auto registration."""

import ast
from pathlib import Path

import pytest

import modeling_deepseek_v3

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    """Top-level names imported by a file, with relative imports resolved to their sibling module names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_know_nothing_of_models(path):
    allowed = {"__future__", "torch", "torch.nn.functional", "triton", "triton.language", "math"}
    for name in imports_of(path):
        assert name.startswith(".") or name in allowed, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "configuration").glob("*.py")), ids=lambda p: p.name)
def test_configuration_knows_nothing_of_modules(path):
    for name in imports_of(path):
        assert "modeling_deepseek_v3" not in name and name not in ("torch", ".."), f"{path.name} imports {name}"


def test_kernel_reference_needs_no_triton():
    assert imports_of(ROOT / "kernels" / "reference.py") <= {"__future__", "torch"}


def test_nothing_imports_the_cli():
    for path in (ROOT / "modeling_deepseek_v3").glob("*.py"):
        if path.name != "cli.py":
            assert not any(n.endswith("cli") for n in imports_of(path)), path.name


def test_public_api():
    for name in modeling_deepseek_v3.__all__:
        assert hasattr(modeling_deepseek_v3, name), name


def test_auto_registration():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3")
    assert type(config) is modeling_deepseek_v3.DeepseekV3Config
    model_class = AutoModelForCausalLM._model_mapping[modeling_deepseek_v3.DeepseekV3Config]
    assert model_class is modeling_deepseek_v3.DeepseekV3ForCausalLM

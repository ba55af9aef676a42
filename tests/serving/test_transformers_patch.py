"""The opt-in patch: transformers' exported DeepSeek-V3 names resolve to this package's classes while it is applied,
exactly what was there after `restore_transformers`, and tools that pick a class by name (TRL given a path) follow."""

import os
import subprocess
import sys
import types

import pytest
import transformers
import transformers.models.deepseek_v3 as builtin_package

import modeling_deepseek_v3
from modeling_deepseek_v3.transformers_patch import (
    PATCH_ENV_VAR,
    PATCHED_CLASSES,
    apply_from_environment,
    transformers_patched,
)

from ..utils import random_model, word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the module this file imported, the one in sys.modules now (transformers can make a second, see private_api) and the
# model's package
MODULES = list({id(m): m for m in (transformers, sys.modules["transformers"], builtin_package)}.values())
# what transformers exports for DeepSeek-V3 (its submodules left out), read from transformers itself
EXPORTED = sorted(n for n in builtin_package.__all__ if not isinstance(getattr(builtin_package, n), types.ModuleType))


@pytest.fixture
def restored():
    """Undo the patch after the test, whatever it did."""
    yield
    modeling_deepseek_v3.restore_transformers()
    assert not transformers_patched()


def _own_attributes():
    return {(m.__name__, n): vars(m).get(n, "absent") for m in MODULES for n in EXPORTED}


def test_the_patch_covers_every_deepseek_v3_name_transformers_exports():
    assert sorted(PATCHED_CLASSES) == EXPORTED
    for name, cls in PATCHED_CLASSES.items():
        assert cls is getattr(modeling_deepseek_v3, name) and cls.__module__.startswith("modeling_deepseek_v3.")


@pytest.mark.parametrize("state", ["resolved", "never looked up"])
def test_apply_then_restore_puts_back_exactly_what_was_there(state, restored):
    builtin = {name: getattr(builtin_package, name) for name in EXPORTED}
    if state == "never looked up":  # as in a fresh process: the lazy modules resolve a name on its first lookup
        for module in MODULES:
            for name in EXPORTED:
                vars(module).pop(name, None)
    before = _own_attributes()
    assert not transformers_patched()

    modeling_deepseek_v3.apply_to_transformers()
    modeling_deepseek_v3.apply_to_transformers()  # again: no change, and restore still knows the originals
    assert transformers_patched()
    for module in MODULES:
        for name in EXPORTED:
            assert getattr(module, name) is getattr(modeling_deepseek_v3, name), f"{module.__name__}.{name}"
    assert transformers.DeepseekV3ForCausalLM is modeling_deepseek_v3.DeepseekV3ForCausalLM

    modeling_deepseek_v3.restore_transformers()
    assert _own_attributes() == before
    for module in MODULES:
        for name in EXPORTED:
            assert getattr(module, name) is builtin[name]
    resolved = _own_attributes()
    modeling_deepseek_v3.restore_transformers()  # not applied: nothing happens
    assert _own_attributes() == resolved


def test_environment_variable_values(restored):
    assert apply_from_environment({}) is False and not transformers_patched()
    for off in ("0", "false", "No", " off ", ""):
        assert apply_from_environment({PATCH_ENV_VAR: off}) is False and not transformers_patched()
    with pytest.raises(ValueError, match=rf"{PATCH_ENV_VAR}='maybe': must be one of 1, true, yes, on"):
        apply_from_environment({PATCH_ENV_VAR: "maybe"})
    assert not transformers_patched()
    assert apply_from_environment({PATCH_ENV_VAR: "TRUE"}) is True and transformers_patched()


def test_the_environment_variable_patches_when_the_package_is_imported():
    code = ("import transformers, modeling_deepseek_v3; "
            "print(transformers.DeepseekV3ForCausalLM is modeling_deepseek_v3.DeepseekV3ForCausalLM)")
    env = {**os.environ, PATCH_ENV_VAR: "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


def test_trl_given_a_path_loads_our_class_only_with_the_patch(tmp_path, restored):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    random_model().save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    # TRL resolves `getattr(transformers, config.architectures[0])`: importing this package is not enough
    assert type(trl_utils.create_model_from_path(str(tmp_path))) is builtin_package.DeepseekV3ForCausalLM
    modeling_deepseek_v3.apply_to_transformers()
    assert type(trl_utils.create_model_from_path(str(tmp_path))) is modeling_deepseek_v3.DeepseekV3ForCausalLM
    modeling_deepseek_v3.restore_transformers()
    assert type(trl_utils.create_model_from_path(str(tmp_path))) is not modeling_deepseek_v3.DeepseekV3ForCausalLM

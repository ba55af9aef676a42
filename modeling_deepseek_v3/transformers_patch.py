"""Opt-in: every tool in the process that picks a DeepSeek-V3 class by name gets this package's classes.

`import modeling_deepseek_v3` registers the classes with the Auto classes, but several tools resolve the class named
in `config.architectures` on the `transformers` module itself (`transformers serve`, TRL given a path): there
`getattr(transformers, "DeepseekV3ForCausalLM")` is still transformers' built-in class. `apply_to_transformers()` sets
this package's classes under the DeepSeek-V3 names transformers exports, the ecosystem's way of patching transformers
for a whole process (Liger-Kernel's `apply_liger_kernel_to_*`); `restore_transformers()` puts back exactly what was
there. The environment variable `DEEPSEEK_V3_PATCH_TRANSFORMERS=1` applies it when the package is imported.

What it touches: those names on `transformers` and on `transformers.models.deepseek_v3`, through which the Auto
classes resolve the built-in config's classes (`private_api.deepseek_v3_export_modules`). Not the built-in
implementation's own modules (`transformers.models.deepseek_v3.modeling_deepseek_v3`, `.configuration_deepseek_v3`):
the built-in classes look each other up there. A name bound before the patch (`from transformers import
DeepseekV3ForCausalLM` run earlier) keeps the class it was bound to.

References: docs/serving.md; Liger-Kernel `liger_kernel/transformers/monkey_patch.py`.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping

from .configuration import DeepseekV3Config
from .heads import DeepseekV3ForSequenceClassification, DeepseekV3ForTokenClassification
from .model import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3PreTrainedModel
from .private_api import deepseek_v3_export_modules

PATCH_ENV_VAR = "DEEPSEEK_V3_PATCH_TRANSFORMERS"
_ENV_ON, _ENV_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

# transformers' exported DeepSeek-V3 names, and this package's class for each
PATCHED_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        DeepseekV3Config,
        DeepseekV3PreTrainedModel,
        DeepseekV3Model,
        DeepseekV3ForCausalLM,
        DeepseekV3ForSequenceClassification,
        DeepseekV3ForTokenClassification,
    )
}

_ABSENT = object()  # the module had no attribute of that name (a lazy module resolves it on its first lookup)
# while the patch is applied: (module, name) -> the module's own attribute before it
_replaced: dict[tuple[types.ModuleType, str], object] = {}


def apply_to_transformers() -> None:
    """Make `transformers.DeepseekV3ForCausalLM` (and `DeepseekV3Config`, `DeepseekV3Model`,
    `DeepseekV3PreTrainedModel`, `DeepseekV3ForSequenceClassification`, `DeepseekV3ForTokenClassification`, on
    `transformers` and on `transformers.models.deepseek_v3`) this package's classes, for every lookup made in this
    process afterwards: `transformers serve`, TRL given a path, and any tool that resolves a class by name then load
    DeepSeek-V3 checkpoints with this implementation. Applying it again changes nothing; `restore_transformers()`
    undoes it.

    Example:
        >>> import modeling_deepseek_v3, transformers
        >>> modeling_deepseek_v3.apply_to_transformers()
        >>> transformers.DeepseekV3ForCausalLM is modeling_deepseek_v3.DeepseekV3ForCausalLM
        True
    """
    if _replaced:
        return
    for module in deepseek_v3_export_modules():
        for name, cls in PATCHED_CLASSES.items():
            _replaced[(module, name)] = vars(module).get(name, _ABSENT)
            setattr(module, name, cls)


def restore_transformers() -> None:
    """Undo `apply_to_transformers()`: each patched module attribute becomes what it was before (an attribute the
    module did not have yet is removed, and transformers resolves its built-in class again). Nothing happens if the
    patch is not applied."""
    for (module, name), previous in _replaced.items():
        if previous is _ABSENT:
            vars(module).pop(name, None)
        else:
            setattr(module, name, previous)
    _replaced.clear()


def transformers_patched() -> bool:
    """Whether `apply_to_transformers()` is in effect."""
    return bool(_replaced)


def apply_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Apply the patch if `DEEPSEEK_V3_PATCH_TRANSFORMERS` says so (run when the package is imported); returns whether
    it did.

    Raises:
        ValueError: if the variable is set to anything but 1, true, yes, on (apply) or 0, false, no, off, empty (not).
    """
    raw = environ.get(PATCH_ENV_VAR, "")
    value = raw.strip().lower()
    if value in _ENV_OFF:
        return False
    if value not in _ENV_ON:
        raise ValueError(
            f"{PATCH_ENV_VAR}={raw!r}: must be one of {', '.join(_ENV_ON)} (patch transformers) or "
            f"{', '.join(v for v in _ENV_OFF if v)} or empty (do not)"
        )
    apply_to_transformers()
    return True

"""The DeepSeek-V3 configuration class and its named presets (`tiny`, `small`, `bench`, `deepseek-v3-671b`)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .configuration_deepseek_v3 import DeepseekV3Config

PRESET_NAMES = ("tiny", "small", "bench", "deepseek-v3-671b")


def load_preset(name: str, **overrides: Any) -> DeepseekV3Config:
    """Build a `DeepseekV3Config` from a shipped preset, with keyword overrides.

    Raises:
        ValueError: if `name` is not one of `PRESET_NAMES`.
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"preset {name!r} is unknown; choose one of {PRESET_NAMES}")
    text = resources.files(__package__).joinpath("presets", f"{name}.json").read_text()
    fields = json.loads(text)
    fields.update(overrides)
    return DeepseekV3Config(**fields)


__all__ = ["DeepseekV3Config", "PRESET_NAMES", "load_preset"]

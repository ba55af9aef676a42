"""The configuration classes of the DeepSeek-V3 architecture (`DeepseekV3Config`, `KimiK2Config` for
`model_type = "kimi_k2"`, `DeepseekV32Config` for `"deepseek_v32"`) and the named presets: shapes of our own (`tiny`,
`small`, `bench`), the released checkpoints' configs (`deepseek-v3-671b`, `deepseek-v3.1`, `kimi-k2`, `kimi-k2-0905`,
`moonlight-16b-a3b`, `deepseek-v32`), and a test-size variant of each released one that keeps its structural switches
(`tiny-deepseek-v3`, ...)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .configuration_deepseek_v3 import CONFIG_CLASSES, DeepseekV3Config, DeepseekV32Config, KimiK2Config

FAMILY_PRESET_NAMES = ("deepseek-v3-671b", "deepseek-v3.1", "kimi-k2", "kimi-k2-0905", "moonlight-16b-a3b",
                       "deepseek-v32")
PRESET_NAMES = ("tiny", "small", "bench", *FAMILY_PRESET_NAMES,
                "tiny-deepseek-v3", "tiny-deepseek-v3.1", "tiny-kimi-k2", "tiny-kimi-k2-0905", "tiny-moonlight",
                "tiny-deepseek-v32")


def load_preset(name: str, **overrides: Any) -> DeepseekV3Config:
    """Build the config of a shipped preset (a `KimiK2Config` for the Kimi-K2 ones, a `DeepseekV32Config` for
    DeepSeek-V3.2's), with keyword overrides.

    Raises:
        ValueError: if `name` is not one of `PRESET_NAMES`.
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"preset {name!r} is unknown; choose one of {PRESET_NAMES}")
    text = resources.files(__package__).joinpath("presets", f"{name}.json").read_text()
    fields = json.loads(text)
    fields.update(overrides)
    return CONFIG_CLASSES[fields.pop("model_type")](**fields)


__all__ = ["CONFIG_CLASSES", "DeepseekV3Config", "DeepseekV32Config", "KimiK2Config", "PRESET_NAMES", "load_preset"]

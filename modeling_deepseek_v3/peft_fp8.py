"""PEFT LoRA over `FP8Linear`: adapters train in full precision beside the frozen FP8 weight.

PEFT does not know `FP8Linear`, so a LoRA config must map it to a LoRA layer: `lora_config_for_fp8` registers
`FP8LoraLinear`, PEFT's own LoRA linear except that merging raises a clear error (an FP8 weight cannot absorb a
bf16 update without requantising it; keep adapters unmerged, or convert the checkpoint to bf16 and merge there).
A saved adapter reloads with `load_fp8_adapter`.
References: PEFT `tuners/lora/layer.py` (`Linear`), `LoraConfig._register_custom_module`;
docs/fp8.md (LoRA over FP8 linears).
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear

from .fp8 import FP8Linear
from .private_api import register_lora_module


class FP8LoraLinear(LoraLinear):
    """LoRA around an `FP8Linear`: `y = fp8_linear(x) + B(A(x))·scale`; refuses to merge."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "cannot merge a LoRA adapter into an FP8 weight: it would have to be requantised. Keep the adapter "
            "unmerged, or convert the checkpoint with `deepseek-v3 convert fp8-to-bf16`, load it and merge there"
        )


def lora_config_for_fp8(config: LoraConfig) -> LoraConfig:
    """Let `config` target `FP8Linear` modules (returns the same config).

    Example:
        >>> config = lora_config_for_fp8(LoraConfig(r=8, target_modules=["q_b_proj", "o_proj"]))
        >>> model = get_peft_model(fp8_model, config)
    """
    register_lora_module(config, {FP8Linear: FP8LoraLinear})
    return config


def load_fp8_adapter(model, adapter_path: str | Path, **kwargs) -> PeftModel:
    """Load a LoRA adapter saved from an FP8 model (PEFT does not save the `FP8Linear` registration with it)."""
    config = lora_config_for_fp8(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(model, adapter_path, config=config, **kwargs)

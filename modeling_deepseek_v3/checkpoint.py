"""The official checkpoint format: per-expert keys on disk, stacked expert tensors in memory, strict key checks.

On disk (DESIGN §8) routed experts are `model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`; in memory they
are stacked `[E, ...]` parameters. The conversion is given to transformers' loader for our classes only (the
registry is keyed by class name and model_type, which the built-in `DeepseekV3ForCausalLM` shares) and reversed
by `save_pretrained`, so saved folders stay readable by the built-in class, vLLM, SGLang and DeepSeek's tools.
References: transformers `conversion_mapping.py`, `core_model_loading.py` (WeightConverter, MergeModulelist).
"""

from __future__ import annotations

from transformers.core_model_loading import MergeModulelist, WeightConverter


def expert_weight_conversions(config) -> list[WeightConverter]:
    """Per-expert checkpoint keys -> stacked `experts.{gate,up,down}_proj` parameters (and back on save); in an FP8
    model also their `weight_scale_inv` -> stacked `experts.{name}_scale_inv`."""
    # (checkpoint key suffix, in-memory suffix); scales first: the weight pattern also matches the start of their keys
    suffixes = [(".weight_scale_inv", "_scale_inv")] if config.fp8_quantization_config is not None else []
    suffixes.append((".weight", ""))
    return [
        WeightConverter(
            source_patterns=f"mlp.experts.*.{name}{on_disk}",
            target_patterns=f"mlp.experts.{name}{in_memory}",
            operations=[MergeModulelist(dim=0)],
        )
        for on_disk, in_memory in suffixes
        for name in ("gate_proj", "up_proj", "down_proj")
    ]


def mtp_layer_patterns(num_hidden_layers: int, num_mtp_layers: int) -> list[str]:
    """Regexes of the MTP modules' keys, stored after the decoder layers at `model.layers.{L + k - 1}`."""
    return [rf"^model\.layers\.{num_hidden_layers + k}\." for k in range(num_mtp_layers)]


def check_loading_info(missing: set[str] | list[str], unexpected: set[str] | list[str], mismatched) -> None:
    """Raise a `ValueError` listing every missing, unexpected or mismatched key (transformers only warns)."""
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
    if mismatched:
        problems.append(f"keys with mismatched shapes ({len(mismatched)}): {sorted(mismatched)}")
    if problems:
        raise ValueError(
            "The checkpoint does not match the DeepSeek-V3 configuration: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )

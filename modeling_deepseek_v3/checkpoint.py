"""The official checkpoint format: per-expert keys on disk, stacked expert tensors in memory, strict key checks.

On disk (DESIGN §8) routed experts are `model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`; in memory they
are stacked `[E, ...]` parameters. The conversion is given to transformers' loader for our classes only (the
registry is keyed by class name and model_type, which the built-in `DeepseekV3ForCausalLM` shares) and reversed
by `save_pretrained`, so saved folders stay readable by the built-in class, vLLM, SGLang and DeepSeek's tools.

MTP module k is stored at `model.layers.{L + k - 1}.*` (L = num_hidden_layers) and lives in memory at `mtp.{k-1}.*`
(its decoder block at `mtp.{k-1}.block.*`); the renaming is reversed on save as well. Each stored module also holds
copies of the shared embedding and output head (`embed_tokens.weight`, `shared_head.head.weight`), which serving
engines read: they are written on save and, on load, compared with the main tensors.
References: transformers `conversion_mapping.py`, `core_model_loading.py` (WeightConverter, MergeModulelist,
WeightRenaming); DESIGN.md §8.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming

# submodules of a stored MTP module that belong to its decoder block, and those of the module itself
MTP_BLOCK_PARTS = r"(self_attn|mlp|input_layernorm|post_attention_layernorm)"
MTP_OWN_PARTS = r"(enorm|hnorm|eh_proj|shared_head\.norm)"
# the stored copies of the main model's shared tensors: (suffix in an MTP layer, main model key)
MTP_SHARED_COPIES = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("shared_head.head.weight", "lm_head.weight"),
)
ROWS_PER_READ = 8192  # copies are compared in slices of this many rows, never read whole


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


def mtp_weight_renamings(config) -> list[WeightRenaming]:
    """`model.layers.{L + k}.X` on disk <-> `mtp.{k}.X` (module parts) or `mtp.{k}.block.X` (decoder block parts)."""
    renamings = []
    for k in range(config.num_nextn_predict_layers):
        on_disk = rf"^model\.layers\.{config.num_hidden_layers + k}\."
        renamings.append(WeightRenaming(on_disk + MTP_BLOCK_PARTS + r"\.", rf"mtp.{k}.block.\1."))
        renamings.append(WeightRenaming(on_disk + MTP_OWN_PARTS + r"\.", rf"mtp.{k}.\1."))
    return renamings


def mtp_shared_copy_keys(config) -> dict[str, str]:
    """`{stored copy key: main model key}` for the shared embedding and head copies of every MTP module."""
    return {
        f"model.layers.{config.num_hidden_layers + k}.{suffix}": main
        for k in range(config.num_nextn_predict_layers)
        for suffix, main in MTP_SHARED_COPIES
    }


def stored_copy_differences(
    expected: dict[str, torch.Tensor], state_dict: dict | None, checkpoint_files: Iterable[str] | None
) -> dict[str, float]:
    """The largest `|stored - expected|` of every key of `expected` that the checkpoint holds (0.0: identical).

    The stored tensor is cast to the expected one's dtype first, so a checkpoint loaded in another precision is
    compared as it was loaded. Keys the checkpoint lacks are left out.
    """
    differences = {}
    if state_dict is not None:
        for key, tensor in expected.items():
            if key in state_dict:
                differences[key] = _max_difference(lambda rows, key=key: state_dict[key][rows], tensor)
        return differences
    for path in checkpoint_files or []:
        if Path(path).suffix != ".safetensors":
            continue
        with safe_open(path, framework="pt") as f:
            for key in expected.keys() & set(f.keys()):
                differences[key] = _max_difference(f.get_slice(key).__getitem__, expected[key])
    return differences


def _max_difference(read_rows, expected: torch.Tensor) -> float:
    worst = 0.0
    for start in range(0, expected.shape[0], ROWS_PER_READ):
        rows = slice(start, start + ROWS_PER_READ)
        stored = read_rows(rows).to(device=expected.device, dtype=expected.dtype)
        worst = max(worst, (stored.float() - expected[rows].float()).abs().max().item())
    return worst


def check_loading_info(
    missing: set[str] | list[str], unexpected: set[str] | list[str], mismatched, hint: str | None = None
) -> None:
    """Raise a `ValueError` listing every missing, unexpected or mismatched key (transformers only warns); `hint`
    replaces the generic advice at the end of the message."""
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
            + ". "
            + (hint or "Check that config.json belongs to these weights.")
        )

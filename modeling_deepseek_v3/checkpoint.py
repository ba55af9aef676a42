"""The official checkpoint format: per-expert keys on disk, stacked expert tensors in memory, the MTP layers'
layout, strict key checks; `CheckpointMixin` holds every loading and saving hook of the model classes.

On disk routed experts are `model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`; in memory they are stacked
`[E, ...]` parameters. The conversion is given to transformers' loader for our classes only (its registry is keyed by
class name and model_type, which the built-in `DeepseekV3ForCausalLM` shares) and reversed by `save_pretrained`, so
saved folders stay readable by the built-in class, vLLM, SGLang and DeepSeek's tools.

MTP module k is stored as decoder layer `mtp_layer_index(L, k)` (`model.layers.{L + k - 1}.*`) and lives in memory at
`mtp.{k-1}.*` (its decoder block at `mtp.{k-1}.block.*`); the renaming is reversed on save as well. Each stored
module also holds copies of the shared embedding and output head (`embed_tokens.weight`, `shared_head.head.weight`),
which serving engines read: they are written on save and, on load, compared with the main tensors.
References: transformers `conversion_mapping.py`, `core_model_loading.py` (WeightConverter, MergeModulelist,
WeightRenaming); docs/design.md (Checkpoint layout).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming
from transformers.utils import logging

from .dtypes import fp32_kept_tensor_names
from .moe import RoutedExperts
from .mtp import mtp_layer_index
from .private_api import (
    finalize_model_loading,
    ignore_unexpected_keys,
    is_peft_adapter_model,
    keep_in_fp32,
    load_pretrained_model,
    loaded_name_or_path,
    peft_adapter_prefixes,
    set_weight_conversions,
    weight_conversions,
)
from .shards import find_tensor, full_tensor, gather_pipeline_stages, held_by_other_stage, is_float8, owned_rows

logger = logging.get_logger(__name__)

# submodules of a stored MTP module that belong to its decoder block, and those of the module itself
MTP_BLOCK_PARTS = r"(self_attn|mlp|input_layernorm|post_attention_layernorm)"
MTP_OWN_PARTS = r"(enorm|hnorm|eh_proj|shared_head\.norm)"
# the stored copies of the main model's shared tensors: (suffix in an MTP layer, main model key)
MTP_SHARED_COPIES = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("shared_head.head.weight", "lm_head.weight"),
)
ROWS_PER_READ = 8192  # copies are compared in slices of this many rows, never read whole
# the task heads of the classes built on the decoder (causal LM, sequence / token classification): a checkpoint of one
# task loads into another, the other's head left out
TASK_HEAD_PATTERNS = [r"^lm_head\.", r"^score\."]
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# written into a folder while `save_pretrained` writes its weights, removed when the save finished: a folder holding
# it was left by an interrupted save, whose weights may be part old, part new
UNFINISHED_SAVE = ".unfinished-save"
SCALE_SUFFIX = "_scale_inv"  # `X.weight_scale_inv` holds the block scales of the FP8 `X.weight`
# safetensors' names of the dtypes an FP8 checkpoint holds (FP8 payloads must be e4m3, the official format)
FP8_PAYLOAD_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("F32", "BF16")  # safetensors' names of the dtypes a block scale may be stored in
TORCH_DTYPE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bfloat16: "BF16",
                     torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def expert_key_suffixes(config) -> list[tuple[str, str]]:
    """(checkpoint key suffix, in-memory suffix) of a routed expert's tensors: the weight, and in an FP8 model its
    block scales (listed first: the weight's pattern also matches the start of their keys)."""
    suffixes = [(".weight_scale_inv", "_scale_inv")] if config.fp8_quantization_config is not None else []
    return suffixes + [(".weight", "")]


def expert_weight_conversions(config) -> list[WeightConverter]:
    """Per-expert checkpoint keys -> stacked `experts.{gate,up,down}_proj` parameters (and back on save); in an FP8
    model also their `weight_scale_inv` -> stacked `experts.{name}_scale_inv`."""
    return [
        WeightConverter(
            source_patterns=f"mlp.experts.*.{name}{on_disk}",
            target_patterns=f"mlp.experts.{name}{in_memory}",
            operations=[MergeModulelist(dim=0)],
        )
        for on_disk, in_memory in expert_key_suffixes(config)
        for name in RoutedExperts.PROJECTIONS
    ]


def layer_prefix(layer_idx: int) -> str:
    """The checkpoint key prefix of decoder layer `layer_idx` (MTP modules included), also its name in metrics."""
    return f"model.layers.{layer_idx}"


def mtp_layer_patterns(config) -> list[str]:
    """Regexes of the MTP modules' keys, stored after the decoder layers."""
    return [rf"^{re.escape(layer_prefix(mtp_layer_index(config.num_hidden_layers, k)))}\."
            for k in range(1, config.num_nextn_predict_layers + 1)]


def mtp_key_renames(config) -> list[tuple[str, str]]:
    """`(regex of a stored key, replacement)`: `model.layers.{L + k}.X` on disk -> `mtp.{k}.X` (module parts) or
    `mtp.{k}.block.X` (decoder block parts)."""
    renames = []
    for k, on_disk in enumerate(mtp_layer_patterns(config)):
        renames.append((on_disk + MTP_BLOCK_PARTS + r"\.", rf"mtp.{k}.block.\1."))
        renames.append((on_disk + MTP_OWN_PARTS + r"\.", rf"mtp.{k}.\1."))
    return renames


def mtp_weight_renamings(config) -> list[WeightRenaming]:
    """`mtp_key_renames` for transformers' loader (and reversed by `save_pretrained`)."""
    return [WeightRenaming(pattern, replacement) for pattern, replacement in mtp_key_renames(config)]


def mtp_shared_copy_keys(config) -> dict[str, str]:
    """`{stored copy key: main model key}` for the shared embedding and head copies of every MTP module."""
    return {
        f"{layer_prefix(mtp_layer_index(config.num_hidden_layers, k))}.{suffix}": main
        for k in range(1, config.num_nextn_predict_layers + 1)
        for suffix, main in MTP_SHARED_COPIES
    }


class MemoryLayout(NamedTuple):
    """A state dict in the official layout, sorted into what `load_state_dict` does with each tensor."""

    tensors: dict[str, torch.Tensor]  # by in-memory key: loaded as they are
    expert_parts: dict[str, dict[int, torch.Tensor]]  # stacked key -> {expert: tensor}, for stacks given in part
    shared_copies: dict[str, torch.Tensor]  # the MTP layers' copies of the embedding and head, by stored key


class KeyPlace(NamedTuple):
    """Where a key of a state dict in the official layout goes in memory."""

    key: str  # the in-memory key (for an expert's tensor, its stack)
    expert: int | None = None  # the expert of a per-expert tensor
    shared_copy: bool = False  # an MTP layer's copy of the embedding or head: compared, not loaded


def memory_key_places(config, keys: Iterable[str], has_mtp_modules: bool) -> dict[str, KeyPlace | None]:
    """The `KeyPlace` of each key of a state dict in the official layout (what `save_pretrained` writes): MTP layers
    renamed to `mtp.{k}` (`mtp_key_renames`), per-expert tensors to their stack. Keys in the in-memory layout keep
    their name. None: left out, as `from_pretrained` does (the stored MTP layers, for a model without MTP modules)."""
    renames = [(re.compile(pattern), replacement) for pattern, replacement in mtp_key_renames(config)]
    mtp_layers = [re.compile(pattern) for pattern in mtp_layer_patterns(config)]
    copy_keys = mtp_shared_copy_keys(config)
    suffixes = dict(expert_key_suffixes(config))
    expert_key = re.compile(
        rf"^(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<name>{'|'.join(RoutedExperts.PROJECTIONS)})"
        rf"(?P<suffix>{'|'.join(re.escape(s) for s in suffixes)})$"
    )
    places = {}
    for stored in keys:
        if stored in copy_keys:
            places[stored] = KeyPlace(stored, shared_copy=True)
            continue
        if not has_mtp_modules and any(p.match(stored) for p in mtp_layers):
            places[stored] = None
            continue
        key = stored
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        match = expert_key.match(key)
        if match is None or int(match["index"]) >= config.n_routed_experts:  # no expert: reported as unexpected
            places[stored] = KeyPlace(key)
        else:
            places[stored] = KeyPlace(f"{match['experts']}.{match['name']}{suffixes[match['suffix']]}",
                                      int(match["index"]))
    return places


def to_memory_layout(config, state_dict: dict[str, torch.Tensor], has_mtp_modules: bool) -> MemoryLayout:
    """Sort a state dict in the official layout into in-memory keys (`memory_key_places`), per-expert tensors stacked
    in expert order. A state dict in either layout (or a mix of both) comes out in the in-memory one.

    Raises:
        ValueError: if a tensor is given in both layouts.
    """
    tensors, experts, shared_copies = {}, {}, {}
    for stored, place in memory_key_places(config, state_dict, has_mtp_modules).items():
        if place is None:
            continue
        if place.shared_copy:
            shared_copies[stored] = state_dict[stored]
        elif place.expert is None:
            tensors[place.key] = state_dict[stored]
        else:
            experts.setdefault(place.key, {})[place.expert] = state_dict[stored]
    expert_parts = {}
    for stacked, parts in experts.items():
        if stacked in tensors:
            raise ValueError(f"the state dict holds {stacked} both stacked and as per-expert tensors; give it once")
        if sorted(parts) == list(range(config.n_routed_experts)):
            tensors[stacked] = torch.stack([parts[e] for e in range(config.n_routed_experts)])
        else:
            expert_parts[stacked] = parts
    return MemoryLayout(tensors, expert_parts, shared_copies)


def resume_key_problems(model, missing: Iterable[str], unexpected: Iterable[str]) -> tuple[list[str], list[str]]:
    """The tensors of `model` a checkpoint truly lacks, and the checkpoint keys that match none, from a load report
    that compares the checkpoint's keys with the model's by name (what `Trainer` gets from transformers'
    `load_sharded_checkpoint`) or by in-memory key (from `load_state_dict`). Keys named differently on disk
    (per-expert, MTP layers, the MTP copies) are matched to the model's tensors first, and a stack of experts given
    in part is named with the experts it lacks. A tied tensor (`lm_head` tied to the embedding) is never missing."""
    present, parts, stray = set(), {}, []
    model_keys = set(model.state_dict())
    for stored, place in memory_key_places(model.config, unexpected, model.has_mtp_modules).items():
        if place is None or place.shared_copy:
            continue
        if place.key not in model_keys:
            stray.append(stored)
        elif place.expert is None:
            present.add(place.key)
        else:
            parts.setdefault(place.key, set()).add(place.expert)
    all_experts = set(range(model.config.n_routed_experts))
    present |= {stacked for stacked, held in parts.items() if held == all_experts}
    present |= set(getattr(model, "all_tied_weights_keys", None) or {})
    lacking = []
    for key in sorted(set(missing) - present):
        absent = sorted(all_experts - parts[key]) if key in parts else None
        lacking.append(key if absent is None else f"{key} (experts {absent})")
    return lacking, sorted(stray)


def stored_copy_differences(
    expected: dict[str, torch.Tensor],
    state_dict: dict | None,
    checkpoint_files: Iterable[str] | None,
    shards: dict[str, tuple[int, tuple[int, ...]]] | None = None,
) -> dict[str, float]:
    """The largest `|stored - expected|` of every key of `expected` that the checkpoint holds (0.0: identical; NaN:
    the stored copy holds NaN).

    The stored tensor is cast to the expected one's dtype first, so a checkpoint loaded in another precision is
    compared as it was loaded. Keys the checkpoint lacks are left out. `shards[key]` = `(first row, full shape)` for
    an `expected[key]` that holds some of the rows of the stored tensor (a shard of a distributed model).

    Raises:
        ValueError: if a stored copy's shape is not the expected tensor's (`check_copy_shape`).
    """
    shards = shards or {}

    def first_row(key: str) -> int:
        return shards[key][0] if key in shards else 0

    def full_shape(key: str) -> tuple[int, ...]:
        return shards[key][1] if key in shards else tuple(expected[key].shape)

    differences = {}
    if state_dict is not None:
        for key, tensor in expected.items():
            if key in state_dict:
                check_copy_shape(key, tuple(state_dict[key].shape), full_shape(key))
                read_rows = lambda rows, key=key: state_dict[key][rows]  # noqa: E731
                differences[key] = _max_difference(read_rows, tensor, first_row(key))
        return differences
    for path in checkpoint_files or []:
        if Path(path).suffix != ".safetensors":
            continue
        with safe_open(path, framework="pt") as f:
            for key in expected.keys() & set(f.keys()):
                check_copy_shape(key, tuple(f.get_slice(key).get_shape()), full_shape(key))
                differences[key] = _max_difference(f.get_slice(key).__getitem__, expected[key], first_row(key))
    return differences


def check_copy_shape(key: str, stored_shape: tuple[int, ...], expected_shape: tuple[int, ...]) -> None:
    """A stored copy of a shared tensor must have the main tensor's shape (a bare broadcast error otherwise)."""
    if tuple(stored_shape) != tuple(expected_shape):
        raise ValueError(f"the checkpoint's {key} has shape {list(stored_shape)}, but it is a copy of a tensor of "
                         f"shape {list(expected_shape)}: the checkpoint does not match the configuration")


def _max_difference(read_rows, expected: torch.Tensor, first_row: int) -> float:
    """The largest `|stored - expected|` over the stored rows from `first_row` on, NaN as soon as a slice holds NaN
    (Python's `max` would drop it)."""
    worst = 0.0
    for start in range(0, expected.shape[0], ROWS_PER_READ):
        end = min(start + ROWS_PER_READ, expected.shape[0])
        stored = read_rows(slice(first_row + start, first_row + end)).to(device=expected.device, dtype=expected.dtype)
        difference = (stored.float() - expected[start:end].float()).abs().max().item()
        if math.isnan(difference):
            return math.nan
        worst = max(worst, difference)
    return worst


def check_checkpoint_files(state_dict: dict | None, checkpoint_files: Iterable[str] | None,
                           folder: str | None = None) -> None:
    """Load-time rules that transformers does not check, read from the safetensors headers (no tensor data):

    * a local checkpoint `folder` was not left by an interrupted save (`check_save_finished`), and every file lies
      inside it (`check_files_inside`);
    * a folder holds `model.safetensors` or a sharded index, or both when they agree (`check_single_or_sharded`);
    * no tensor is stored in two shards (transformers would silently load one of them);
    * a weight stored with block scales (`X` and `X_scale_inv`) is an e4m3 FP8 payload: one in bf16 or another
      format would be cast to FP8 and scaled a second time;
    * every block scale has its weight and is stored as fp32 or bf16 (`check_scale_entries`).

    Raises:
        ValueError: naming the key, file and rule.
    """
    if state_dict is not None:
        tables = {"the state_dict": {key: TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)) for key, t in
                                     state_dict.items()}}
    else:
        if folder is not None and Path(folder).is_dir():
            check_save_finished(Path(folder))
            check_files_inside(Path(folder), checkpoint_files or [])
        files = [Path(path) for path in checkpoint_files or [] if Path(path).suffix == ".safetensors"]
        if files:
            check_single_or_sharded(files[0].parent)
        tables = {path.name: {key: dtype for key, (dtype, _) in safetensors_headers(path).items()} for path in files}
    where: dict[str, str] = {}
    for name, table in tables.items():
        for key in table:
            if key in where:
                raise ValueError(f"{key} is stored in both {where[key]} and {name}; a checkpoint must hold each tensor "
                                 "once (transformers would load one of them silently)")
            where[key] = name
    dtypes = {key: dtype for table in tables.values() for key, dtype in table.items()}
    check_scale_entries(dtypes, where)
    for key, dtype in dtypes.items():
        if key + SCALE_SUFFIX in dtypes and dtype != FP8_PAYLOAD_DTYPE:
            raise ValueError(
                f"{key} (in {where[key]}) is stored as {dtype} next to its {key + SCALE_SUFFIX}, but a weight with "
                f"block scales must be an e4m3 FP8 payload ({FP8_PAYLOAD_DTYPE}); loading it would cast it to FP8 and "
                "scale it twice. Convert the checkpoint with `deepseek-v3 convert fp8-to-bf16`, or remove the scales "
                "and quantization_config if the weights are already dequantised"
            )


def check_files_inside(folder: Path, files: Iterable[str]) -> None:
    """Every checkpoint file an index names lies inside the folder: its path, taken as written (`..` folded, links not
    followed, so that the hub cache's symlinked files load), starts with the folder's. The converter applies the same
    rule to the index (`read_weight_map`).

    Raises:
        ValueError: naming the file that lies outside.
    """
    inside = os.path.normpath(os.path.abspath(folder))
    for file in files:
        path = os.path.normpath(os.path.abspath(file))
        if os.path.commonpath([inside, path]) != inside:
            raise ValueError(f"the checkpoint in {folder} names the weight file {file}, which is not inside the "
                             "folder; an index may only name files of its own folder")


def check_scale_entries(dtypes: dict[str, str], where: dict[str, str]) -> None:
    """Every block scale `X_scale_inv` (`dtypes`: key -> safetensors dtype name, `where`: key -> file) is stored as
    fp32 or bf16 next to its weight `X`: an integer scale would be truncated, an FP8 one rounded, and a scale without
    its weight would be dropped without a word.

    Raises:
        ValueError: naming the scale, its file and the rule.
    """
    for key, dtype in dtypes.items():
        if not key.endswith(SCALE_SUFFIX):
            continue
        weight = key[: -len(SCALE_SUFFIX)]
        if weight not in dtypes:
            raise ValueError(f"{key} (in {where[key]}) is a block scale without its weight {weight}; a checkpoint "
                             "stores each scale next to the FP8 weight it scales")
        if dtype not in SCALE_DTYPES:
            raise ValueError(f"{key} (in {where[key]}) is stored as {dtype}; block scales must be "
                             f"{' or '.join(SCALE_DTYPES)}")


def check_finite(key: str, tensor: torch.Tensor, where: str) -> None:
    """A stored weight or block scale holds numbers: no NaN or infinity. An e4m3 FP8 payload has no infinity, and
    its NaN is every byte `x1111111`.

    Raises:
        ValueError: naming the tensor, where it was read and how many values are bad.
    """
    if tensor.dtype == torch.float8_e4m3fn:
        bad = int(((tensor.view(torch.uint8) & 0x7F) == 0x7F).sum())
    elif tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
    else:
        return
    if bad:
        raise ValueError(f"{key} (in {where}) holds {bad} NaN or infinite values; the checkpoint is damaged, or was "
                         "written from a model whose weights had diverged")


def safetensors_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{key: (safetensors dtype name, shape)}` from a file's header (no tensor data is read).

    Raises:
        ValueError: if the file is not a readable safetensors file.
    """
    try:
        with safe_open(path, framework="pt") as f:
            return {key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def check_save_finished(folder: Path) -> None:
    """A folder that `save_pretrained` was interrupted in holds its `UNFINISHED_SAVE` marker: some weight files may be
    new and others left from an earlier save, a mix that would load without error.

    Raises:
        ValueError: naming the folder and the marker.
    """
    if (folder / UNFINISHED_SAVE).exists():
        raise ValueError(f"{folder} holds an unfinished save ({UNFINISHED_SAVE} is there): save_pretrained was "
                         "interrupted while writing it, so its weights may be part new, part old. Save the model "
                         f"again; delete {UNFINISHED_SAVE} only if you know the weights are whole")


def check_single_or_sharded(folder: Path) -> None:
    """A checkpoint folder holds one `model.safetensors` or a `model.safetensors.index.json` with its shards. It may
    hold both when they agree, as folders written by other tools do: the index maps every key of `model.safetensors`
    to that file and names nothing else. Otherwise transformers would load the single file while a converter reads
    the index, which describes other weights.

    Raises:
        ValueError: if both are there and disagree, naming the files or keys.
    """
    single, index_path = folder / SAFE_WEIGHTS_NAME, folder / SAFE_INDEX_NAME
    if not (single.is_file() and index_path.is_file()):
        return
    weight_map = _read_index(index_path)
    others = sorted(set(weight_map.values()) - {SAFE_WEIGHTS_NAME})
    if others:
        raise ValueError(
            f"{folder} holds both {SAFE_WEIGHTS_NAME} and {SAFE_INDEX_NAME}, whose index maps weights to "
            f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}; it is unclear which weights the folder "
            "holds: remove the one that does not belong to this checkpoint"
        )
    stored, listed = set(safetensors_headers(single)), set(weight_map)
    for keys, rule in ((listed - stored, f"are listed in {SAFE_INDEX_NAME} but not stored in {SAFE_WEIGHTS_NAME}"),
                       (stored - listed, f"are stored in {SAFE_WEIGHTS_NAME} but not listed in {SAFE_INDEX_NAME}")):
        if keys:
            names = sorted(keys)
            raise ValueError(f"{folder}: {len(names)} keys {rule} ({', '.join(names[:5])}"
                             f"{' ...' if len(names) > 5 else ''}); the two files describe different checkpoints")


def read_weight_map(folder: Path) -> dict[str, str]:
    """`{key: shard file}` of a safetensors checkpoint folder, after checking that its files agree: the index (if
    any) is valid JSON naming existing shards inside the folder, every `.safetensors` file of the folder is listed,
    and each shard holds exactly the keys the index maps to it.

    Raises:
        ValueError: naming the file or key, for each way the folder breaks these rules.
    """
    check_save_finished(folder)
    check_single_or_sharded(folder)
    index_path = folder / SAFE_INDEX_NAME
    if not index_path.is_file():
        if not (folder / SAFE_WEIGHTS_NAME).is_file():
            raise ValueError(f"{folder} has neither {SAFE_INDEX_NAME} nor {SAFE_WEIGHTS_NAME}")
        return dict.fromkeys(safetensors_headers(folder / SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME)
    weight_map = _read_index(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
            raise ValueError(f"{index_path} lists the shard {shard!r}, which is not inside {folder}")
        if not (folder / shard).is_file():
            raise ValueError(f"{index_path} lists the shard {shard}, which does not exist in {folder}")
    for path in sorted(folder.glob("*.safetensors")):
        if path.name not in shards:
            raise ValueError(f"{path} is not listed in {index_path}: its tensors would be left out; list it or move "
                             "it away")
    for shard in shards:
        stored = safetensors_headers(folder / shard)
        for key in stored:
            if weight_map.get(key) != shard:
                listed = f"maps it to {weight_map[key]}" if key in weight_map else "does not list it"
                raise ValueError(f"{key} is stored in {shard} but {index_path.name} {listed}")
        for key in (k for k, listed in weight_map.items() if listed == shard and k not in stored):
            raise ValueError(f"{index_path.name} maps {key} to {shard}, which does not hold it")
    return weight_map


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{path} has no weight_map of tensor names to shard files")
    return weight_map


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


# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` without importing the package first:
# config.json names these classes in `auto_map`, defined in a small file next to the weights that imports the
# installed package.
# They are thin subclasses because transformers marks the classes it loads as remote code (and copies their file
# into every folder they are saved to): the marks land on them, never on the package's own classes.
REMOTE_CODE_MODULE = "modeling_deepseek_v3_remote"
# The import sits in a `try` so that transformers' own check of the file's imports skips it: that check would tell a
# user without the package to pip-install it by its import name, which the package index does not hold for us.
REMOTE_CODE = '''"""Loads this checkpoint with the modeling_deepseek_v3 package, so that
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works in a process that never imported it.

The package is not on the Python package index, and a project there under its name would not be ours: install it
from a clone of its repository, `pip install -e <path-to-clone>` (its README, "Set up").
"""

try:
    import modeling_deepseek_v3
except ImportError as error:
    raise ImportError(
        "This checkpoint loads with the modeling_deepseek_v3 package, which is not installed. The package is not on "
        "the Python package index (a project there under its name would not be ours): install it from a clone of "
        "its repository, `pip install -e <path-to-clone>` (its README, Set up)"
    ) from error


class DeepseekV3Config(modeling_deepseek_v3.DeepseekV3Config):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class DeepseekV3Model(modeling_deepseek_v3.DeepseekV3Model):
    config_class = DeepseekV3Config


class DeepseekV3ForCausalLM(modeling_deepseek_v3.DeepseekV3ForCausalLM):
    config_class = DeepseekV3Config
'''
REMOTE_AUTO_MAP = {
    "AutoConfig": "DeepseekV3Config",
    "AutoModel": "DeepseekV3Model",
    "AutoModelForCausalLM": "DeepseekV3ForCausalLM",
}


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written: inode, size, modification time (None if absent)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class SaveInProgress:
    """The writing rank's side of one `save_pretrained` into `folder`. Begun: the `UNFINISHED_SAVE` marker is written
    before the first weight file. Finished (after the last one, before the ranks of a sharded save pass their
    barrier, so none of them reads a marked folder): the marker is removed, and so is `model.safetensors` or the shard
    index if this save wrote the other one and left it as an earlier save had written it. transformers removes an
    earlier save's stale shards but not these two, and a folder holding a single file and an index that disagree is
    refused (`check_single_or_sharded`); a file this save wrote is never removed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.layouts = (folder / SAFE_WEIGHTS_NAME, folder / SAFE_INDEX_NAME)
        self.before = [file_stamp(path) for path in self.layouts]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / UNFINISHED_SAVE).write_text("save_pretrained is writing this folder; if it was interrupted, its "
                                              "weights may be part of an earlier save: save again\n")
        self.finished = False

    def finish(self) -> None:
        if self.finished:
            return
        after = [file_stamp(path) for path in self.layouts]
        written = [stamp is not None and stamp != old for stamp, old in zip(after, self.before)]
        for path, was_written, other_written in zip(self.layouts, written, reversed(written)):
            if other_written and not was_written and path.is_file():
                path.unlink()
        (self.folder / UNFINISHED_SAVE).unlink()
        self.finished = True


def write_remote_code(folder: str | Path) -> Path:
    """Make a saved DeepSeek-V3 folder loadable with `trust_remote_code=True` by processes that do not import this
    package: adds our classes to the `auto_map` of its `config.json` (its other entries are kept) and writes the small
    `modeling_deepseek_v3_remote.py` beside it.

    Returns:
        The path of the code file.

    Raises:
        ValueError: if `folder` has no `config.json`, or one that is not JSON of a `deepseek_v3` model, or whose
            `auto_map` is not a dict.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a checkpoint folder: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not JSON ({e})") from e
    if not isinstance(config, dict) or config.get("model_type") != "deepseek_v3":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{config_path} has model_type {kind!r}; remote code is written for 'deepseek_v3' only")
    existing = config.get("auto_map") or {}
    if not isinstance(existing, dict):
        raise ValueError(f"{config_path}: `auto_map` = {existing!r} is invalid: it must map Auto classes to code")
    ours = {auto: f"{REMOTE_CODE_MODULE}.{name}" for auto, name in REMOTE_AUTO_MAP.items()}
    config["auto_map"] = {**existing, **ours}
    code_path = folder / f"{REMOTE_CODE_MODULE}.py"
    code_path.write_text(REMOTE_CODE)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return code_path


def refuse_unmatched_adapter_keys(module, state_dict, prefix: str, *args) -> None:
    """A `load_state_dict` pre-hook of the model: adapter tensors (a key part starting with a PEFT prefix such as
    `lora_`) that match no tensor of the model are refused, naming them. PEFT loads adapters with `strict=False`,
    which would leave them out without a word and give a partly loaded adapter."""
    adapter_parts = peft_adapter_prefixes()
    adapter_keys = [key for key in state_dict if key.startswith(prefix)
                    and any(part.startswith(adapter_parts) for part in key[len(prefix):].split("."))]
    if not adapter_keys:
        return
    own = set(module.state_dict(prefix=prefix, keep_vars=True))
    unmatched = sorted(key for key in adapter_keys if key not in own)
    if unmatched:
        raise ValueError(
            f"the adapter holds {len(unmatched)} tensors that match no module of this model: {unmatched}. Loading "
            "would leave them out and give a partly loaded adapter. Check that the adapter was trained on this "
            "model and that its adapter_config.json targets (target_modules, target_parameters) name its modules"
        )


def names_remote_code(config) -> bool:
    """Whether `config.auto_map` points at the code file `write_remote_code` writes: the config came from such a
    folder, and a folder it is saved to needs that file too."""
    auto_map = getattr(config, "auto_map", None) or {}
    return any(isinstance(target, str) and target.startswith(f"{REMOTE_CODE_MODULE}.") for target in auto_map.values())


def is_task_head_key(model, key: str) -> bool:
    """Whether `key` (a parameter name) belongs to the model's task head (`lm_head`, `score`): outside its base model
    and its MTP modules. A base model has no head."""
    if model.base_model is model:
        return False
    return not key.startswith((f"{model.base_model_prefix}.", "mtp."))


class CheckpointMixin:
    """Loading and saving hooks of the DeepSeek-V3 model classes (put before `PreTrainedModel` in the bases): the
    official key layout in and out, the MTP copies, and strict key checks.

    Strict means: every weight of the decoder and of the MTP modules must be in the checkpoint and match its shape,
    and the checkpoint may hold nothing else. A task head is the exception, as in transformers: a head missing from
    the checkpoint (a base-model checkpoint loaded into the causal LM, a causal-LM checkpoint into a classifier) is
    initialised and reported by transformers' load report, and the head of another task is left out.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after checking a local folder's shard index (valid JSON with a
        `weight_map`), which transformers would otherwise fail on with a bare JSON error naming no file."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
            if (folder / SAFE_INDEX_NAME).is_file():
                _read_index(folder / SAFE_INDEX_NAME)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __init__(self, config, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # MTP modules stored after the decoder layers are not an error for a model without them; a model with them
        # loads their keys (renamed) and checks that nothing else is left there (`_finalize_model_loading`)
        ignore_unexpected_keys(self, mtp_layer_patterns(config) + TASK_HEAD_PATTERNS)
        self.register_load_state_dict_pre_hook(refuse_unmatched_adapter_keys)

    @property
    def has_mtp_modules(self) -> bool:
        """Whether this model holds MTP modules (`mtp`), whose weights load and save with it."""
        return len(getattr(self, "mtp", ())) > 0

    def checkpoint_conversions(self) -> list:
        """Official checkpoint keys <-> this model's parameters: the MTP layers <-> `mtp.{k}.*`, per-expert <-> stacked
        experts."""
        renamings = mtp_weight_renamings(self.config) if self.has_mtp_modules else []
        return renamings + expert_weight_conversions(self.config)

    def post_init(self) -> None:
        # the routing biases (and an FP8 model's block scales) load in fp32 whatever dtype from_pretrained is given
        keep_in_fp32(self, fp32_kept_tensor_names(self))
        super().post_init()
        set_weight_conversions(self, self.checkpoint_conversions())  # save_pretrained reverses them

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        check_checkpoint_files(state_dict, checkpoint_files, loaded_name_or_path(load_config))
        ours = model.checkpoint_conversions()
        result = load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys, ours)
        # transformers keeps the conversions that matched, for save_pretrained to reverse; ours always describe the
        # in-memory layout (a checkpoint may be in the stacked layout already), so all of them are kept
        kept = [c for c in weight_conversions(model) if all(c is not o for o in ours)]
        set_weight_conversions(model, kept + ours)
        if model.has_mtp_modules:
            model._warn_about_differing_mtp_copies(state_dict, checkpoint_files)
        return result

    def _warn_about_differing_mtp_copies(
        self, state_dict: dict | None, checkpoint_files: list[str] | None, loading: dict | None = None
    ) -> None:
        """Warn when an MTP module's stored copy of the embedding or output head differs from the main tensor (the
        one in `loading`, the tensors being loaded by in-memory key, else the model's own); the main one is used
        either way (the modules share it)."""
        copies = mtp_shared_copy_keys(self.config)
        loading = loading or {}
        # compared where this rank holds them: not offloaded (meta), not on another pipeline stage, and of a sharded
        # tensor the rows this rank holds (other shard layouts are not compared)
        expected, shards = {}, {}
        for copy, main in copies.items():
            tensor = loading[main] if main in loading else find_tensor(self, main)
            held = None if tensor is None or tensor.is_meta else owned_rows(tensor)
            if held is not None:
                expected[copy] = held[0]
                shards[copy] = held[1], tuple(tensor.shape)
        for key, difference in stored_copy_differences(expected, state_dict, checkpoint_files, shards).items():
            if difference != 0:  # NaN included
                logger.warning(
                    f"The checkpoint's {key} differs from {copies[key]} (max |difference| = {difference:.3g}). The "
                    f"MTP modules share the main model's tensor, so {copies[key]} is used and {key} is ignored; "
                    "save_pretrained will write a copy of the main tensor."
                )

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, also for a state dict in the official layout: what `save_pretrained` writes
        and what `Trainer` reads back with this method when it resumes (`resume_from_checkpoint`) or loads its best
        checkpoint. Per-expert tensors are stacked, the MTP layers go to `mtp.{k}`, and the MTP layers' copies of the
        embedding and head are compared with the main tensors given in the same call (a differing copy is named in a
        warning) and left out (`to_memory_layout`). Missing and unexpected keys are reported by in-memory key, as
        torch does.

        A state dict holding only some experts of a stack (one shard of a sharded checkpoint, which transformers'
        `load_sharded_checkpoint` loads shard by shard) fills those experts; the stack is reported missing from that
        call. A copy whose main tensor is in another shard is not compared: the model's own tensor may not be loaded
        yet.
        """
        layout = to_memory_layout(self.config, state_dict, self.has_mtp_modules)
        copies = mtp_shared_copy_keys(self.config)
        comparable = {key: t for key, t in layout.shared_copies.items() if copies[key] in layout.tensors}
        if self.has_mtp_modules and comparable:
            self._warn_about_differing_mtp_copies(comparable, None, loading=layout.tensors)
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for key, parts in layout.expert_parts.items():
                if key not in parameters:
                    raise ValueError(f"the state dict holds experts {sorted(parts)} of {key}, which this model lacks")
                for expert, tensor in parts.items():
                    target = parameters[key][expert]
                    if tensor.shape != target.shape:
                        raise ValueError(f"expert {expert} of {key} has shape {list(tensor.shape)} in the state dict, "
                                         f"but {list(target.shape)} in the model")
                    target.copy_(tensor)
        return super().load_state_dict(layout.tensors, strict=strict, assign=assign)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # a pipeline stage skips the keys of the modules another stage holds (transformers knows decoder layers only)
        loading_info.unexpected_keys -= {k for k in loading_info.unexpected_keys if held_by_other_stage(model, k)}
        # keys left in the MTP layers once their modules took theirs (the shared copies excepted) are unexpected
        stray = set()
        if model.has_mtp_modules:
            patterns = [re.compile(p) for p in mtp_layer_patterns(model.config)]
            copies = mtp_shared_copy_keys(model.config)
            stray = {k for k in loading_info.unexpected_keys if any(p.match(k) for p in patterns) and k not in copies}
        loading_info = finalize_model_loading(model, load_config, loading_info)
        for name, tensor in model.state_dict().items():  # the FP8 payloads and their block scales, as loaded
            if (is_float8(tensor) or name.endswith(SCALE_SUFFIX)) and not tensor.is_meta:  # meta: offloaded
                check_finite(name, tensor.to_local() if isinstance(tensor, DTensor) else tensor, "the checkpoint")
        # ignore_mismatched_sizes relaxes shapes only: a missing tensor would otherwise be left uninitialised
        mismatched = [] if load_config.ignore_mismatched_sizes else loading_info.mismatched_keys
        # a task head the checkpoint lacks was initialised by transformers, which reports it
        missing = {k for k in loading_info.missing_keys if not is_task_head_key(model, k)}
        hint = None
        if missing and all(k.startswith("mtp.") for k in missing):
            hint = (
                f"The checkpoint lacks the weights of the MTP modules that num_nextn_predict_layers = "
                f"{model.config.num_nextn_predict_layers} asks for; load it with num_nextn_predict_layers=0 to "
                "leave the modules out."
            )
        check_loading_info(missing, set(loading_info.unexpected_keys) | stray, mismatched, hint)
        return loading_info

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        remote_code: bool = False,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained`, writing the official MTP layout (`gather_sharded_state_dict_for_save`).
        With `remote_code=True` the folder also loads with `trust_remote_code=True` in a process that never imported
        this package (`write_remote_code`); a model loaded from such a folder keeps it so in every folder it is saved
        to (a `Trainer` checkpoint included), as its config's `auto_map` names that code."""
        # one rank writes the files of a sharded model; the others pass through the same call
        progress = SaveInProgress(Path(save_directory)) if self.should_save_on_this_rank(is_main_process) else None
        self._save_in_progress = progress  # finished by `barrier_after_gathered_checkpoint_save`, inside the save
        try:
            result = super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                             **kwargs)
        finally:
            del self._save_in_progress
        if progress is not None:
            progress.finish()  # where transformers' save did not reach the barrier hook
        if (remote_code or names_remote_code(self.config)) and is_main_process:
            write_remote_code(save_directory)
        return result

    def gather_sharded_state_dict_for_save(self, model_to_save, state_dict: dict, distributed_config, *,
                                           save_on_this_rank: bool = True) -> dict:
        """The state `save_pretrained` writes: gathered over the ranks of a sharded model (transformers; the pipeline
        stages, `parallel.gather_pipeline_stages`), then in the official MTP layout: every MTP module's
        `model.layers.{L + k - 1}.embed_tokens.weight` and `.shared_head.head.weight` as copies of the main tensors.
        The copies are added after the gather, which under FSDP rebuilds the state from the model."""
        pipelined = distributed_config is not None and distributed_config.pp_size > 1
        if not pipelined and any(isinstance(t, DTensor) and is_float8(t) for t in state_dict.values()):
            # FP8 shards: transformers' gather fails on them over gloo; gathered here, the writing rank keeps them
            gathered = {key: full_tensor(t).detach().cpu().contiguous() for key, t in state_dict.items()}
            state_dict = gathered if torch.distributed.get_rank() == 0 else {}
        else:
            state_dict = super().gather_sharded_state_dict_for_save(
                model_to_save, state_dict, distributed_config, save_on_this_rank=save_on_this_rank or pipelined
            )
        if pipelined:
            state_dict = gather_pipeline_stages(state_dict)
        if self.has_mtp_modules and not is_peft_adapter_model(self):
            state_dict = dict(state_dict)
            for copy, main in mtp_shared_copy_keys(self.config).items():
                tensor = state_dict.get(main)  # absent on the ranks that do not write
                if tensor is None:
                    continue
                if tensor.is_meta:  # offloaded by accelerate: transformers cannot reload a tensor it does not own
                    logger.warning(f"{main} is offloaded, so its MTP copy {copy} is not written")
                    continue
                # a copy, not a view: safetensors refuses tensors that share storage
                state_dict[copy] = tensor.detach().clone()
        return state_dict

    def barrier_after_gathered_checkpoint_save(self, distributed_config) -> None:
        progress = getattr(self, "_save_in_progress", None)
        if progress is not None:  # every weight file is written: unmark the folder before the other ranks go on
            progress.finish()
        super().barrier_after_gathered_checkpoint_save(distributed_config)
        # transformers waits for the writing rank under tensor, expert and data parallelism only
        if distributed_config is not None and distributed_config.pp_size > 1:
            torch.distributed.barrier()

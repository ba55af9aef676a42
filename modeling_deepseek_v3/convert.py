"""Checkpoint conversion between the official FP8 format and bf16, one safetensors shard at a time.

`fp8-to-bf16` multiplies every FP8 weight by its `weight_scale_inv` blocks and drops `quantization_config`;
`bf16-to-fp8` quantises the projections the official release stores in FP8 (128×128 blocks) and writes the official
`quantization_config`. Peak memory is about one shard (in and out), not the model. A checkpoint quantised from bf16
weights survives fp8 -> bf16 -> fp8 bit for bit; one quantised from fp32 master weights keeps its payloads, while
its scales move by at most one bf16 step (2^-8 relative), since the bf16 weights cannot carry them exactly.
The result is written to a temporary folder beside the destination and renamed only when complete, so an
interrupted run leaves no half-written checkpoint. Before anything is written the source is checked whole (its
`config.json`, index and shards agree, see `checkpoint.read_weight_map`; it is a DeepSeek-V3 checkpoint; every FP8
weight has block scales of the configured block size), and every violation is a `ValueError` naming the file or key.
e4m3 and e5m2 FP8 payloads are both dequantised exactly (`q · s`).
References: DeepSeek-V3 `inference/fp8_cast_bf16.py` (the FP8 -> bf16 direction); docs/design.md (FP8,
Checkpoint layout).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.utils import logging

from .checkpoint import (
    SAFE_INDEX_NAME,
    SCALE_SUFFIX,
    check_finite,
    check_scale_entries,
    memory_key_places,
    read_weight_map,
    safetensors_headers,
)
from .configuration import CONFIG_CLASSES
from .kernels import FP8_BLOCK, weight_dequant_ref, weight_quant_ref
from .model import DeepseekV3ForCausalLM

DIRECTIONS = ("fp8-to-bf16", "bf16-to-fp8")
OFFICIAL_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
FP8_PAYLOADS = ("F8_E4M3", "F8_E5M2")  # safetensors' names of the FP8 formats `fp8-to-bf16` dequantises
UNQUANTISED = ("BF16", "F16", "F32")  # the formats `bf16-to-fp8` quantises
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
logger = logging.get_logger(__name__)
# bf16 tensors of the decoder layers that the official release does not quantise (MTP modules included)
KEPT_IN_BF16 = ("mlp.gate.weight", "embed_tokens.weight", "shared_head.head.weight", "eh_proj.weight",
                "indexer.weights_proj.weight")


def is_fp8_projection(key: str, ndim: int) -> bool:
    """Whether the official release stores this tensor (of `ndim` dims) in FP8: a decoder layer's projection matrix."""
    return key.startswith("model.layers.") and ndim == 2 and not key.endswith(KEPT_IN_BF16)


def convert_checkpoint(src: str | Path, dst: str | Path, direction: str) -> Path:
    """Convert the checkpoint folder `src` into a new folder `dst` (`direction` in `DIRECTIONS`).

    Raises:
        ValueError: unknown direction; `src` not a consistent safetensors DeepSeek-V3 checkpoint in the expected
            format (see the module docstring); `dst` existing or impossible to create.
    """
    src, dst = Path(src), Path(dst)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint folder: it has no config.json")
    if dst.exists():
        raise ValueError(f"{dst} already exists; choose a new destination")
    config = _read_config(src / "config.json")
    quantization = config.get("quantization_config")
    if direction == "fp8-to-bf16":
        if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
            raise ValueError(f"{src}/config.json has no FP8 quantization_config; nothing to dequantise")
        block = tuple(quantization.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
        del config["quantization_config"]
    else:
        if quantization is not None:
            raise ValueError(f"{src}/config.json already has a quantization_config: {quantization}")
        block = (FP8_BLOCK, FP8_BLOCK)
        config["quantization_config"] = dict(OFFICIAL_QUANTIZATION)
    config["torch_dtype"] = "bfloat16"
    config.pop("dtype", None)

    weight_map = read_weight_map(src)
    headers = {}
    for shard in sorted(set(weight_map.values())):
        headers.update(safetensors_headers(src / shard))
    _check_tensors(src, weight_map, headers, direction, block)
    _check_shapes_against_config(src, config, weight_map, headers)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):
        logger.warning(f"{stale} is left from an interrupted conversion to {dst}; delete it to free its space")
    partial = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise ValueError(f"cannot create {dst}: {e.strerror or e}") from e
    try:
        new_map, total_bytes = {}, 0
        for shard in tqdm(sorted(set(weight_map.values())), desc=direction, unit="shard"):
            tensors = _convert_shard(src, shard, weight_map, direction, block)
            if not tensors:  # a shard that held only scales
                continue
            (partial / shard).parent.mkdir(parents=True, exist_ok=True)  # an index may keep shards in subfolders
            save_file(tensors, partial / shard, metadata={"format": "pt"})
            new_map.update(dict.fromkeys(tensors, shard))
            total_bytes += sum(t.nbytes for t in tensors.values())
            del tensors
        if (src / SAFE_INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(new_map.items()))}
            (partial / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_other_files(src, partial)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    config_class = CONFIG_CLASSES.get(config.get("model_type"))
    if config_class is None:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}; only checkpoints of the DeepSeek-V3 "
                         f"architecture (model_type one of {sorted(CONFIG_CLASSES)}) are converted")
    try:  # the rules the model applies when it loads the folder (quantization_config included)
        config_class(**config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
    return config


def _check_tensors(src: Path, weight_map: dict[str, str], headers: dict, direction: str,
                   block: tuple[int, int]) -> None:
    """Check every tensor's dtype and shape from the shard `headers` (`{key: (dtype, shape)}`), and the block scales'
    values (small), before anything is written. The other tensors' values are checked as each shard is converted."""
    check_scale_entries({key: dtype for key, (dtype, _) in headers.items()}, weight_map)
    if direction == "bf16-to-fp8":
        projections = [key for key, (_, shape) in headers.items() if is_fp8_projection(key, len(shape))]
        if not projections:
            raise ValueError(f"{src} holds no decoder projection (model.layers.N.*.weight) to quantise")
        for key in projections:
            if headers[key][0] not in UNQUANTISED:
                raise ValueError(f"{key} is stored as {headers[key][0]}; bf16-to-fp8 quantises {UNQUANTISED} weights")
        return
    for key, (dtype, shape) in headers.items():
        scale_key = key + SCALE_SUFFIX
        if dtype in FP8_PAYLOADS and scale_key not in headers:
            raise ValueError(f"{key} is FP8 ({dtype}) but the checkpoint has no {scale_key}")
        if scale_key not in headers:
            continue
        if dtype not in FP8_PAYLOADS:
            raise ValueError(f"{key} is stored as {dtype} next to its {scale_key}; a weight with block scales must be "
                             f"an FP8 payload ({' or '.join(FP8_PAYLOADS)})")
        expected = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
        if headers[scale_key][1] != expected:
            raise ValueError(
                f"{scale_key} has shape {list(headers[scale_key][1])}, but {key} {list(shape)} in the "
                f"weight_block_size {list(block)} of config.json needs {list(expected)}: the block size does not "
                "match the checkpoint"
            )
    scales_by_shard: dict[str, list[str]] = {}
    for key in headers:
        if key.endswith(SCALE_SUFFIX):
            scales_by_shard.setdefault(weight_map[key], []).append(key)
    for shard, keys in sorted(scales_by_shard.items()):  # each shard opened once
        with safe_open(src / shard, "pt") as f:
            for key in keys:
                check_finite(key, f.get_tensor(key), shard)


def _check_shapes_against_config(src: Path, config: dict, weight_map: dict[str, str], headers: dict) -> None:
    """Every stored tensor of the model has the shape `config.json`'s sizes give it (read from a model built on the
    meta device: no memory), so a folder whose config describes another model is refused before anything is written.
    Block scales are checked against their weights (`_check_tensors`); keys the model does not have are left to the
    loader, which refuses them.

    Raises:
        ValueError: naming the key, its file, the stored shape and the config's.
    """
    config_class = CONFIG_CLASSES[config["model_type"]]
    sizes = config_class(**{key: value for key, value in config.items() if key != "quantization_config"})
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(sizes)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    stored = {key: shape for key, (_, shape) in headers.items()}
    for key, place in memory_key_places(sizes, stored, model.has_mtp_modules).items():
        if place is None or place.shared_copy or place.key not in expected:
            continue
        shape = expected[place.key][1:] if place.expert is not None else expected[place.key]
        if stored[key] != shape:
            raise ValueError(f"{key} has shape {list(stored[key])} in {weight_map[key]}, but the sizes in "
                             f"{src}/config.json give it {list(shape)}: config.json does not describe these weights")


def _copy_other_files(src: Path, dst: Path) -> None:
    """Copy everything that is not weights (tokenizer, generation config, code, subfolders of them), leaving out hidden
    entries (`.git`, `.cache`, unfinished conversions)."""
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file() or _is_weight_file(path):
            continue
        if relative.as_posix() in (SAFE_INDEX_NAME, "config.json"):
            continue
        (dst / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / relative)


def _is_weight_file(path: Path) -> bool:
    """Weights in any format (safetensors shards, PyTorch .bin / .pt files and their index) are never copied."""
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".bin.index.json")


def _convert_shard(src: Path, shard: str, weight_map: dict, direction: str, block) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(src / shard, "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            check_finite(key, tensor, shard)
            if direction == "fp8-to-bf16":
                if key.endswith(SCALE_SUFFIX):
                    continue
                scale_key = key + SCALE_SUFFIX
                if scale_key in weight_map:  # an FP8 payload (checked in `_check_tensors`)
                    scale = _read(src, weight_map[scale_key], scale_key, f)
                    tensor = weight_dequant_ref(tensor, scale, torch.bfloat16, block=block)
                out[key] = tensor
            elif is_fp8_projection(key, tensor.dim()):
                out[key], out[key + SCALE_SUFFIX] = weight_quant_ref(tensor, block=block)
            else:
                out[key] = tensor
    return out


def _read(src: Path, shard: str, key: str, open_file) -> torch.Tensor:
    """A tensor from the open shard, or from another shard (a scale stored apart from its weight)."""
    if key in open_file.keys():
        return open_file.get_tensor(key)
    with safe_open(src / shard, "pt") as other:
        return other.get_tensor(key)

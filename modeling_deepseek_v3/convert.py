"""Checkpoint conversion between the official FP8 format and bf16, one safetensors shard at a time.

`fp8-to-bf16` multiplies every FP8 weight by its `weight_scale_inv` blocks and drops `quantization_config`;
`bf16-to-fp8` quantises the projections the official release stores in FP8 (128×128 blocks) and writes the official
`quantization_config`. Peak memory is about one shard (in and out), not the model. A checkpoint quantised from bf16
weights survives fp8 -> bf16 -> fp8 bit for bit; one quantised from fp32 master weights keeps its payloads, while
its scales move by at most one bf16 step (2^-8 relative), since the bf16 weights cannot carry them exactly.
The result is written to a temporary folder beside the destination and renamed only when complete, so an
interrupted run leaves no half-written checkpoint.
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

from .kernels import FP8_BLOCK, weight_dequant_ref, weight_quant_ref

DIRECTIONS = ("fp8-to-bf16", "bf16-to-fp8")
OFFICIAL_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
logger = logging.get_logger(__name__)
# bf16 tensors of the decoder layers that the official release does not quantise (MTP modules included)
KEPT_IN_BF16 = ("mlp.gate.weight", "embed_tokens.weight", "shared_head.head.weight", "eh_proj.weight")


def is_fp8_projection(key: str, tensor: torch.Tensor) -> bool:
    """Whether the official release stores this tensor in FP8: a decoder layer's projection matrix."""
    return key.startswith("model.layers.") and tensor.dim() == 2 and not key.endswith(KEPT_IN_BF16)


def convert_checkpoint(src: str | Path, dst: str | Path, direction: str) -> Path:
    """Convert the checkpoint folder `src` into a new folder `dst` (`direction` in `DIRECTIONS`).

    Raises:
        ValueError: unknown direction, `src` not a safetensors checkpoint of the expected format, `dst` existing.
    """
    src, dst = Path(src), Path(dst)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint folder: it has no config.json")
    if dst.exists():
        raise ValueError(f"{dst} already exists; choose a new destination")
    config = json.loads((src / "config.json").read_text())
    quantization = config.get("quantization_config")
    if direction == "fp8-to-bf16":
        if not quantization or quantization.get("quant_method") != "fp8":
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

    weight_map = _weight_map(src)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):
        logger.warning(f"{stale} is left from an interrupted conversion to {dst}; delete it to free its space")
    partial = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        new_map, total_bytes = {}, 0
        for shard in tqdm(sorted(set(weight_map.values())), desc=direction, unit="shard"):
            tensors = _convert_shard(src, shard, weight_map, direction, block)
            if not tensors:  # a shard that held only scales
                continue
            save_file(tensors, partial / shard, metadata={"format": "pt"})
            new_map.update(dict.fromkeys(tensors, shard))
            total_bytes += sum(t.nbytes for t in tensors.values())
            del tensors
        if (src / INDEX).is_file():
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(new_map.items()))}
            (partial / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in src.iterdir():  # tokenizer, generation config, code, ...: everything that is not weights
            if path.is_file() and not _is_weight_file(path) and path.name not in (INDEX, "config.json"):
                shutil.copy2(path, partial / path.name)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _is_weight_file(path: Path) -> bool:
    """Weights in any format (safetensors shards, PyTorch .bin / .pt files and their index) are never copied."""
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".bin.index.json")


def _weight_map(src: Path) -> dict[str, str]:
    if (src / INDEX).is_file():
        return json.loads((src / INDEX).read_text())["weight_map"]
    if (src / "model.safetensors").is_file():
        with safe_open(src / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    raise ValueError(f"{src} has neither {INDEX} nor model.safetensors")


def _convert_shard(src: Path, shard: str, weight_map: dict, direction: str, block) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(src / shard, "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if direction == "fp8-to-bf16":
                if key.endswith("_scale_inv"):
                    continue
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_key = f"{key}_scale_inv"
                    if scale_key not in weight_map:
                        raise ValueError(f"{key} is FP8 but the checkpoint has no {scale_key}")
                    scale = _read(src, weight_map[scale_key], scale_key, f)
                    tensor = weight_dequant_ref(tensor, scale, torch.bfloat16, block=block)
                out[key] = tensor
            elif is_fp8_projection(key, tensor):
                out[key], out[f"{key}_scale_inv"] = weight_quant_ref(tensor, block=block)
            else:
                out[key] = tensor
    return out


def _read(src: Path, shard: str, key: str, open_file) -> torch.Tensor:
    """A tensor from the open shard, or from another shard (a scale stored apart from its weight)."""
    if key in open_file.keys():
        return open_file.get_tensor(key)
    with safe_open(src / shard, "pt") as other:
        return other.get_tensor(key)

"""Bytes per GPU of DeepSeek-V3 671B under transformers' distributed engine, computed from the config and the
model's declared parallel plans (no GPU needed; nothing here is measured).

The model is built on the meta device (every parameter's shape, MTP module included); each parameter is divided
as its plan rule says: a tensor-parallel rule splits it over `tp_size`, an expert-parallel one over `ep_size`
(experts), FSDP over `fsdp_size` (dense) or `fsdp_size * tp_size / ep_size` (experts); unruled tensors are
replicated. Inference weights are counted for the official FP8 checkpoint (e4m3 payloads, fp32 128×128 block
scales, bf16 embeddings, head, norms, routers and `eh_proj`) and for bf16. Training counts fp32 parameters, fp32
gradients and AdamW's two fp32 moments (16 bytes per parameter, FSDP2 mixed precision), without activations or the
bf16 copy of the layer being computed. The latent KV cache (`kv_lora_rank + qk_rope_head_dim` bf16 values per token
and layer) is shared by all heads, so tensor parallelism does not split it: every GPU of a tensor-parallel group
holds the cache of every sequence it serves.

    python benchmarks/parallel_memory.py          # prints a markdown table
"""

from __future__ import annotations

import argparse

import torch
from transformers.distributed import DistributedConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, load_preset
from modeling_deepseek_v3.parallel import plan_style

GiB = 2**30
SPLITTING_STYLES = ("colwise", "rowwise", "embedding_rowwise", "embedding_colwise", "packed_colwise", "packed_rowwise",
                    "rowwise_split_input", "colwise_gather_output", "grouped_gemm")
INFERENCE = (  # (layout, GPUs, DistributedConfig sizes)
    ("tp8", "1 node × 8", dict(tp_size=8)),
    ("ep8 (experts by expert, the rest FSDP)", "1 node × 8", dict(fsdp_size=8, ep_size=8)),
    ("tp8 + ep8", "1 node × 8", dict(tp_size=8, ep_size=8)),
    ("ep16 over 2 nodes (tp8 in a node)", "2 nodes × 8", dict(tp_size=8, fsdp_size=2, ep_size=16)),
    ("ep16 over 2 nodes (the rest FSDP)", "2 nodes × 8", dict(fsdp_size=16, ep_size=16)),
)
TRAINING = (
    ("fsdp64 + ep64", "8 nodes × 8", dict(fsdp_size=64, ep_size=64)),
    ("fsdp128 + ep64", "16 nodes × 8", dict(fsdp_size=128, ep_size=64)),
    ("fsdp256 + ep64", "32 nodes × 8", dict(fsdp_size=256, ep_size=64)),
)


def shares(model: DeepseekV3ForCausalLM, sizes: dict) -> dict[str, int]:
    """Into how many parts each parameter is split under the layout `sizes` (DistributedConfig's fields)."""
    layout = DistributedConfig(**sizes)
    efsdp = layout.dp_size * layout.tp_size // layout.ep_size
    parts = {}
    for name, _ in model.named_parameters():
        if layout.ep_size > 1 and plan_style(model.ep_plan, name, parameter=True) in SPLITTING_STYLES:
            parts[name] = layout.ep_size * efsdp  # experts: whole ones per expert-parallel rank, FSDP over copies
            continue
        tp = layout.tp_size if plan_style(model.tp_plan, name, parameter=True) in SPLITTING_STYLES else 1
        parts[name] = tp * layout.dp_size
    return parts


def element_bytes(name: str, tensor: torch.Tensor, fp8: bool) -> int:
    if not fp8:
        return 2
    return 1 if tensor.dtype == torch.float8_e4m3fn else 4 if name.endswith("scale_inv") else 2


def per_gpu(model: DeepseekV3ForCausalLM, parts: dict[str, int], bytes_of) -> float:
    return sum(p.numel() * bytes_of(name, p) / parts[name] for name, p in model.named_parameters()) / GiB


def main() -> None:
    # no options: the parser gives `--help` (this docstring) and refuses unknown arguments
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    config = load_preset("deepseek-v3-671b")
    with torch.device("meta"):
        fp8 = DeepseekV3ForCausalLM(config)
        bf16 = DeepseekV3ForCausalLM(load_preset("deepseek-v3-671b", quantization_config=None))
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2 * 1000 / GiB
    expanded = (layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 2 * 1000 / GiB)
    total = sum(p.numel() for p in bf16.parameters())
    print(f"DeepSeek-V3 671B: {total / 1e9:.1f} B parameters with the MTP module; GiB per GPU, computed.\n")
    print("| inference layout | GPUs | `DistributedConfig` | weights FP8 | weights bf16 | latent cache per 1k tokens |")
    print("|---|---|---|---|---|---|")
    for name, gpus, sizes in INFERENCE:
        weights = [per_gpu(m, shares(m, sizes), lambda n, p, f=f: element_bytes(n, p, f))
                   for m, f in ((fp8, True), (bf16, False))]
        arguments = ", ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"| {name} | {gpus} | `{arguments}` | {weights[0]:.1f} | {weights[1]:.1f} | {latent:.3f} |")
    print(f"\nThe latent cache is {layers} layers × {config.kv_lora_rank + config.qk_rope_head_dim} bf16 values per "
          f"token; per-head keys and values would take {expanded:.2f} GiB per 1k tokens "
          f"({expanded / 8:.2f} GiB per GPU split over 8 tensor-parallel ranks).\n")
    print("| training layout | GPUs | `DistributedConfig` | fp32 weights | fp32 gradients | AdamW moments | total |")
    print("|---|---|---|---|---|---|---|")
    for name, gpus, sizes in TRAINING:
        weights = per_gpu(bf16, shares(bf16, sizes), lambda n, p: 4)
        arguments = ", ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"| {name} | {gpus} | `{arguments}` | {weights:.1f} | {weights:.1f} | {2 * weights:.1f} | "
              f"{4 * weights:.1f} |")


if __name__ == "__main__":
    main()

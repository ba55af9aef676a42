"""Training recipes of DeepSeek-V3 on top of the model: FP8 training of the decoder layers.

References: DeepSeek-V3 report §3.3 (FP8 mixed-precision training); docs/fp8.md.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from .fp8 import FP8Training, FP8TrainingLinear
from .model import DeepseekV3PreTrainedModel
from .moe import RoutedExperts


def enable_fp8_training(model: DeepseekV3PreTrainedModel, scale_fmt: str | None = None) -> DeepseekV3PreTrainedModel:
    """Train every linear of the decoder layers in FP8: attention and MLP projections become `FP8TrainingLinear` and
    the routed experts run the FP8 grouped recipe, over the same parameters (optimizers and checkpoints see no
    change). Embeddings, the output head, norms and the router stay in full precision, as in the report.

    `scale_fmt` scales every tile by `amax / 448` (None, the DeepSeek-V3 report) or by that rounded up to a power of
    two (`"ue8m0"`, as DeepSeek-V3.1 was trained: give it to continue training a V3.1 checkpoint converted to bf16,
    whose conversion dropped `quantization_config`).

    Call it on a bf16/fp32 model before creating the optimizer; it returns the same model.

    Raises:
        ValueError: if `scale_fmt` is neither None nor "ue8m0"; if the model holds FP8 weights
            (`quantization_config`): train from bf16 master weights instead; or if it is sharded by transformers'
            distributed engine (`distributed_config`), whose sharding lives on the very linears this replaces.
    """
    recipe = FP8Training(scale_fmt)
    if model.config.fp8_quantization_config is not None:
        raise ValueError("enable_fp8_training needs bf16/fp32 master weights, but this model stores FP8 weights "
                         "(quantization_config); convert it with `deepseek-v3 convert fp8-to-bf16` first")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("enable_fp8_training does not support a model sharded by transformers' distributed engine "
                         "(loaded with a distributed_config): the sharded linears would be replaced; train it in "
                         "bf16, or in FP8 on one process or under DDP")
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for layer in base.layers:
        for module in list(layer.modules()):
            for name, child in module.named_children():
                if type(child) is nn.Linear:
                    setattr(module, name, _fp8_training_linear(child, recipe))
                elif type(child) is RoutedExperts:
                    child.train_in_fp8(recipe)
    return model


def _fp8_training_linear(linear: nn.Linear, recipe: FP8Training) -> FP8TrainingLinear:
    fp8 = FP8TrainingLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    fp8.weight, fp8.bias, fp8.recipe = linear.weight, linear.bias, recipe  # share the parameters
    return fp8

"""DeepSeek-V3 for Hugging Face Transformers: MLA with a latent KV cache and absorbed decoding, DeepSeekMoE,
Multi-Token Prediction (training objective and self-speculative decoding, `generate(use_mtp=True)`), continuous
batching over a paged latent cache (`generate_batch`).

Importing this package registers its classes with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSequenceClassification` and `AutoModelForTokenClassification` for `model_type = "deepseek_v3"`, replacing
transformers' built-in DeepSeek-V3 classes for the whole process, for `"kimi_k2"` (Kimi-K2's checkpoints, the same
architecture), and for `"deepseek_v32"` (DeepSeek-V3.2: DeepSeek-V3 with sparse attention, docs/v32.md). The
built-in classes stay reachable by importing them explicitly from `transformers`. It also exempts its classes from
PEFT's rewrite of LoRA targets for this model_type (meant for the built-in class's fused experts), so LoRA adapts the
modules a config names.

Tools that pick the class named in a checkpoint's config on the `transformers` module itself (`transformers serve`,
TRL given a path) still get the built-in class, unless `apply_to_transformers()` is called, or the package is imported
with `DEEPSEEK_V3_PATCH_TRANSFORMERS=1` set (`restore_transformers()` undoes it; docs/serving.md).
"""

import importlib

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .cache import IndexedLatentCacheLayer, LatentCacheLayer, MLACache, MLAStaticCache
from .configuration import (
    CONFIG_CLASSES,
    PRESET_NAMES,
    DeepseekV3Config,
    DeepseekV32Config,
    KimiK2Config,
    load_preset,
)
from .heads import DeepseekV3ForSequenceClassification, DeepseekV3ForTokenClassification
from .metrics import TrainingMetrics
from .model import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3PreTrainedModel
from .outputs import DeepseekV3CausalLMOutput
from .paged_cache import PagedLatentCache
from .private_api import keep_peft_targets_of, register_auto_model
from .speculation import SpeculativeStats
from .transformers_patch import apply_from_environment, apply_to_transformers, restore_transformers

AUTO_CLASSES = {
    AutoModel: DeepseekV3Model,
    AutoModelForCausalLM: DeepseekV3ForCausalLM,
    AutoModelForSequenceClassification: DeepseekV3ForSequenceClassification,
    AutoModelForTokenClassification: DeepseekV3ForTokenClassification,
}
for _model_type, _config_class in CONFIG_CLASSES.items():
    AutoConfig.register(_model_type, _config_class, exist_ok=True)
    for _auto_class, _model_class in AUTO_CLASSES.items():
        register_auto_model(_auto_class, _config_class, _model_class)
# PEFT would rewrite LoRA targets ending in gate_proj / up_proj / down_proj into the built-in class's fused experts
keep_peft_targets_of(DeepseekV3PreTrainedModel)
apply_from_environment()

__all__ = [
    "PRESET_NAMES",
    "DeepseekV3CausalLMOutput",
    "DeepseekV3Config",
    "DeepseekV32Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3ForSequenceClassification",
    "DeepseekV3ForTokenClassification",
    "DeepseekV3PreTrainedModel",
    "DeepseekV3SFTTrainer",
    "DeepseekV3Trainer",
    "DeepseekV3TrainerMixin",
    "ExpertBalanceCallback",
    "KimiK2Config",
    "IndexedLatentCacheLayer",
    "LatentCacheLayer",
    "MLACache",
    "MLAStaticCache",
    "PagedLatentCache",
    "SpeculativeStats",
    "TrainingMetrics",
    "apply_to_transformers",
    "load_preset",
    "restore_transformers",
]


# imported on first use: the trainers need transformers' Trainer, whose import (datasets, pandas) costs every process
# that only runs the model half a second; DeepseekV3SFTTrainer also needs TRL, an optional dependency
LAZY_MODULES = {
    "DeepseekV3Trainer": ".trainer",
    "DeepseekV3TrainerMixin": ".trainer",
    "ExpertBalanceCallback": ".trainer",
    "DeepseekV3SFTTrainer": ".sft_trainer",
}


def __getattr__(name: str):
    if name in LAZY_MODULES:
        return getattr(importlib.import_module(LAZY_MODULES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

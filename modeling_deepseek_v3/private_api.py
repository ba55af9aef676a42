"""Every private API of transformers, PEFT, accelerate and torch that this package touches, named in one place.

Private names can move in any release. Each contact is a function or a table entry here, and
`tests/test_private_api.py` checks all of them against the installed libraries, so an upgrade that moves one fails
one test with the name in it instead of breaking a code path silently. Our classes also override a few private
hooks of transformers and torch (listed by `overridden_hooks()`); the overrides live with the classes that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
import types

import peft.utils.transformers_weight_conversion as peft_weight_conversion
import torch
from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from torch import nn
from transformers import (
    CompileConfig,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.distributed import DistributedMixin

# the pipeline parallelism of transformers' distributed engine: the placeholder it puts where a stage holds no
# module, and the stage's communication (point-to-point, logits broadcast from the last stage)
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer, PipelineStage  # noqa: F401
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler
from transformers.generation.continuous_batching.cache_allocators import CacheAllocator
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor
from transformers.generation.continuous_batching.scheduler import Scheduler


def overridden_hooks() -> tuple[tuple[type, str, tuple[str, ...]], ...]:
    """(owner, name, parameter names) of the private hooks our classes override; the test checks each signature. A
    function rather than a table: importing `Trainer` pulls in `datasets` and pandas, which only training needs."""
    from transformers import Trainer

    return (
        # the loader of from_pretrained: our checkpoint conversions go in, the MTP copies are checked after
        (PreTrainedModel, "_load_pretrained_model", ("model", "state_dict", "checkpoint_files", "load_config",
                                                     "expected_keys")),
        # the end of from_pretrained: missing / unexpected keys of the decoder become errors instead of warnings
        (PreTrainedModel, "_finalize_model_loading", ("model", "load_config", "loading_info")),
        # the check of the experts implementation at construction: our routed experts have one (grouped GEMM)
        (PreTrainedModel, "get_correct_experts_implementation", ("self", "requested_experts")),
        # generate()'s default cache becomes the latent MLACache
        (GenerationMixin, "_prepare_cache_for_generation", ("self", "generation_config", "model_kwargs",
                                                            "generation_mode", "batch_size", "max_cache_length")),
        # model.to(dtype) keeps FP8 payloads, their scales and the routing bias in their dtypes
        (nn.Module, "_apply", ("self", "fn", "recurse")),
        # the distributed engine: the MTP modules' plans, the layout checks and pipeline stages around the plans'
        # application, the MTP copies and every pipeline stage in a sharded save, and its wait for the writing rank
        (DistributedMixin, "init_parallel_plans", ("self",)),
        (DistributedMixin, "maybe_distribute_model", ("cls", "model", "distributed_config", "mesh_manager")),
        (DistributedMixin, "gather_sharded_state_dict_for_save", ("self", "model_to_save", "state_dict",
                                                                 "distributed_config", "save_on_this_rank")),
        (DistributedMixin, "barrier_after_gathered_checkpoint_save", ("self", "distributed_config")),
        # Trainer's report on the checkpoint it resumed from (or its best one): DeepseekV3Trainer refuses an
        # incomplete one
        (Trainer, "_issue_warnings_after_load", ("self", "load_result")),
        # continuous batching with MTP drafting: the step drafts before its forward and verifies after it
        # (`speculative_batching.py`), and the schedulers keep a decoding request whole (`continuous_batching.py`)
        (ContinuousBatchProcessor, "_generation_step", ("self", "model")),
        (Scheduler, "_schedule_request", ("self", "state", "request_tokens", "token_budget",
                                          "request_ids_to_remove_from_waiting")),
    )


# private attributes transformers reads from our classes or instances
IGNORED_UNEXPECTED_KEYS = "_keys_to_ignore_on_load_unexpected"  # regexes of checkpoint keys loading may skip
KEPT_IN_FP32 = "_keep_in_fp32_modules_strict"  # name parts of tensors from_pretrained loads in fp32 whatever its dtype
# private class attributes our classes set and transformers reads: the head's parallel plans (`parallel.py`), that
# a static-cache decode step compiles as one graph, and which module outputs are the router logits (`model.py`)
DECLARED_CLASS_ATTRIBUTES = ("_tp_plan", "_pp_plan", "_fsdp_plan", "_can_compile_fullgraph", "_can_record_outputs")


def compile_on_all_devices(config: CompileConfig) -> CompileConfig:
    """Have `generate()` compile static-cache decoding with `config` on any device: transformers does so by itself on
    accelerators only (its flag `_compile_all_devices`, used by its own tests)."""
    config._compile_all_devices = True
    return config


def ignore_unexpected_keys(model: PreTrainedModel, patterns: list[str]) -> None:
    """Let `from_pretrained` skip checkpoint keys matching `patterns` (regexes) without reporting them. Call before
    `post_init`."""
    current = getattr(model, IGNORED_UNEXPECTED_KEYS, None) or []
    setattr(model, IGNORED_UNEXPECTED_KEYS, list(current) + list(patterns))


def keep_in_fp32(model: PreTrainedModel, names: list[str]) -> None:
    """Let `from_pretrained` load the tensors whose names contain one of `names` in fp32, whatever `dtype` it is given
    (transformers matches them against the key of each tensor it loads). Call before transformers' `post_init`."""
    current = getattr(model, KEPT_IN_FP32, None) or []
    setattr(model, KEPT_IN_FP32, sorted(set(current) | set(names)))


def load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys, extra_conversions: list):
    """transformers' own loader, with `extra_conversions` (WeightConverter / WeightRenaming) added to the checkpoint
    key mapping of this call. transformers keys its conversion registry by class name and model_type, which the
    built-in DeepSeek-V3 class shares with ours, so ours are handed to the loader instead."""
    mapping = list(load_config.weight_mapping or []) + extra_conversions
    load_config = dataclasses.replace(load_config, weight_mapping=mapping)
    return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)


def loaded_name_or_path(load_config) -> str | None:
    """The folder (or hub repository id) `from_pretrained` was given, as its loader's settings carry it."""
    name = load_config.pretrained_model_name_or_path
    return None if name is None else str(name)


def finalize_model_loading(model, load_config, loading_info):
    """transformers' own end of `from_pretrained` (device moves, init of missing weights, tying, the load report)."""
    return PreTrainedModel._finalize_model_loading(model, load_config, loading_info)


def weight_conversions(model: PreTrainedModel) -> list:
    """The conversions `save_pretrained` reverses to write the checkpoint's own key layout."""
    return list(getattr(model, "_weight_conversions", None) or [])


def set_weight_conversions(model: PreTrainedModel, conversions: list) -> None:
    model._weight_conversions = list(conversions)


def prepare_cache_for_generation(model, generation_config, model_kwargs, generation_mode, batch_size,
                                 max_cache_length) -> None:
    """transformers' own choice of the cache `generate()` uses."""
    GenerationMixin._prepare_cache_for_generation(
        model, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    )


def eos_and_pad_tensors(generation_config: GenerationConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The EOS ids and the pad id as tensors on the model's device, as `generate()` prepared them for this call."""
    return generation_config._eos_token_tensor, generation_config._pad_token_tensor


def prepare_generation_config(model, generation_config: GenerationConfig | None,
                              kwargs: dict) -> tuple[GenerationConfig, dict]:  # fmt: skip
    """What `generate()` runs with: a copy of `generation_config` (or a blank one) completed with the model's
    generation config and the global defaults, then updated with the generation-config fields among `kwargs`; and the
    keywords of `kwargs` that are not such fields."""
    return GenerationMixin._prepare_generation_config(model, generation_config, **kwargs)


def generation_defaults() -> dict:
    """The values `generate()` gives the generation-config fields that neither the call nor the model sets."""
    return GenerationConfig._get_default_generation_params()


def attention_implementation(config: PreTrainedConfig) -> str:
    """The attention implementation transformers resolved for this model ("sdpa", "eager", ...)."""
    return config._attn_implementation


def register_auto_model(auto_class: type, config_class: type, model_class: type) -> None:
    """Map `config_class` to `model_class` in an Auto class (`AutoModelForCausalLM`, ...). The public `register`
    requires the model's `config_class` to bear the config's class name; our model classes serve the configs of
    several model_types (`deepseek_v3`, `kimi_k2`), so the mapping it fills (`_model_mapping`) is filled directly."""
    auto_class._model_mapping.register(config_class, model_class, exist_ok=True)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether anything wraps `module`'s forward: torch forward (pre-)hooks or an accelerate offload hook."""
    # accelerate sets `_hf_hook` as a plain instance attribute; a `hasattr` that misses raises inside
    # nn.Module.__getattr__, which costs more than the rest of this check (it runs for every absorbed attention call)
    return bool(module._forward_hooks or module._forward_pre_hooks) or "_hf_hook" in module.__dict__


def is_peft_adapter_model(model: PreTrainedModel) -> bool:
    """Whether transformers' PEFT integration loaded an adapter into `model` (its state dict is then the adapter's)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def register_lora_module(config: LoraConfig, mapping: dict[type, type]) -> None:
    """Tell PEFT which LoRA layer wraps a module type it does not know (PEFT's experimental custom-module API)."""
    config._register_custom_module(mapping)


# the function PEFT calls (through its module, at every adapter injection) to rewrite the LoRA targets of a model
# whose model_type transformers converts to fused experts
PEFT_TARGET_CONVERSION = "convert_peft_config_for_transformers"


def keep_peft_targets_of(model_class: type) -> None:
    """Have PEFT leave the LoRA targets of `model_class` (and its subclasses) as written. PEFT rewrites the targets of
    every model whose model_type transformers converts to fused experts, for transformers 4 adapters: for
    "deepseek_v3" targets ending in gate_proj / up_proj / down_proj become target parameters named after the built-in
    class's fused experts (gate_up_proj, down_proj), and our routed experts' stacked down_proj bears that name. It
    keys that rewrite by model_type, which our classes share with the built-in one, so ours are exempted here; other
    classes keep PEFT's rewrite. Idempotent."""
    convert = getattr(peft_weight_conversion, PEFT_TARGET_CONVERSION)
    original = getattr(convert, "__wrapped__", convert)

    @functools.wraps(original)
    def convert_unless_ours(peft_config, model, conversions):
        if isinstance(model, model_class):
            return None
        return original(peft_config, model=model, conversions=conversions)

    setattr(peft_weight_conversion, PEFT_TARGET_CONVERSION, convert_unless_ours)


def peft_adapter_prefixes() -> tuple[str, ...]:
    """The name prefixes of PEFT's adapter tensors ("lora_", "ia3_", ...): a state-dict key with a part starting with
    one of them is an adapter's."""
    return tuple(sorted(set(PEFT_TYPE_TO_PREFIX_MAPPING.values())))


# ---- the names transformers exports its DeepSeek-V3 classes under ---------------------------------------------------


def deepseek_v3_export_modules() -> list[types.ModuleType]:
    """The module objects through which transformers exports its DeepSeek-V3 classes by name: `transformers` and the
    model's package `transformers.models.deepseek_v3`, which the Auto classes also resolve names through.

    They are lazy modules (`_LazyModule`): a name is imported on its first lookup and kept as an attribute of the
    module, so an attribute set there shadows the export, and deleting it brings the export back. The top-level module
    can be two objects: the first import of `transformers.processing_utils` runs the package's `__init__` again
    (`direct_transformers_import`), which puts a new module object in `sys.modules`, while code that imported
    transformers before holds the first; every live one is returned (found among the garbage collector's objects)."""
    import transformers.models.deepseek_v3 as deepseek_v3
    import transformers.processing_utils  # noqa: F401  (the new top-level module object, if not made yet)

    current = sys.modules["transformers"]
    earlier = [obj for obj in gc.get_objects() if issubclass(type(obj), types.ModuleType) and obj is not current
               and vars(obj).get("__name__") == "transformers"]  # fmt: skip
    return [current, *earlier, deepseek_v3]


# ---- continuous batching (transformers' generation/continuous_batching) ---------------------------------------------

# the names `ContinuousBatchingManager._create_batch_processor` reads from its module for the cache, the schedulers and
# the batch processor
MANAGER_CACHE_NAME, MANAGER_SCHEDULERS_NAME = "PagedAttentionCache", "SCHEDULER_MAPPING"
MANAGER_PROCESSOR_NAME = "ContinuousBatchProcessor"


def scheduler_classes() -> dict[str, type]:
    """transformers' schedulers by the `scheduler_type` names of `ContinuousBatchingConfig`."""
    return dict(ContinuousBatchingManager._create_batch_processor.__globals__[MANAGER_SCHEDULERS_NAME])


def batch_processor_with(manager: ContinuousBatchingManager, cache_class: type, scheduler_classes: dict[str, type],
                         processor_class: type | None = None):  # fmt: skip
    """transformers' `ContinuousBatchingManager._create_batch_processor` for `manager`, run with `cache_class` where it
    names its paged cache class, `scheduler_classes` where it names its scheduler table and `processor_class` (a
    subclass of its `ContinuousBatchProcessor`, if given) where it names its batch processor: the manager offers no
    hook for any, and this reuses its own code rather than a copy. The rebinding holds for this call only:
    transformers' module is untouched."""
    create = ContinuousBatchingManager._create_batch_processor
    rebound = {MANAGER_CACHE_NAME: cache_class, MANAGER_SCHEDULERS_NAME: scheduler_classes}
    if processor_class is not None:
        rebound[MANAGER_PROCESSOR_NAME] = processor_class
    names = dict(create.__globals__, **rebound)
    return types.FunctionType(create.__code__, names, create.__name__, create.__defaults__, create.__closure__)(manager)


def discard_unstarted_manager(manager: ContinuousBatchingManager) -> None:
    """Undoes what building a manager did, for one never started: its batch processor, and the attention
    implementation transformers switched the model to (kept in its private `_original_attn_impl`; `stop` restores it
    only for a started manager)."""
    manager.batch_processor = None
    if manager._original_attn_impl is not None:
        manager.model.set_attn_implementation(manager._original_attn_impl)
        manager._original_attn_impl = None
    manager.destroy()


def default_max_batch_tokens() -> int:
    """The tokens per batching step transformers plans for when `ContinuousBatchingConfig.max_batch_tokens` is unset."""
    return PagedAttentionMemoryHandler._default_max_batch_tokens


def init_cache_allocator(allocator: CacheAllocator, index: int, layer_indices: list[int], tokens_per_page: int,
                         bytes_per_page: int, allow_block_sharing: bool) -> None:  # fmt: skip
    """The first half of transformers' `CacheAllocator` initialisation, which its subclasses call in `__init__`."""
    allocator._before_cache_tensor_init(
        index=index, layer_indices=layer_indices, tokens_per_page=tokens_per_page, bytes_per_page=bytes_per_page,
        allow_block_sharing=allow_block_sharing,
    )  # fmt: skip


def register_allocator_tensor(allocator: CacheAllocator, cache_tensor: torch.Tensor, view: torch.Tensor,
                              non_trash_bytes: int, bytes_per_sector: int, pool) -> None:  # fmt: skip
    """The second half, in `register_cache_tensor`: `view` is the allocator's typed view of the byte pool
    `cache_tensor`; the allocator also keeps the pool as whole blocks, which `copy_blocks` copies when requests fork."""
    allocator._copy_view = cache_tensor.view(-1, allocator.bytes_per_block)
    allocator._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, view, pool)


# ---- the distributed engine (transformers' distributed/) -----------------------------------------------------------


def run_on_local_shards_under_tensor_parallelism(module: nn.Module) -> None:
    """Have transformers' column- and row-wise styles run `module` (a quantized linear) on its local weight shards
    instead of DTensors, as they do for transformers' own quantized layers."""
    module._hf_quantized_needs_local_tp = True


def remove_pipeline_forward_wrapper(model: nn.Module) -> None:
    """Drop the wrapper `apply_pipeline_parallelism` sets as `model.forward`, so the class's forward runs again."""
    vars(model).pop("forward", None)


def swap_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set `module`'s parameters `tensors` (names to tensors) as they are, plain tensors included, which `setattr`
    refuses for a registered parameter."""
    module._parameters.update(tensors)


def continuous_batch_processor_class() -> type:
    """transformers' `ContinuousBatchProcessor`, the class a batch processor built by `batch_processor_with` must
    derive from."""
    return ContinuousBatchProcessor


def free_blocks_beyond(cache, request_id: str, length: int) -> None:
    """Gives back to the pool the blocks of `request_id` past those its first `length` cached tokens occupy (the
    blocks reserved for rejected drafts), through each allocator's block table and ledger as `free_blocks` does for a
    whole request (transformers frees only whole requests)."""
    for allocator in cache.cache_allocators.values():
        table = allocator.block_table.get(request_id, [])
        keep = -(-length // allocator.tokens_per_page)
        released = [block for block in table[keep:] if allocator.ledger.release(block, True)]
        del table[keep:]
        allocator.pool.free_blocks(allocator.index, released)

"""The private APIs of transformers, PEFT, accelerate and torch that the package touches still exist with the shape
it relies on; an upgrade that moves one fails here, naming it."""

import inspect
import unittest.mock

import pytest
import torch
from peft import LoraConfig
from transformers import GenerationConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, checkpoint, private_api

from .utils import random_model


@pytest.mark.parametrize("owner, name, parameters", private_api.overridden_hooks(),
                         ids=[f"{o.__name__}.{n}" for o, n, _ in private_api.overridden_hooks()])
def test_overridden_hooks_keep_their_signature(owner, name, parameters):
    hook = inspect.getattr_static(owner, name)
    function = hook.__func__ if isinstance(hook, (staticmethod, classmethod)) else hook
    assert tuple(inspect.signature(function).parameters) == parameters


def test_loader_hooks_are_called_by_from_pretrained(tmp_path):
    """Our overrides of the loader hooks run (a checkpoint with an unexpected key is refused by ours, not warned
    about by transformers')."""
    model = random_model()
    model.save_pretrained(tmp_path)
    assert private_api.weight_conversions(model)  # the experts' conversions, reversed by save_pretrained
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.surprise.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected keys"):
        type(model).from_pretrained(tmp_path)
    # the loader's settings name the folder it loads from (the files of an index must lie inside it)
    seen = []

    def record(load_config):
        seen.append(private_api.loaded_name_or_path(load_config))
        return seen[-1]

    with unittest.mock.patch.object(checkpoint, "loaded_name_or_path", record), pytest.raises(ValueError):
        type(model).from_pretrained(tmp_path)
    assert seen == [str(tmp_path)]


def test_generation_defaults_are_what_generate_fills_in():
    defaults = private_api.generation_defaults()
    assert defaults["num_assistant_tokens"] == 20 and defaults["max_length"] == 20
    seen = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        seen["value"] = generation_config.num_assistant_tokens
        return input_ids

    random_model().generate(torch.tensor([[5, 6, 7]]), max_new_tokens=1, custom_generate=capture)
    assert seen["value"] == defaults["num_assistant_tokens"]


def test_prepare_generation_config_completes_a_config_as_generate_does():
    """The given config's fields stay, the keywords' apply over them, unset fields come from the model's generation
    config and then the defaults; keywords that are not fields come back, and the given config is not changed."""
    model = random_model()
    model.generation_config.top_p = 0.5
    given = GenerationConfig(max_new_tokens=2, top_k=7)
    config, others = private_api.prepare_generation_config(model, given, {"top_k": 3, "attention_mask": 1})
    assert (config.max_new_tokens, config.top_k, config.top_p, config.num_beams) == (2, 3, 0.5, 1)
    assert others == {"attention_mask": 1} and given.top_k == 7 and config is not given


def test_default_max_batch_tokens_is_what_an_unsized_batching_config_gets():
    from transformers import ContinuousBatchingConfig

    manager = random_model().init_continuous_batching(
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=4, page_size=16)
    )
    assert manager.batch_processor.cache.max_batch_tokens == private_api.default_max_batch_tokens()
    private_api.discard_unstarted_manager(manager)


def test_generate_prepares_eos_and_pad_tensors():
    seen = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        seen["tensors"] = private_api.eos_and_pad_tensors(generation_config)
        return input_ids

    model = random_model()
    config = GenerationConfig(eos_token_id=2, pad_token_id=0, max_new_tokens=1)
    model.generate(torch.tensor([[5, 6, 7]]), generation_config=config, custom_generate=capture)
    eos, pad = seen["tensors"]
    assert eos.tolist() == [2] and int(pad) == 0


def test_module_attributes():
    model = random_model()
    assert private_api.attention_implementation(model.config) in ("sdpa", "eager")
    linear = torch.nn.Linear(2, 2)
    assert not private_api.has_forward_hooks(linear)
    linear.register_forward_hook(lambda *args: None)
    assert private_api.has_forward_hooks(linear)
    from accelerate.hooks import ModelHook, add_hook_to_module

    offloaded = add_hook_to_module(torch.nn.Linear(2, 2), ModelHook())  # how accelerate's device maps wrap a module
    assert private_api.has_forward_hooks(offloaded)
    assert not private_api.is_peft_adapter_model(model)


def test_auto_model_registration_by_config_class():
    """`register_auto_model` fills the mapping the Auto classes read: a config class of another name than the model's
    `config_class` gets that model."""
    from transformers import AutoModelForCausalLM, PreTrainedConfig

    class ProbeConfig(PreTrainedConfig):
        model_type = "probe-for-register-auto-model"

        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    private_api.register_auto_model(AutoModelForCausalLM, ProbeConfig, DeepseekV3ForCausalLM)
    assert AutoModelForCausalLM._model_mapping[ProbeConfig] is DeepseekV3ForCausalLM


def test_peft_custom_module_registration():
    config = LoraConfig(r=2, target_modules=["q_b_proj"])
    private_api.register_lora_module(config, {torch.nn.Identity: torch.nn.Identity})
    assert torch.nn.Identity in config._custom_modules


def test_peft_target_conversion_contacts():
    """PEFT still rewrites our targets for model_type deepseek_v3 (so the exemption is needed), through the function
    its injection calls from its module (so the exemption is the one that runs), and names LoRA tensors `lora_`."""
    import peft.utils.transformers_weight_conversion as conversion
    from peft.tuners import tuners_utils

    wrapped = getattr(conversion, private_api.PEFT_TARGET_CONVERSION)
    assert tuple(inspect.signature(wrapped.__wrapped__).parameters) == ("peft_config", "model", "conversions")
    assert private_api.PEFT_TARGET_CONVERSION in inspect.getsource(tuners_utils.BaseTuner.inject_adapter)
    targets = ["shared_experts.gate_proj", "shared_experts.up_proj", "down_proj"]
    config = LoraConfig(r=2, target_modules=targets)
    wrapped.__wrapped__(config, model=random_model(), conversions=None)
    # PEFT's own rewrite: "down_proj" also becomes a target parameter, which here is our routed experts' stacked
    # down_proj (PEFT 0.21 also turned the shared experts' gate/up into the built-in class's fused gate_up_proj)
    assert "down_proj" in config.target_parameters
    config = LoraConfig(r=2, target_modules=targets)
    wrapped(config, model=random_model(), conversions=None)
    assert config.target_modules == set(targets) and not config.target_parameters
    assert "lora_" in private_api.peft_adapter_prefixes()


def test_continuous_batching_contacts():
    """The manager still builds its batch processor from the names we rebind, keeps the attention implementation it
    switched from, and the cache allocators still initialise in two halves."""
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import ContinuousBatchingManager
    from transformers.generation.continuous_batching.cache_allocators import CacheAllocator

    from modeling_deepseek_v3 import PagedLatentCache

    names = ContinuousBatchingManager._create_batch_processor.__code__.co_names
    assert {private_api.MANAGER_CACHE_NAME, private_api.MANAGER_SCHEDULERS_NAME} <= set(names)
    assert "fifo" in private_api.scheduler_classes()
    for hook in ("_before_cache_tensor_init", "_after_cache_tensor_init"):
        assert callable(getattr(CacheAllocator, hook))
    model = random_model()
    model.set_attn_implementation("eager")
    config = ContinuousBatchingConfig(num_blocks=4, page_size=16, max_batch_tokens=32)
    manager = model.init_continuous_batching(continuous_batching_config=config)
    assert isinstance(manager.batch_processor.cache, PagedLatentCache)
    assert manager._original_attn_impl == "eager" and model.config._attn_implementation == "paged|eager"
    private_api.discard_unstarted_manager(manager)
    assert model.config._attn_implementation == "eager" and manager.batch_processor is None


def test_tensors_kept_in_fp32_are_named_as_tensors_of_the_model():
    """transformers reads the names from the model and matches them against the keys it loads: a model without FP8
    names no scale, an FP8 model names its block scales, and every name is the last part of one of its tensors."""
    plain = random_model()
    fp8 = random_model(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]})
    assert getattr(plain, private_api.KEPT_IN_FP32) == {"e_score_correction_bias"}
    assert getattr(fp8, private_api.KEPT_IN_FP32) == {"e_score_correction_bias", "weight_scale_inv",
                                                      "gate_proj_scale_inv", "up_proj_scale_inv", "down_proj_scale_inv"}
    for model in (plain, fp8):
        tensors = {name.rsplit(".", 1)[-1] for name, _ in [*model.named_parameters(), *model.named_buffers()]}
        assert getattr(model, private_api.KEPT_IN_FP32) <= tensors


def test_our_experts_implementation_check_is_the_one_transformers_calls():
    model = random_model()
    with pytest.raises(ValueError, match="experts_implementation='batched_mm' is not available"):
        model.set_experts_implementation("batched_mm")


def test_distributed_engine_contacts():
    model = random_model(num_nextn_predict_layers=1)
    linear = torch.nn.Linear(2, 2)
    private_api.run_on_local_shards_under_tensor_parallelism(linear)
    assert linear._hf_quantized_needs_local_tp
    model.forward = lambda *args, **kwargs: None  # as apply_pipeline_parallelism wraps it
    private_api.remove_pipeline_forward_wrapper(model)
    assert model.forward.__func__ is type(model).forward
    plain = torch.zeros(2, 2)
    private_api.swap_parameters(linear, {"weight": plain})
    assert linear.weight is plain
    assert issubclass(private_api.PipelineIdentityLayer, torch.nn.Identity)
    assert {"communicate", "broadcast_from_last"} <= set(vars(private_api.PipelineStage))


def test_private_attributes_transformers_reads_from_our_classes():
    from transformers import CompileConfig, PreTrainedModel

    for name in private_api.DECLARED_CLASS_ATTRIBUTES:
        assert hasattr(PreTrainedModel, name), name
    assert private_api.compile_on_all_devices(CompileConfig())._compile_all_devices is True


def test_deepseek_v3_export_modules_are_lazy_and_shadowable():
    """An attribute set on each export module shadows transformers' export, and deleting it brings the built-in
    class back: what `apply_to_transformers` / `restore_transformers` rely on."""
    import sys

    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM as Builtin

    modules = private_api.deepseek_v3_export_modules()
    assert modules[0] is sys.modules["transformers"] and modules[-1] is sys.modules["transformers.models.deepseek_v3"]
    assert {m.__name__ for m in modules[:-1]} == {"transformers"} and any(m is transformers for m in modules)
    for module in modules:
        before = vars(module).get("DeepseekV3ForCausalLM")
        try:
            vars(module).pop("DeepseekV3ForCausalLM", None)
            assert module.DeepseekV3ForCausalLM is Builtin  # resolved by the lazy module
            module.DeepseekV3ForCausalLM = int
            assert module.DeepseekV3ForCausalLM is int
            del module.DeepseekV3ForCausalLM
            assert module.DeepseekV3ForCausalLM is Builtin
        finally:
            vars(module).pop("DeepseekV3ForCausalLM", None)
            if before is not None:
                module.DeepseekV3ForCausalLM = before

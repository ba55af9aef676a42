"""PEFT LoRA over an FP8 model: adapters wrap FP8Linear, train, and refuse to merge with a clear error."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.peft_fp8 import FP8LoraLinear, load_fp8_adapter, lora_config_for_fp8

from ..utils import QUANTIZATION, SHAPE, random_ids, tiny_config


def test_lora_wraps_fp8_linear_trains_and_refuses_to_merge(tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(**SHAPE, quantization_config=QUANTIZATION))
    ids = random_ids(model.config, 2, 8)
    base = model(ids).logits.detach()
    config = lora_config_for_fp8(LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "o_proj"],
                                            init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_b_proj
    assert isinstance(wrapped, FP8LoraLinear) and wrapped.base_layer.weight.dtype == torch.float8_e4m3fn
    assert wrapped.lora_A["default"].weight.dtype == torch.float32
    out = peft_model(ids, labels=ids)
    assert not torch.allclose(out.logits, base)  # the adapters act (init_lora_weights=False: B != 0)
    out.loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    peft_model.save_pretrained(tmp_path)
    reloaded = load_fp8_adapter(DeepseekV3ForCausalLM(tiny_config(**SHAPE, quantization_config=QUANTIZATION)),
                                tmp_path)
    base_weights = {k: v for k, v in model.state_dict().items() if "lora_" not in k}  # the adapter comes from disk
    reloaded.base_model.model.load_state_dict(base_weights, strict=False)
    torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into an FP8 weight"):
        peft_model.merge_and_unload()

"""Quickstart: build a tiny DeepSeek-V3, save it in the official format, load it through the Auto classes,
generate with the latent cache, and look at what the cache holds.

    python examples/quickstart.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM

import modeling_deepseek_v3  # noqa: F401  (registers our classes for model_type "deepseek_v3")
from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, load_preset

torch.manual_seed(0)
config = load_preset("tiny")
with tempfile.TemporaryDirectory() as folder:
    DeepseekV3ForCausalLM(config).save_pretrained(folder)  # official keys: model.layers.N.mlp.experts.E.*
    model = AutoModelForCausalLM.from_pretrained(folder)  # -> modeling_deepseek_v3.DeepseekV3ForCausalLM

prompt = torch.randint(3, config.vocab_size, (2, 8))
greedy = model.generate(prompt, max_new_tokens=16, do_sample=False)
beams = model.generate(prompt, max_new_tokens=16, num_beams=4, num_return_sequences=2)
print("greedy:", greedy.shape, "beam:", beams.shape)

cache = MLACache(model.config)
model(prompt, cache=cache, use_cache=True)
print(f"cached tokens: {cache.get_seq_length()}, bytes per token per layer: {cache.bytes_per_token()}, "
      f"total: {cache.nbytes()} B")

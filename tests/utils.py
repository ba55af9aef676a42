"""Shared test helpers: tiny configs and models with every weight randomised (norms, router bias included)."""

from __future__ import annotations

import torch

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, load_preset


def tiny_config(**overrides) -> DeepseekV3Config:
    return load_preset("tiny", **overrides)


def random_model(config: DeepseekV3Config | None = None, **overrides) -> DeepseekV3ForCausalLM:
    """A tiny fp32 model whose norms and routing biases are random too, so no term of the math is trivially 1 or 0."""
    model = DeepseekV3ForCausalLM(config or tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


def random_ids(config: DeepseekV3Config, batch: int, length: int) -> torch.Tensor:
    # avoid the special ids so EOS does not stop generation early
    return torch.randint(3, config.vocab_size, (batch, length))

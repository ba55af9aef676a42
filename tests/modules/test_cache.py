"""The latent cache: what it stores, its bytes, growth, crop/reorder, and decoding equal to a full forward."""

import pytest
import torch

from modeling_deepseek_v3 import MLACache, MLAStaticCache

from ..utils import random_ids, random_model, tiny_config


def test_stores_only_latents_and_reports_bytes():
    model = random_model()
    cfg = model.config
    cache = MLACache(cfg)
    model(random_ids(cfg, 2, 7), cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, 7, cfg.kv_lora_rank)
        assert layer.values.shape == (2, 1, 7, cfg.qk_rope_head_dim)
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache.nbytes() == 2 * 7 * cfg.num_hidden_layers * cache.bytes_per_token()
    model.to(torch.bfloat16)
    cache = MLACache(cfg)
    model(random_ids(cfg, 1, 3), cache=cache, use_cache=True)
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


def test_671b_attention_shapes_cache_1152_bytes_per_token_per_layer():
    # DeepSeek-V3's (512 + 64) latent values × 2 bytes in bf16 = 1,152 B per token per layer
    from modeling_deepseek_v3 import load_preset

    full = load_preset("deepseek-v3-671b")
    cfg = tiny_config(kv_lora_rank=full.kv_lora_rank, qk_rope_head_dim=full.qk_rope_head_dim, num_hidden_layers=1,
                      first_k_dense_replace=1, rope_scaling=None)
    model = random_model(cfg).to(torch.bfloat16)
    cache = MLACache(cfg)
    model(random_ids(cfg, 1, 3), cache=cache, use_cache=True)
    assert cache.bytes_per_token() == 1152
    assert cache.bytes_per_token() * full.num_hidden_layers == 70272


def test_growth_keeps_storage_between_steps():
    model = random_model()
    cfg = model.config
    cache = MLACache(cfg)
    ids = random_ids(cfg, 1, 5)
    model(ids, cache=cache, use_cache=True)
    storage = cache.layers[0].keys.untyped_storage().data_ptr()  # the latent, a view of the layer's buffer
    for _ in range(10):
        model(ids[:, :1], cache=cache, use_cache=True)
    assert cache.layers[0].keys.untyped_storage().data_ptr() == storage  # no re-allocation while capacity lasts
    assert cache.get_seq_length() == 15


def test_decode_steps_after_a_long_prompt_write_into_its_storage():
    """The prompt's storage leaves room for the next tokens: the first decode steps do not copy the prompt's latent
    (as doubling from a storage of exactly the prompt would)."""
    from modeling_deepseek_v3.cache import MIN_CAPACITY

    model = random_model()
    cache = MLACache(model.config)
    ids = random_ids(model.config, 1, MIN_CAPACITY + 44)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        storage = cache.layers[0].keys.untyped_storage().data_ptr()
        for _ in range(3):
            model(ids[:, :1], cache=cache, use_cache=True)
    assert cache.layers[0].keys.untyped_storage().data_ptr() == storage
    assert cache.get_seq_length() == MIN_CAPACITY + 47


def test_incremental_decoding_equals_full_forward():
    model = random_model()
    ids = random_ids(model.config, 2, 16)
    full = model(ids).logits
    cache = MLACache(model.config)
    steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]
    for t in range(6, 16):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_crop_and_reorder():
    model = random_model()
    ids = random_ids(model.config, 3, 9)
    cache = MLACache(model.config)
    model(ids, cache=cache, use_cache=True)
    before = cache.layers[1].keys.clone()
    cache.crop(-4)
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(cache.layers[1].keys, before[:, :, :5])
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(cache.layers[1].keys, before[[2, 0, 1], :, :5])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


def test_static_cache_equals_dynamic_cache():
    model = random_model()
    ids = random_ids(model.config, 2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    static = MLAStaticCache(config=model.config, max_cache_len=32)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=static)
    assert torch.equal(out, dynamic)
    assert static.nbytes() == 2 * 17 * model.config.num_hidden_layers * static.bytes_per_token()
    by_name = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             cache_implementation="static")
    assert torch.equal(by_name, dynamic)


@pytest.mark.parametrize("path", ["auto", "absorbed", "expanded"])
def test_static_cache_forward_without_mask_equals_full_forward(path):
    """Prefill and decode into a static cache with no attention mask: empty slots must stay invisible."""
    model = random_model(tiny_config(mla_attention_path=path))
    ids = random_ids(model.config, 2, 10)
    full = model(ids).logits
    cache = MLAStaticCache(config=model.config, max_cache_len=32)
    steps = [model(ids[:, :6], cache=cache, use_cache=True).logits]
    for t in range(6, 10):
        steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    cache.crop(-2)  # roll back two tokens and decode them again, as speculative decoding does
    again = model(ids[:, 8:10], cache=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, 8:10], rtol=1e-5, atol=1e-5)


def test_static_cache_reused_after_reset_or_crop_decodes_exactly():
    """The attention reads the cache length before `update` advances it (a static layer counts in a tensor that
    `update` increments in place): after `reset` the prefill is causal, and after `crop` a decode step does not see
    the stale slot after its own."""
    model = random_model()
    ids = random_ids(model.config, 2, 10)
    full = model(ids).logits
    cache = MLAStaticCache(config=model.config, max_cache_len=32)
    model(ids[:, :3], cache=cache, use_cache=True)
    cache.reset()
    torch.testing.assert_close(model(ids, cache=cache, use_cache=True).logits, full, rtol=1e-5, atol=1e-5)
    cache.crop(-4)  # slots 6..9 keep their latents, invisible until rewritten
    steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=1e-5, atol=1e-5)


def test_caches_built_without_a_config():
    from transformers.cache_utils import DynamicCache

    model = random_model()
    ids = random_ids(model.config, 1, 5)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    for cache in (MLACache(), DynamicCache()):
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache), expected)


def test_static_cache_overflow_is_a_clear_error():
    model = random_model()
    cache = MLAStaticCache(config=model.config, max_cache_len=8)
    model(random_ids(model.config, 1, 6), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="at most 8 tokens"):
        model(random_ids(model.config, 1, 3), cache=cache, use_cache=True)


def test_generate_uses_latent_cache_by_default():
    model = random_model(tiny_config())
    out = model.generate(random_ids(model.config, 1, 4), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True)
    assert isinstance(out.cache, MLACache)


def test_static_cache_decode_step_compiles_as_one_graph():
    """What the static cache is for: a decode step that torch.compile captures whole (bf16: torch's compiled
    grouped_mm takes bf16 only)."""
    model = random_model().to(torch.bfloat16)
    ids = random_ids(model.config, 1, 6)
    with torch.no_grad():
        full = model(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1]
        cache = MLAStaticCache(config=model.config, max_cache_len=16)
        model(ids, cache=cache, use_cache=True)
        step = torch.compile(model.forward, backend="eager", fullgraph=True)
        out = step(ids[:, :1], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(out.float(), full.float(), rtol=0, atol=0.02)

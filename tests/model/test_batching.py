"""Continuous batching (`generate_batch`, the manager, `generate(cache_implementation="paged")`) over the paged latent
cache: each request's greedy tokens equal its own `generate`, finished requests give their blocks back, a request
longer than the pool is refused, sampling runs, and the pool holds only the latent."""

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, pipeline

from ..utils import random_model, tiny_config, word_tokenizer

PAGE = 16


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]  # no special ids


def batching_config(num_blocks: int, **overrides) -> ContinuousBatchingConfig:
    # small batches of tokens: long prompts are prefilled in chunks, next to other requests' decoding
    return ContinuousBatchingConfig(num_blocks=num_blocks, page_size=PAGE, max_batch_tokens=128, **overrides)


def greedy(model, max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id)


def own_generate(model, prompt: list[int], config: GenerationConfig) -> list[int]:
    return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()


def test_generate_batch_equals_each_requests_own_generate():
    """16 prompts of 1 to 200 tokens, greedy, in a pool too small to hold them all at once: requests wait for pages
    that finished ones free, and each request's tokens are those of its own single-request `generate`."""
    model = random_model()
    lengths = [1, 200] + torch.randint(1, 201, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = prompts_of(lengths, model.config.vocab_size)
    config = greedy(model, 6)
    pool_blocks = 40  # 640 tokens, for about 1,700 to cache
    outputs = model.generate_batch(prompts, generation_config=config,
                                   continuous_batching_config=batching_config(pool_blocks))  # fmt: skip
    assert sum(-(-(n + 5) // PAGE) for n in lengths) > pool_blocks
    assert list(outputs) == [f"req_{i}" for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        assert outputs[f"req_{i}"].error is None
        assert outputs[f"req_{i}"].generated_tokens == own_generate(model, prompt, config), f"request {i}"


def test_generate_batch_with_eager_attention_equals_own_generate():
    """transformers switches eager to its paged eager attention, which adds the mask as it is: the padded groups'
    masks must be additive. The implementation is restored afterwards."""
    model = random_model()
    model.set_attn_implementation("eager")
    prompts = prompts_of([27, 7, 40, 1], model.config.vocab_size)
    config = greedy(model, 5)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching_config(16))
    assert model.config._attn_implementation == "eager"
    for i, prompt in enumerate(prompts):
        assert outputs[f"req_{i}"].generated_tokens == own_generate(model, prompt, config), f"request {i}"


def test_generate_with_paged_cache_implementation_equals_generate():
    model = random_model()
    ids = torch.tensor(prompts_of([9, 9], model.config.vocab_size))
    config = greedy(model, 4)
    paged = model.generate(ids, generation_config=config, cache_implementation="paged",
                           continuous_batching_config=batching_config(8))  # fmt: skip
    torch.testing.assert_close(paged[0], model.generate(ids, generation_config=config), rtol=0, atol=0)


def test_finished_requests_free_their_blocks():
    """A long prompt finishing early gives its pages back while a short prompt generating long goes on: the bytes
    held by live requests fall below their peak, and end at zero."""
    model = random_model()
    short, long = prompts_of([10, 100], model.config.vocab_size)
    config = GenerationConfig(do_sample=False, eos_token_id=None)  # no early stop: lengths are max_new_tokens
    cb_config = batching_config(32, allow_block_sharing=False)  # freed blocks go back to the pool, none kept
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb_config,
                                                   block=True, timeout=30) as manager:  # fmt: skip
        cache = manager.batch_processor.cache
        assert cache.used_bytes() == 0
        writer = manager.add_request(short, max_new_tokens=60)
        reader = manager.add_request(long, max_new_tokens=2)
        assert len(manager.get_result(request_id=reader, timeout=60).generated_tokens) == 2
        with manager.pause():
            still_held = cache.allocator.block_table.get(writer, [])
            assert reader not in cache.allocator.block_table
            assert cache.used_bytes() == len(still_held) * cache.allocator.bytes_per_block
        # both were live together: the long prompt's 7 pages and at least one of the other's; the other needs 5 pages
        assert cache.peak_used_bytes() >= 8 * cache.allocator.bytes_per_block > cache.used_bytes()
        assert len(manager.get_result(request_id=writer, timeout=60).generated_tokens) == 60
        with manager.pause():
            assert cache.used_bytes() == 0


def test_request_longer_than_the_pool_is_refused():
    model = random_model()
    model.set_attn_implementation("eager")  # switched to paged eager by the manager, and back when refused
    config = greedy(model, 5)
    prompt, fits = prompts_of([100, 20], model.config.vocab_size)
    with pytest.raises(ValueError, match=r"needs 104 cached tokens, but the paged cache holds at most 64"):
        model.generate_batch([fits, prompt], generation_config=config, continuous_batching_config=batching_config(4))
    assert model.config._attn_implementation == "eager"
    # through the manager, the long request fails alone; the other one is served
    expected = own_generate(model, fits, config)  # before the manager switches the attention implementation
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=batching_config(4)
    ) as manager:
        too_long, ok = manager.add_request(prompt), manager.add_request(fits)
        assert "holds at most 64 per request" in manager.get_result(request_id=too_long, timeout=30).error
        assert manager.get_result(request_id=ok, timeout=60).generated_tokens == expected


def test_sampling_runs():
    model = random_model()
    prompts = prompts_of([5, 30, 1, 64], model.config.vocab_size)
    sampling = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.8, top_k=20, eos_token_id=None)
    outputs = model.generate_batch(prompts, generation_config=sampling,
                                   continuous_batching_config=batching_config(32, seed=0))  # fmt: skip
    for output in outputs.values():
        assert output.error is None and len(output.generated_tokens) == 7
        assert all(0 <= token < model.config.vocab_size for token in output.generated_tokens)
    generated = [token for output in outputs.values() for token in output.generated_tokens]
    assert len(set(generated)) > 7  # not one token repeated: the samples spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_hold_only_the_latent(dtype):
    """Per token and layer the pool holds kv_lora_rank + qk_rope_head_dim values in the model's dtype, and its bytes
    are the blocks asked for (plus transformers' two padding sectors); a request runs through it."""
    config = tiny_config()
    model = random_model(config).to(dtype)
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=config.eos_token_id)
    cb_config = batching_config(10)
    with model.continuous_batching_context_manager(
        generation_config=generation, continuous_batching_config=cb_config
    ) as manager:
        request = manager.add_request(prompts_of([40], config.vocab_size)[0])
        output = manager.get_result(request_id=request, timeout=60)
        assert output.error is None and 1 <= len(output.generated_tokens) <= 3
        cache = manager.batch_processor.cache
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        assert cache.bytes_per_token() == config.num_hidden_layers * latent * dtype.itemsize
        assert cache.allocator.num_blocks == 10 and cache.max_request_tokens() == 10 * PAGE
        assert cache.allocated_bytes() == (cache.num_sectors + 2) * cache.bytes_per_sector
        assert cache.num_sectors * cache.bytes_per_sector == 10 * PAGE * cache.bytes_per_token()
        assert cache.allocator.pages(0).dtype == dtype


ENTRY_POINTS = {
    "generate": lambda model, prompts, config: model.generate(torch.tensor(prompts), generation_config=config),
    "generate_batch": lambda model, prompts, config: model.generate_batch(
        prompts, generation_config=config, continuous_batching_config=batching_config(8)),
    "generate-paged": lambda model, prompts, config: model.generate(
        torch.tensor(prompts), generation_config=config, cache_implementation="paged",
        continuous_batching_config=batching_config(8)),
    "pipeline": lambda model, prompts, config: pipeline("text-generation", model=model, tokenizer=word_tokenizer())(
        ["w005 w009 w017"], generation_config=config),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_generation_leaves_the_training_mode_and_the_callers_config_as_they_were(entry):
    """A training loop that generates samples goes on training (bias update, balance loss), and a config without EOS
    (transformers' manager writes eos_token_id=-1 into it) or the model's own config is not changed."""
    model = random_model().train()
    prompts = prompts_of([4, 4], model.config.vocab_size)
    model.generation_config.max_new_tokens = 3
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=model.config.pad_token_id)
    given, own = config.to_dict(), model.generation_config.to_dict()
    ENTRY_POINTS[entry](model, prompts, config)
    assert model.training
    assert config.to_dict() == given and model.generation_config.to_dict() == own
    model.eval()
    ENTRY_POINTS[entry](model, prompts, None)
    assert not model.training and model.generation_config.to_dict() == own

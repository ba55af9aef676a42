"""Continuous batching of DeepSeek-V3.2 over the paged latent cache, whose rows keep the lightning indexer's FP8 key
and scale beside each token's latent: greedy `generate_batch` equals each request's own `generate` (over
`MLACache(config)`), with prompts longer than `index_topk` (each query attends to a strict subset of its request's
keys), more requests than run at once, long prompts prefilled in chunks, and pages shared by a common prefix; MTP
drafting over the same pages; the row's bytes; FP8 pages, which stay refused."""

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, load_preset
from modeling_deepseek_v3.indexer import LightningIndexer
from modeling_deepseek_v3.paged_cache import PagedLatentCache, row_bytes

from ..utils import recorded_drafts


def tiny_v32(**overrides):
    # 32 index heads, not the preset's 4: with few heads, exact ties of index scores at the k-th place are common,
    # and torch.topk breaks them by an order that depends on the number of keys (test_deepseek_v32_decode.py)
    torch.manual_seed(0)
    config = load_preset("tiny-deepseek-v32", quantization_config=None, initializer_range=0.1, index_n_heads=32,
                         **overrides)  # fmt: skip
    return DeepseekV3ForCausalLM(config).eval()


def greedy(model, max_new_tokens: int, **options) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                            **options)  # fmt: skip


def test_generate_batch_equals_each_requests_own_generate(monkeypatch):
    model = tiny_v32()
    lengths = [1, 45, 5, 30, 9, 3, 20, 13]
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    prompts.append(prompts[1][:32] + [7, 8, 9])  # two pages of request 1's prompt: shared blocks, keys included
    config = greedy(model, 6)
    # 16 tokens a step: the 45- and 30-token prompts are prefilled in chunks; 3 requests at a time: the others wait
    cb_config = ContinuousBatchingConfig(num_blocks=12, page_size=16, max_batch_tokens=16, max_requests_per_batch=3)
    assert max(lengths) > cb_config.max_batch_tokens and len(lengths) > cb_config.max_requests_per_batch
    select, strict_subsets = LightningIndexer.select, []
    search, shared = PagedLatentCache.search_prefix_match, []

    def recording(self, scores, allowed):
        indices, valid = select(self, scores, allowed)
        strict_subsets.append(bool((valid.sum(-1) < allowed.sum(-1)).any()))
        return indices, valid

    def searching(self, request_id, prompt_ids):
        shared.append(search(self, request_id, prompt_ids))
        return shared[-1]

    monkeypatch.setattr(LightningIndexer, "select", recording)
    monkeypatch.setattr(PagedLatentCache, "search_prefix_match", searching)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
    assert any(strict_subsets)  # some queries attended to index_topk of more keys
    assert max(shared) == 32  # the last request reused request 1's first two pages
    for i, prompt in enumerate(prompts):
        own = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
        assert outputs[f"req_{i}"].error is None
        assert outputs[f"req_{i}"].generated_tokens == own, f"request {i} of {len(prompt)} tokens"


@pytest.mark.parametrize(("dtype", "row"), [
    # [c_kv | k_pe] 72 values (288 bytes) | 32 e4m3 index values | a 4-byte scale | 4 bytes to a pair of fp32
    (torch.float32, 288 + 32 + 4 + 4),
    # 72 bf16 values (144 bytes) | 32 | 4: 180, already whole pairs of bf16
    (torch.bfloat16, 144 + 32 + 4),
])  # fmt: skip
def test_a_row_holds_the_latent_and_the_index_key(dtype, row):
    model = tiny_v32().to(dtype)
    config = model.config
    assert (config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim) == (64, 8, 32)
    cb_config = ContinuousBatchingConfig(num_blocks=4, page_size=16, max_batch_tokens=32)
    with model.continuous_batching_context_manager(generation_config=greedy(model, 2),
                                                   continuous_batching_config=cb_config) as manager:  # fmt: skip
        request = manager.add_request(list(range(3, 23)))
        assert manager.get_result(request_id=request, timeout=60).error is None
        cache = manager.batch_processor.cache
        assert cache.bytes_per_token() == config.num_hidden_layers * row
        assert cache.num_sectors * cache.bytes_per_sector == 4 * 16 * cache.bytes_per_token()
        # layer 0's pages of every block: the rows the request wrote are those with a scale (the pool starts zeroed)
        pages = cache.allocator.pages(0)[:: config.num_hidden_layers].flatten(0, 1)
        c_kv, k_pe, index_keys = cache.allocator.split(pages)
        assert c_kv.dtype == k_pe.dtype == dtype and c_kv.shape[1:] == (64,) and k_pe.shape[1:] == (8,)
        assert index_keys.values.dtype == torch.float8_e4m3fn and index_keys.values.shape[1:] == (32,)
        written = index_keys.scales[:, 0] > 0
        assert int(written.sum()) == 21  # the prompt's 20 tokens and the first new one (the last is never fed)
    # the keys the dense cache keeps of the same prompt are among them
    dense = MLACache(config)
    with torch.no_grad():
        model(torch.arange(3, 23)[None], cache=dense, use_cache=True)
    keys, scales = dense.layers[0].index_keys()
    stored = torch.cat([index_keys.values[written].float(), index_keys.scales[written]], dim=-1)
    expected = torch.cat([keys[0].float(), scales[0, :, None]], dim=-1)
    assert bool((expected[:, None] == stored[None]).all(-1).any(-1).all())


def test_mtp_drafting_equals_own_generate_and_drafts_as_generate_does(monkeypatch):
    """MTP module 1 drafts inside continuous batching over the same rows (its own layer's indexer keys included):
    greedy tokens are each request's own `generate()`'s, and every draft at a request's newest position is the one
    `generate(use_mtp=True)` makes there for that prompt alone."""
    model = tiny_v32()
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 30, 2, 17)]
    batched, alone, current = recorded_drafts(monkeypatch)
    config = greedy(model, 8)
    cb_config = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=16, max_requests_per_batch=3)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config,
                                   use_mtp=True, num_draft_tokens=2)  # fmt: skip
    for current["prompt"], prompt in enumerate(prompts):
        model.generate(torch.tensor([prompt]), generation_config=config, use_mtp=True)
        own = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
        assert outputs[f"req_{current['prompt']}"].generated_tokens == own, f"request {current['prompt']}"
    assert all(output.speculative_stats.proposed[0] > 0 for output in outputs.values())  # the drafts ran
    common = batched.keys() & alone.keys()
    assert len(common) >= 10 and {key: batched[key] for key in common} == {key: alone[key] for key in common}


def test_fp8_pages_are_refused():
    model = tiny_v32()
    cb_config = ContinuousBatchingConfig(num_blocks=4, page_size=16)
    with pytest.raises(ValueError, match=r"cache_dtype='fp8' is not built for DeepSeek-V3.2"):
        model.generate_batch([[5, 6, 7]], generation_config=greedy(model, 2, cache_config={"cache_dtype": "fp8"}),
                             continuous_batching_config=cb_config)  # fmt: skip
    with pytest.raises(ValueError, match=r"cache_dtype='fp8' is not built for DeepSeek-V3.2"):
        row_bytes(model.config, torch.bfloat16, "fp8")  # a pool built directly is refused too

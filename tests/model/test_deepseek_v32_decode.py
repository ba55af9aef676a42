"""DeepSeek-V3.2 decoding over `MLACache(config)`, whose layers keep the indexer's FP8 keys beside the latents: the
decode steps compute what DeepSeek's final V3.2 code computes over its own caches (the fixture's `decode_*`: 4 greedy
steps after the 24-token prompt, `index_topk` 8), cached decoding equals the full forward over the same tokens, and
the cache's batch operations keep the indexer keys with their latents."""

import pytest
import torch

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, MLAStaticCache, load_preset
from modeling_deepseek_v3.indexer import LightningIndexer

from .test_compile import greedy_steps
from .test_deepseek_v32 import LOGITS_ATOL, MEMBERS, decided_queries, load, reference

SEED = 0


@pytest.fixture(scope="module")
def model():
    # 32 index heads, not the preset's 4: a key scores exactly 0 for a query where every head's relu is 0, and the
    # top-k breaks such exact ties by torch.topk's order, which depends on the number of keys (as in DeepSeek's
    # code): with 4 heads, ties at the k-th place are common, and a decode step could pick another of the tied keys
    # than the full forward
    torch.manual_seed(0)
    config = load_preset("tiny-deepseek-v32", quantization_config=None, initializer_range=0.1, index_n_heads=32)
    return DeepseekV3ForCausalLM(config).eval()


def random_ids(*shape: int) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(SEED))


def full_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("member", MEMBERS)
def test_decode_steps_equal_deepseeks_final_code(member, monkeypatch):
    model, ref = load(member), reference(member)
    select, chosen = LightningIndexer.select, []

    def recording(self, scores, allowed):
        indices, valid = select(self, scores, allowed)
        chosen.append(torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, indices, valid)[0, -1])
        return indices, valid

    cache = MLACache(model.config)
    with torch.no_grad():
        model(ref["prompt"][None], cache=cache, use_cache=True)
        monkeypatch.setattr(LightningIndexer, "select", recording)
        logits = [model(token.view(1, 1), cache=cache, use_cache=True).logits[0, -1] for token in ref["decode_tokens"]]
    torch.testing.assert_close(torch.stack(logits), ref["decode_logits"], rtol=0, atol=LOGITS_ATOL)
    layers, steps = model.config.num_hidden_layers, len(ref["decode_tokens"])
    assert len(chosen) == layers * steps  # one decode query per layer and step
    t = ref["decode_selected"].shape[-1]
    for call, ours in enumerate(chosen):
        step, layer = divmod(call, layers)
        theirs, scores = ref["decode_selected"][layer, step], ref["decode_index_scores"][layer, step]
        assert ours.sum() == theirs.sum() == model.config.index_topk < ours.shape[-1]  # a strict subset of the past
        if decided_queries(scores[None], model.config.index_topk)[0]:
            assert torch.equal(torch.nn.functional.pad(ours, (0, t - ours.shape[-1])), theirs), (layer, step)


def test_cached_decoding_equals_the_full_forward(model):
    """Prefill, a 3-token step (as a speculative verification), then single tokens, with left padding in one row:
    every query's logits equal the full forward's (index_topk 8 < the length: each query attends to a subset)."""
    ids = random_ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    cache, logits = MLACache(model.config), []
    with torch.no_grad():
        for start, end in [(0, 10), (10, 13)] + [(i, i + 1) for i in range(13, 20)]:
            logits.append(model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True).logits)
    assert model.config.index_topk < 20
    real = mask.bool()  # a padding query's logits are not used (it attends to nothing)
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], full_logits(model, ids, mask)[real], rtol=0, atol=1e-5)


def test_generate_is_greedy_over_full_forwards(model):
    ids = random_ids(1, 6)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = ids
    for _ in range(8):
        expected = torch.cat([expected, full_logits(model, expected)[:, -1:].argmax(-1)], dim=1)
        if expected[0, -1] == model.generation_config.eos_token_id:
            break
    assert torch.equal(generated, expected)


def test_mtp_speculative_decoding_equals_plain_greedy(model):
    ids = random_ids(2, 6)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    speculative = model.generate(ids, max_new_tokens=12, do_sample=False, use_mtp=True)
    assert torch.equal(speculative, plain)


def prefilled(model, ids: torch.Tensor) -> MLACache:
    cache = MLACache(model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return cache


def assert_same_cache(ours: MLACache, fresh: MLACache) -> None:
    for layer, fresh_layer in zip(ours.layers, fresh.layers):
        for mine, theirs in zip(layer.index_keys(), fresh_layer.index_keys()):
            assert torch.equal(mine.view(torch.uint8) if mine.dtype == torch.float8_e4m3fn else mine,
                               theirs.view(torch.uint8) if theirs.dtype == torch.float8_e4m3fn else theirs)
        torch.testing.assert_close(layer.keys, fresh_layer.keys, rtol=0, atol=1e-6)


def test_cache_operations_keep_the_indexer_keys_with_the_latents(model):
    ids = random_ids(3, 12)
    cache = prefilled(model, ids)
    c, r, d = model.config.kv_lora_rank, model.config.qk_rope_head_dim, model.config.index_head_dim
    assert cache.bytes_per_token() == 4 * (c + r) + d + 4  # fp32 latents, an FP8 key and its fp32 scale
    assert cache.nbytes() == 3 * 12 * cache.bytes_per_token() * model.config.num_hidden_layers

    with pytest.raises(ValueError, match="needs cache_kwargs with 'index_keys' and 'index_scales'"):
        cache.update(cache.layers[0].keys[:, :, :1], cache.layers[0].values[:, :, :1], 0)  # latents alone

    cache.batch_select_indices(torch.tensor([2, 0]))
    assert_same_cache(cache, prefilled(model, ids[[2, 0]]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert_same_cache(cache, prefilled(model, ids[[0, 2]]))
    cache.crop(-4)
    assert_same_cache(cache, prefilled(model, ids[[0, 2], :8]))
    with torch.no_grad():  # decoding on from the cropped cache: the full forward's logits
        logits = torch.cat([model(ids[[0, 2], i : i + 1], cache=cache, use_cache=True).logits for i in range(8, 12)],
                           dim=1)
    torch.testing.assert_close(logits, full_logits(model, ids[[0, 2]])[:, 8:], rtol=0, atol=1e-5)


def test_static_cache_keeps_the_indexer_keys(model):
    """`MLAStaticCache` (and generate's cache_implementation="static") decodes as the full forward; its byte
    accounting counts the indexer keys."""
    ids = random_ids(2, 20)
    cache, logits = MLAStaticCache(config=model.config, max_cache_len=32), []
    with torch.no_grad():
        for start, end in [(0, 12)] + [(i, i + 1) for i in range(12, 20)]:
            logits.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full_logits(model, ids), rtol=0, atol=1e-5)
    c, r, d = model.config.kv_lora_rank, model.config.qk_rope_head_dim, model.config.index_head_dim
    assert cache.bytes_per_token() == 4 * (c + r) + d + 4
    assert cache.nbytes() == 2 * 20 * cache.bytes_per_token() * model.config.num_hidden_layers
    assert cache.allocated_bytes() == 2 * 32 * cache.bytes_per_token() * model.config.num_hidden_layers
    plain = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, cache_implementation="static"),
                       plain)


def test_static_cache_decoding_compiles_to_one_graph(model):
    """torch.compile(fullgraph=True) of the decode step over the static cache: no graph break, no recompile as the
    position advances, eager decoding's tokens."""
    torch.compiler.reset()
    prompt = random_ids(2, 6)
    eager = greedy_steps(model, model.forward, prompt, MLAStaticCache(config=model.config, max_cache_len=32), 8)
    step = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    cache = MLAStaticCache(config=model.config, max_cache_len=32)
    greedy_steps(model, step, prompt, cache, 1)  # compiles the step
    cache.reset()
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = greedy_steps(model, step, prompt, cache, 8)
    assert torch.equal(compiled, eager)


def test_a_training_forward_with_a_cache_is_refused():
    config = load_preset("tiny-deepseek-v32", quantization_config=None, indexer_training_stage="sparse")
    model = DeepseekV3ForCausalLM(config).train()
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match="a training forward of DeepSeek-V3.2 with a cache: .* use_cache=False"):
        model(ids, labels=ids, use_cache=True)

"""Continuous batching facing bad requests and options: a bad prompt fails alone with its error in its own output
(in `generate_batch`, and in a running manager, which goes on taking requests), options continuous batching does not
implement are refused by name before any manager exists, `generate_batch`'s default pool is sized for its requests,
and `generate(cache_implementation="paged")` takes padding out of each row, pads rows that end early, and refuses
what it cannot do."""

from math import ceil

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, LogitsProcessorList

from modeling_deepseek_v3 import PagedLatentCache

from ..model.test_batching import batching_config, greedy, own_generate, prompts_of
from ..utils import random_model


def results_of(manager, count: int) -> dict:
    """The next `count` finished outputs of a running manager, by request id."""
    results = {}
    while len(results) < count:
        output = manager.get_result(timeout=60)
        assert output is not None, f"only {sorted(results)} returned"
        if output.is_finished():
            results[output.request_id] = output
    return results


def assert_no_manager_left(model, attention: str, training: bool = False) -> None:
    assert getattr(model, "_cached_continuous_batching_manager", None) is None
    assert model.config._attn_implementation == attention and model.training == training


def test_bad_prompts_fail_alone_in_generate_batch():
    """An id past the vocabulary, a negative id and an empty prompt each fail as their own request, with an error
    naming the request, the token and the rule; the other requests return their own `generate`'s tokens."""
    model = random_model()
    vocab = model.config.vocab_size
    good = prompts_of([7, 30, 2], vocab)
    config = greedy(model, 4)
    inputs = [good[0], [5, vocab], good[1], [], [4, -1, 9], good[2]]
    outputs = model.generate_batch(inputs, generation_config=config, continuous_batching_config=batching_config(16))
    assert list(outputs) == [f"req_{i}" for i in range(len(inputs))]
    assert outputs["req_1"].error == (f"request 'req_1': input_ids[1] = {vocab} is outside the vocabulary: token ids "
                                      f"must be in [0, vocab_size={vocab})")  # fmt: skip
    assert outputs["req_3"].error.startswith("request 'req_3': input_ids is empty: a prompt needs at least one token")
    assert outputs["req_4"].error.startswith("request 'req_4': input_ids[1] = -1 is outside the vocabulary")
    for i, prompt in zip((0, 2, 5), good):
        assert outputs[f"req_{i}"].error is None
        assert outputs[f"req_{i}"].generated_tokens == own_generate(model, prompt, config), f"request {i}"


@pytest.mark.parametrize(("inputs", "message"), [
    ([[5, 6], "w005 w006"], r"inputs\[1\] = 'w005 w006' \(str\) must be a list of token ids"),
    ([[5, 6], torch.tensor([5, 6])], r"inputs\[1\] = tensor\(\[5, 6\]\) \(Tensor\) must be a list of token ids"),
    ([[5, None]], r"inputs\[0\]\[1\] = None \(NoneType\) is not a token id"),
    ([[5, 6.0]], r"inputs\[0\]\[1\] = 6.0 \(float\) is not a token id"),
    ([[True, 6]], r"inputs\[0\]\[0\] = True \(bool\) is not a token id"),
    ("w005 w006", r"inputs = 'w005 w006' \(str\) must be a list of prompts"),
])  # fmt: skip
def test_generate_batch_refuses_prompts_that_are_not_token_ids(inputs, message):
    """transformers measures and sorts the prompts before any request exists: a prompt that is not a list of ints is
    refused then, naming it, and no manager is left behind."""
    model = random_model()
    attention = model.config._attn_implementation
    with pytest.raises(TypeError, match=message):
        model.generate_batch(inputs, generation_config=greedy(model, 3), continuous_batching_config=batching_config(8))
    assert_no_manager_left(model, attention)


def test_a_running_manager_fails_bad_requests_alone_and_goes_on():
    """Bad requests among good ones in a running manager: each fails with its own error, the good ones return their
    own `generate`'s tokens, and the manager takes (and serves) a request afterwards."""
    model = random_model()
    vocab = model.config.vocab_size
    config = greedy(model, 4)
    good = prompts_of([9, 25, 4], vocab, seed=1)
    expected = [own_generate(model, prompt, config) for prompt in good]  # before the manager switches attention
    bad = {
        (3, vocab + 7): f"input_ids[1] = {vocab + 7} is outside the vocabulary",
        (): "input_ids is empty",
        (-4,): "input_ids[0] = -4 is outside the vocabulary",
        "w005": "input_ids[0] = 'w' (str) is not a token id",
        (3, 2.5): "input_ids[1] = 2.5 (float) is not a token id",
    }
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=batching_config(16)
    ) as manager:
        first = manager.add_request(good[0])
        refused = {manager.add_request(list(prompt)): message for prompt, message in bad.items()}
        second = manager.add_request(good[1])
        results = results_of(manager, len(refused) + 2)
        for request_id, message in refused.items():
            assert results[request_id].error.startswith(f"request {request_id!r}: {message}")
            assert results[request_id].generated_tokens == []
        assert results[first].error is None and results[first].generated_tokens == expected[0]
        assert results[second].error is None and results[second].generated_tokens == expected[1]
        assert manager.is_running()
        late = manager.add_request(good[2])
        assert manager.get_result(request_id=late, timeout=60).generated_tokens == expected[2]


@pytest.mark.parametrize(("options", "message"), [
    ({"num_beams": 2}, "continuous batching does not implement num_beams=2"),
    ({"min_new_tokens": 2}, "continuous batching does not implement min_new_tokens=2"),
    ({"repetition_penalty": 1.3}, "continuous batching does not implement repetition_penalty=1.3"),
    ({"no_repeat_ngram_size": 2}, "continuous batching does not implement no_repeat_ngram_size=2"),
    ({"use_mtp": True, "do_sample": True, "num_return_sequences": 2}, "use_mtp=True with num_return_sequences=2"),
    ({"use_mtp": True, "num_draft_tokens": 0}, r"num_draft_tokens=0 is invalid: it must be an int >= 1"),
    ({"num_draft_tokens": 2}, r"num_draft_tokens=2 sets how many tokens MTP drafting proposes per step: it needs"),
    ({"cache_implementation": "static"}, "cache_implementation='static' does not apply to continuous batching"),
    ({"max_new_tokens": None, "max_length": 30}, r"generate_batch needs max_new_tokens \(got None, with max_length=30"),
])  # fmt: skip
@pytest.mark.parametrize("given_as", ["keywords", "generation_config"])
def test_generate_batch_refuses_options_it_does_not_implement(options, message, given_as):
    """transformers' generate_batch reads max_new_tokens only from its keywords and drops the processors continuous
    batching does not support: each such option is refused by name, before any manager exists."""
    model = random_model().train()
    attention = model.config._attn_implementation
    prompts = prompts_of([5, 9], model.config.vocab_size)
    if given_as == "keywords":
        call = dict(generation_config=GenerationConfig(max_new_tokens=3), **options)
    else:
        call = dict(generation_config=GenerationConfig(**{"max_new_tokens": 3, **options}))
    with pytest.raises(ValueError, match=message):
        model.generate_batch(prompts, continuous_batching_config=batching_config(8), **call)
    assert_no_manager_left(model, attention, training=True)


def test_generate_batch_refuses_keywords_that_are_not_generation_options():
    model = random_model()
    attention = model.config._attn_implementation
    prompts = prompts_of([5, 9], model.config.vocab_size)
    with pytest.raises(ValueError, match="generate_batch does not take attention_mask, streamer: its keywords are"):
        model.generate_batch(prompts, max_new_tokens=3, attention_mask=torch.ones(2, 9), streamer=object())
    assert_no_manager_left(model, attention)


def test_a_manager_refuses_options_it_does_not_implement_before_it_starts():
    model = random_model()
    attention = model.config._attn_implementation
    with pytest.raises(ValueError, match="continuous batching does not implement min_new_tokens=4"):
        with model.continuous_batching_context_manager(
            generation_config=GenerationConfig(max_new_tokens=8, min_new_tokens=4),
            continuous_batching_config=batching_config(8),
        ):
            pass
    assert_no_manager_left(model, attention)


def test_generate_batch_applies_generation_keywords():
    """Keywords are generation-config fields over the given config: sampling with top_k=1 is greedy decoding, and
    num_return_sequences=2 returns each prompt twice, after max_new_tokens=3 tokens at most."""
    model = random_model()
    prompts = prompts_of([6, 13], model.config.vocab_size, seed=2)
    expected = [own_generate(model, prompt, greedy(model, 3)) for prompt in prompts]
    outputs = model.generate_batch(prompts, generation_config=GenerationConfig(max_new_tokens=20), max_new_tokens=3,
                                   do_sample=True, top_k=1, num_return_sequences=2,
                                   continuous_batching_config=batching_config(16))  # fmt: skip
    assert list(outputs) == ["req_0__child#0", "req_0", "req_1__child#0", "req_1"]
    for request_id, output in outputs.items():
        assert output.generated_tokens == expected[int(request_id[4])], request_id


@pytest.fixture
def built_caches(monkeypatch) -> list[PagedLatentCache]:
    """Every `PagedLatentCache` built while the test runs."""
    caches = []
    build = PagedLatentCache.__init__

    def build_and_keep(self, *args, **kwargs):
        build(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(PagedLatentCache, "__init__", build_and_keep)
    return caches


@pytest.mark.parametrize("cb_config", [None, ContinuousBatchingConfig(page_size=16)], ids=["no-config", "page-16"])
def test_default_pool_holds_the_requests_not_a_share_of_memory(built_caches, cb_config):
    """Without num_blocks (or max_memory_percent), generate_batch's pool is the requests' cached tokens (prompt and all
    new tokens but the last) rounded up to pages, and a step holds at most all the prompts: transformers would fill
    60 % of the RAM."""
    model = random_model()
    lengths, new_tokens = [5, 40, 17], 4
    prompts = prompts_of(lengths, model.config.vocab_size)
    config = greedy(model, new_tokens)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
    (cache,) = built_caches
    page = (cb_config or ContinuousBatchingConfig()).page_size
    blocks = sum(ceil((n + new_tokens - 1) / page) for n in lengths)
    assert cache.allocator.tokens_per_page == page and cache.allocator.num_blocks == blocks
    assert cache.num_sectors * cache.bytes_per_sector == blocks * cache.allocator.bytes_per_block
    assert cache.max_batch_tokens <= sum(lengths)
    for i, prompt in enumerate(prompts):
        assert outputs[f"req_{i}"].generated_tokens == own_generate(model, prompt, config), f"request {i}"


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def test_paged_generate_takes_left_padding_out_of_each_row():
    """Each row runs as its own request without its padding: its new tokens are those of its own `generate`, after
    the row as given; rows that end early are padded as `generate` pads them."""
    model = random_model()
    pad = model.config.pad_token_id
    rows = prompts_of([6, 11, 9], model.config.vocab_size, seed=4)
    ids, mask = left_padded(rows, pad)
    new_tokens = 5
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    paged = model.generate(ids, attention_mask=mask, generation_config=config, cache_implementation="paged",
                           continuous_batching_config=batching_config(16))  # fmt: skip
    assert paged.shape == (1, 3, ids.shape[1] + new_tokens)
    for i, row in enumerate(rows):
        own = own_generate(model, row, config)
        assert paged[0, i].tolist() == ids[i].tolist() + own + [pad] * (new_tokens - len(own)), f"row {i}"


def test_paged_generate_pads_rows_that_end_early_as_generate_does():
    """One row meets EOS early, the other does not: the result is `generate()`'s, token for token, padding
    included (transformers' own paged generate fails to make a tensor of the ragged rows)."""
    model = random_model()
    pad = model.config.pad_token_id
    rows = prompts_of([8, 8, 8, 8], model.config.vocab_size, seed=5)
    free = [own_generate(model, row, greedy(model, 6)) for row in rows]
    eos = free[0][1]  # the first row stops at its second new token
    other = next(i for i in range(1, len(rows)) if eos not in free[i])
    ids = torch.tensor([rows[0], rows[other]])
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    expected = model.generate(ids, generation_config=config)
    paged = model.generate(ids, generation_config=config, cache_implementation="paged",
                           continuous_batching_config=batching_config(8))  # fmt: skip
    assert expected[0, 8:].tolist() == [free[0][0], eos, pad, pad, pad, pad]
    torch.testing.assert_close(paged[0], expected, rtol=0, atol=0)


def test_paged_generate_reads_max_length_as_generate_does():
    """Without max_new_tokens, max_length counts the prompt (transformers' paged generate would pass no limit)."""
    model = random_model()
    ids = torch.tensor(prompts_of([9, 9], model.config.vocab_size, seed=6))
    config = GenerationConfig(max_length=12, do_sample=False, eos_token_id=None)
    paged = model.generate(ids, generation_config=config, cache_implementation="paged",
                           continuous_batching_config=batching_config(8))  # fmt: skip
    torch.testing.assert_close(paged[0], model.generate(ids, generation_config=config), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_length=9 leaves no new token after input_ids of length 9"):
        model.generate(ids, max_length=9, cache_implementation="paged", continuous_batching_config=batching_config(8))


@pytest.mark.parametrize(("call", "error", "message"), [
    (dict(use_mtp=True), ValueError, "use_mtp=True drafts with MTP module 1, but this model has none active"),
    (dict(generation_config=GenerationConfig(max_new_tokens=3, use_mtp=True)), ValueError,
     "use_mtp=True drafts with MTP module 1, but this model has none active"),
    (dict(logits_processor=LogitsProcessorList()), ValueError,
     r"generate\(cache_implementation='paged'\) does not take logits_processor"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), ValueError,
     r"attention_mask row 0 = \[1, 1, 1, 0\] is not left padding"),
    (dict(attention_mask=torch.ones(2, 3)), ValueError, r"attention_mask of shape \(2, 3\) must have input_ids' shape"),
    (dict(input_ids=torch.tensor([[5, 6, 7, 512], [5, 6, 7, 8]])), ValueError,
     r"1 of 2 requests failed: request 'req_0': input_ids\[3\] = 512 is outside the vocabulary"),
    (dict(num_beams=2), ValueError, "continuous batching does not implement num_beams=2"),
])  # fmt: skip
def test_paged_generate_refuses_what_it_cannot_do(call, error, message):
    model = random_model()
    attention = model.config._attn_implementation
    call = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), "max_new_tokens": 3, **call}
    with pytest.raises(error, match=message):
        model.generate(cache_implementation="paged", continuous_batching_config=batching_config(8), **call)
    assert_no_manager_left(model, attention)

"""MTP drafting inside continuous batching (`generate_batch(..., use_mtp=True)`): greedy outputs equal plain
continuous batching and each request's own `generate` (requests joining and leaving mid-run, chunked prompts), with
the module's own drafts, drafts forced right and drafts forced wrong; after every step each request's cached length
and blocks are exactly those plain batching holds; EOS and `max_new_tokens` stop inside accepted drafts; statistics
count what was drafted; sampled tokens follow the main model's distribution; bad options are refused."""

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import RequestStatus

from modeling_deepseek_v3.continuous_batching import KeepsDraftsOfDecodingRequests
from modeling_deepseek_v3.speculative_batching import SpeculativeBatchProcessor

from ..utils import random_model

PAGE = 4


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def batching(**overrides) -> ContinuousBatchingConfig:
    # 3 requests at a time and 24 tokens per step: later requests join as others finish, long prompts are chunked
    return ContinuousBatchingConfig(**{"num_blocks": 64, "page_size": PAGE, "max_batch_tokens": 24,
                                       "max_requests_per_batch": 3, **overrides})  # fmt: skip


def greedy(max_new_tokens: int, eos_token_id=None) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model(num_nextn_predict_layers=1)


def tokens_of(outputs: dict) -> dict[str, list[int]]:
    assert all(output.error is None for output in outputs.values())
    return {request_id: output.generated_tokens for request_id, output in outputs.items()}


@pytest.fixture
def checked_rollback(monkeypatch):
    """After every step of drafting, each live request's cached length is its prompt and generated tokens but the
    newest, and it holds exactly the blocks that length needs: what plain batching holds after the same tokens."""
    update = SpeculativeBatchProcessor.update_batch
    steps = []

    def update_and_check(self):
        update(self)
        for state in self.scheduler.active_requests.values():
            if state.generated_len() > 0:
                assert state.position_offset == len(state.initial_tokens) + state.generated_len() - 1
                blocks = self.cache.allocator.block_table[state.request_id]
                assert len(blocks) == -(-state.position_offset // PAGE), state.request_id
        steps.append(True)

    monkeypatch.setattr(SpeculativeBatchProcessor, "update_batch", update_and_check)
    return steps


def forced_drafts(monkeypatch, reference: dict[str, list[int]], wrong_at=None):
    """The drafts of each request replaced by its reference continuation (all accepted); with `wrong_at(step, depth)`
    true, that draft is changed to another token (it and the deeper ones rejected)."""
    counter = {"step": 0}

    def draft(self, model, requests, *processor_arguments):
        counter["step"] += 1
        drafts = []
        for fs in requests:
            done = fs.state.generated_len()
            row = reference[fs.state.request_id][done : done + fs.query_length - 1]
            if wrong_at is not None:
                row = [(t + 1) % model.config.vocab_size if wrong_at(counter["step"], d) else t
                       for d, t in enumerate(row, start=1)]  # fmt: skip
            drafts.append(row)
        return drafts, None  # greedy: no draft distributions

    monkeypatch.setattr(SpeculativeBatchProcessor, "_draft", draft)


@pytest.mark.parametrize(("num_draft_tokens", "seed"), [(1, 0), (2, 1), (2, 2)])
def test_greedy_drafting_equals_plain_batching_and_own_generate(model, num_draft_tokens, seed, checked_rollback):
    """7 prompts of 1 to 30 tokens through 3 slots: outputs equal plain continuous batching's and each request's own
    `generate`, and the run's statistics add up to the requests' own."""
    lengths = torch.randint(1, 31, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    prompts = prompts_of(lengths, model.config.vocab_size, seed)
    config = greedy(7)
    plain = tokens_of(model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching()))
    drafting = greedy(7)
    drafting.use_mtp, drafting.num_draft_tokens = True, num_draft_tokens
    with model.continuous_batching_context_manager(generation_config=drafting,
                                                   continuous_batching_config=batching()) as manager:  # fmt: skip
        ids = manager.add_requests(prompts)
        outputs = {request_id: manager.get_result(request_id=request_id, timeout=60) for request_id in ids}
        run = manager.batch_processor.speculative_stats
    assert tokens_of(outputs) == plain
    for i, prompt in enumerate(prompts):
        own = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
        assert plain[f"req_{i}"] == own
    assert checked_rollback
    own_stats = [output.speculative_stats for output in outputs.values()]
    assert run.row_steps == sum(s.row_steps for s in own_stats) and run.tokens == sum(s.tokens for s in own_stats)
    assert run.tokens == sum(len(t) - 1 for t in plain.values())  # every token but each prefill's first
    assert run.proposed[0] > 0 and len(run.proposed) == num_draft_tokens


@pytest.mark.parametrize("num_draft_tokens", [1, 3])
def test_drafts_forced_right_are_all_accepted(model, monkeypatch, num_draft_tokens, checked_rollback):
    prompts = prompts_of([5, 17, 2, 9, 26], model.config.vocab_size, seed=3)
    config = greedy(9)
    plain = tokens_of(model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching()))
    forced_drafts(monkeypatch, plain)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching(),
                                   use_mtp=True, num_draft_tokens=num_draft_tokens)  # fmt: skip
    assert tokens_of(outputs) == plain
    for output in outputs.values():
        stats = output.speculative_stats
        assert stats.accepted == stats.proposed and stats.accepted[0] > 0
        # each step gains its drafts and the bonus token; the last steps draft fewer (max_new_tokens)
        assert stats.row_steps == -(-(9 - 1) // (num_draft_tokens + 1))
        assert stats.tokens_per_forward > 1


def test_drafts_are_cut_to_the_steps_token_budget(model, monkeypatch, checked_rollback):
    """6 tokens per step for 3 requests drafting 3 each: a decoding request keeps the drafts that fit in what is left
    of the step (never split as a prompt), and outputs stay plain batching's."""
    prompts = prompts_of([5, 17, 2, 9], model.config.vocab_size, seed=7)
    config, tight = greedy(8), batching(max_batch_tokens=6)
    plain = tokens_of(model.generate_batch(prompts, generation_config=config, continuous_batching_config=tight))
    forced_drafts(monkeypatch, plain)
    schedule, cut = KeepsDraftsOfDecodingRequests._schedule_request, []

    def schedule_and_note(self, state, request_tokens, token_budget, *rest):
        cut.append(state.status == RequestStatus.DECODING and 1 < token_budget < len(request_tokens))
        schedule(self, state, request_tokens, token_budget, *rest)

    monkeypatch.setattr(KeepsDraftsOfDecodingRequests, "_schedule_request", schedule_and_note)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=tight,
                                   use_mtp=True, num_draft_tokens=3)  # fmt: skip
    assert tokens_of(outputs) == plain
    assert any(cut) and all(output.speculative_stats.accepted[0] for output in outputs.values())


def test_drafts_forced_wrong_are_all_rejected(model, monkeypatch, checked_rollback):
    prompts = prompts_of([5, 17, 2, 9, 26], model.config.vocab_size, seed=4)
    config = greedy(6)
    plain = tokens_of(model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching()))
    forced_drafts(monkeypatch, plain, wrong_at=lambda step, depth: True)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching(),
                                   use_mtp=True, num_draft_tokens=2)  # fmt: skip
    assert tokens_of(outputs) == plain
    for output in outputs.values():
        stats = output.speculative_stats
        assert stats.accepted == [0, 0] and stats.proposed[1] == 0 and stats.tokens_per_forward == 1


def test_partly_accepted_drafts_and_eos_inside_them(model, monkeypatch, checked_rollback):
    """Drafts right except at changing depths (each step keeps a different prefix), and an EOS id that the
    reference generates mid-way: every request stops at the same token as plain batching, never past it."""
    prompts = prompts_of([5, 17, 2, 9, 26, 11], model.config.vocab_size, seed=5)
    free = tokens_of(model.generate_batch(prompts, generation_config=greedy(12), continuous_batching_config=batching()))
    eos = free["req_1"][4]
    config = greedy(12, eos_token_id=eos)
    plain = tokens_of(model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching()))
    assert len(plain["req_1"]) == 5 and plain["req_1"][-1] == eos
    forced_drafts(monkeypatch, free, wrong_at=lambda step, depth: (step + depth) % 4 == 0)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching(),
                                   use_mtp=True, num_draft_tokens=3)  # fmt: skip
    assert tokens_of(outputs) == plain
    accepted = [a for output in outputs.values() for a in output.speculative_stats.accepted]
    assert any(accepted) and checked_rollback


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"num_draft_tokens": 0}, ValueError, "num_draft_tokens=0 is invalid: it must be an int >= 1"),
    ({"num_draft_tokens": -2}, ValueError, "num_draft_tokens=-2 is invalid"),
    ({"num_draft_tokens": 1.5}, ValueError, "num_draft_tokens=1.5 is invalid"),
    ({"num_draft_tokens": True}, ValueError, "num_draft_tokens=True is invalid"),
    ({"use_mtp": False, "num_draft_tokens": 2}, ValueError, "num_draft_tokens=2 .* it needs use_mtp=True"),
    ({"use_mtp": "yes"}, TypeError, "use_mtp = 'yes' .* must be True or False"),
    ({"do_sample": True, "num_return_sequences": 2}, ValueError, "use_mtp=True with num_return_sequences=2"),
])  # fmt: skip
def test_bad_drafting_options_are_refused(model, options, error, message):
    call = {"use_mtp": True, **options}
    with pytest.raises(error, match=message):
        model.generate_batch([[5, 6, 7]], generation_config=greedy(3), continuous_batching_config=batching(), **call)


def test_model_without_mtp_module_or_async_batching_is_refused(model):
    with pytest.raises(ValueError, match="use_mtp=True drafts with MTP module 1, but this model has none active"):
        random_model().generate_batch([[5, 6, 7]], generation_config=greedy(3), use_mtp=True)
    with pytest.raises(ValueError, match="use_mtp=True with use_async_batching=True"):
        model.generate_batch([[5, 6, 7]], generation_config=greedy(3), use_mtp=True,
                             continuous_batching_config=batching(use_async_batching=True))  # fmt: skip


def test_sampling_with_drafts_follows_the_main_models_distribution():
    """600 samples of 4 tokens after one prompt, on an 8-token vocabulary, drafting 2 tokens with an MTP module whose
    distribution differs from the main model's: the 2nd and 3rd tokens' frequencies match their exact marginals,
    computed from the main model's own forwards, within a total-variation distance of 0.08 (the sampling noise of 600
    draws is about 0.04)."""
    torch.manual_seed(0)
    small = random_model(num_nextn_predict_layers=1, vocab_size=8)
    with torch.no_grad():
        small.lm_head.weight.mul_(4)  # peaked distributions, so that a wrong rule shows
    prompt, samples = [3, 4, 5], 600
    config = GenerationConfig(max_new_tokens=4, do_sample=True, eos_token_id=-1, pad_token_id=0)  # no EOS
    outputs = small.generate_batch([prompt] * samples, generation_config=config, use_mtp=True, num_draft_tokens=2,
                                   continuous_batching_config=batching(max_batch_tokens=256,
                                                                       max_requests_per_batch=64))  # fmt: skip
    tokens = torch.tensor([output.generated_tokens for output in outputs.values()])  # [samples, 4]
    stats = [output.speculative_stats for output in outputs.values()]
    accepted, proposed = sum(s.accepted[0] for s in stats), sum(s.proposed[0] for s in stats)
    assert 0 < accepted < proposed  # both branches of the rule ran

    def next_probs(rows: torch.Tensor) -> torch.Tensor:  # [n, s] -> [n, V]
        with torch.no_grad():
            return torch.softmax(small(rows).logits[:, -1].float(), -1)

    vocab = small.config.vocab_size
    first = next_probs(torch.tensor([prompt]))[0]  # [V]
    pairs = torch.tensor([prompt + [a] for a in range(vocab)])
    second = next_probs(pairs)  # [V, V]: P(t2 | t1)
    triples = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
    third = next_probs(triples).view(vocab, vocab, vocab)  # P(t3 | t1, t2)
    exact_second = first @ second
    exact_third = torch.einsum("a,ab,abc->c", first, second, third)
    for column, exact in ((1, exact_second), (2, exact_third)):
        observed = torch.bincount(tokens[:, column], minlength=vocab).float() / samples
        assert 0.5 * (observed - exact).abs().sum() < 0.08, (column, observed, exact)


def test_the_modules_drafts_are_those_of_generate_with_use_mtp(monkeypatch):
    """With an MTP module that agrees with the main model most of the time (and reads its own attention), every
    draft MTP module 1 makes inside continuous batching, at each request's newest position, is the draft plain
    `generate(use_mtp=True)` makes there for that prompt alone: the module's paged rows and the positions it
    catches up on are right."""
    from ..utils import agreeing_mtp_model, recorded_drafts

    torch.manual_seed(0)
    agreeing = agreeing_mtp_model(1, context_weight=0.3, mtp_context_weight=0.3)
    prompts = prompts_of([5, 17, 2, 9, 26], agreeing.config.vocab_size, seed=6)
    batched, alone, current = recorded_drafts(monkeypatch)
    config = greedy(10)
    outputs = agreeing.generate_batch(prompts, generation_config=config, continuous_batching_config=batching(),
                                      use_mtp=True, num_draft_tokens=1)  # fmt: skip
    for current["prompt"], prompt in enumerate(prompts):
        agreeing.generate(torch.tensor([prompt]), generation_config=config, use_mtp=True)
    common = batched.keys() & alone.keys()
    assert len(common) >= 20 and {key: batched[key] for key in common} == {key: alone[key] for key in common}
    assert sum(output.speculative_stats.accepted[0] for output in outputs.values()) > 10


def test_drafting_over_fp8_pages_equals_plain_batching_over_them():
    """MTP drafting and the FP8 latent pages together: the drafter's page is FP8 too, and greedy outputs equal plain
    continuous batching over FP8 pages."""
    torch.manual_seed(3)
    model = random_model(num_nextn_predict_layers=1, first_k_dense_replace=3)  # dense: no expert flips under FP8
    prompts = prompts_of([4, 11, 2, 7], model.config.vocab_size, seed=3)
    fp8 = {"cache_dtype": "fp8", "scale_fmt": "ue8m0"}
    plain = tokens_of(model.generate_batch(prompts, max_new_tokens=6, do_sample=False, cache_config=fp8,
                                           continuous_batching_config=batching()))  # fmt: skip
    outputs = model.generate_batch(prompts, max_new_tokens=6, do_sample=False, cache_config=fp8, use_mtp=True,
                                   num_draft_tokens=2, continuous_batching_config=batching())  # fmt: skip
    assert tokens_of(outputs) == plain
    assert all(output.speculative_stats.proposed[0] > 0 for output in outputs.values())  # the drafts ran

"""Self-speculative decoding with the MTP modules (`generate(use_mtp=True)`): greedy output identical to plain greedy
decoding, sampled output distributed as plain sampling, batches with left padding, and clear errors."""

import functools
from importlib import resources

import pytest
import torch
from transformers import MaxTimeCriteria, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from modeling_deepseek_v3 import generation
from modeling_deepseek_v3.attention import MultiHeadLatentAttention
from modeling_deepseek_v3.demo import train_tokenizer

from ..utils import agreeing_mtp_model, random_ids, random_model, reference_mtp_logits, tiny_config

PROMPT_LENGTHS = (7, 3, 5)


def left_padded(config, lengths):
    pad, width = config.pad_token_id, max(lengths)
    prompts = [random_ids(config, 1, n)[0] for n in lengths]
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    return ids, mask


def speculative(model, ids, **kwargs):
    """`generate(use_mtp=True)`: the sequences and the call's `SpeculativeStats`."""
    out = model.generate(ids, use_mtp=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, out.speculative_stats


def both(model, ids, mask, **kwargs):
    plain = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    return plain, *speculative(model, ids, attention_mask=mask, do_sample=False, **kwargs)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("drafter", ["agreeing", "random"])
def test_greedy_equals_plain_greedy(depth, batch, drafter):
    if drafter == "agreeing":  # drafts accepted part of the time: rows accept different numbers of tokens
        model = agreeing_mtp_model(depth, context_weight=0.3)
    else:  # drafts (nearly) always rejected
        model = random_model(tiny_config(num_nextn_predict_layers=depth))
    ids, mask = left_padded(model.config, PROMPT_LENGTHS[:batch])
    plain, drafted, stats = both(model, ids, mask if batch > 1 else None, max_new_tokens=20)
    assert plain.shape == (batch, ids.shape[1] + 20)
    assert torch.equal(drafted, plain)
    if batch == 1:
        assert stats.main_forwards == 1 + stats.row_steps and stats.tokens == 19
    if drafter == "agreeing":
        assert 0.2 < stats.acceptance_rate < 0.95 and 1.2 < stats.tokens_per_forward < depth + 1
        assert stats.main_forwards < 20  # fewer main forwards than tokens
        assert len(stats.acceptance_rate_per_depth) == depth


@pytest.mark.parametrize("depth", [1, 2])
def test_eos_and_max_new_tokens_inside_a_draft(depth):
    """With every draft accepted (a pure bigram model) a step emits D + 1 tokens: generated token i >= 2 is slot
    (i - 2) % (D + 1) of its step, slot D being the main model's own token. An EOS or the length limit at a smaller
    slot falls inside the accepted drafts, whose later tokens must be dropped."""
    model = agreeing_mtp_model(depth, context_weight=0.0)
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    plain, drafted, stats = both(model, ids, mask, max_new_tokens=depth + 3)  # ends on slot 0 of the second step
    assert torch.equal(drafted, plain) and stats.acceptance_rate == 1.0

    width = ids.shape[1]
    row0 = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)[0, width:].tolist()
    eos = next(t for i, t in enumerate(row0, start=1)
               if i >= 2 and (i - 2) % (depth + 1) < depth and t not in row0[: i - 1])
    plain, drafted, _ = both(model, ids, mask, max_new_tokens=24, eos_token_id=eos)
    assert torch.equal(drafted, plain)
    stop = row0.index(eos) + 1
    assert plain[0, width + stop - 1] == eos and (plain[0, width + stop :] == model.config.pad_token_id).all()
    assert plain.shape[1] > width + stop  # other rows went on


@pytest.mark.parametrize(
    "depth, lengths", [(2, PROMPT_LENGTHS), (3, (6, 1, 2)), (4, (6, 1, 2))], ids=["D2", "D3-short-prompts",
                                                                                "D4-short-prompts"]
)
def test_drafts_equal_the_mtp_chain_on_the_accepted_tokens(monkeypatch, depth, lengths):
    """The incremental MTP state (cropped draft slots, carried hidden states, masked rejected slots, per-row
    positions) gives at every step the logits that the MTP chain gives when recomputed from scratch on each row's
    accepted tokens alone (no padding, no cache). Prompts shorter than D leave early carries empty."""
    model = agreeing_mtp_model(depth, context_weight=0.3, mtp_context_weight=0.3)
    calls = []  # (k, position of the last column [b], logits of the last column [b, V]) of every drafting call

    def spy(lm, k, token_embeds, previous_hidden, position_ids, *args, **kwargs):
        hidden, logits = original(lm, k, token_embeds, previous_hidden, position_ids, *args, **kwargs)
        calls.append((k, position_ids[:, -1].clone(), logits[:, -1].clone()))
        return hidden, logits

    original = generation.mtp_step
    monkeypatch.setattr(generation, "mtp_step", spy)
    ids, mask = left_padded(model.config, lengths)
    out, stats = speculative(model, ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert 0 < stats.acceptance_rate_per_depth[0] < 1 and 0 < stats.acceptance_rate_per_depth[1] < 1
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False))
    rows = [torch.cat([ids[r, mask[r].bool()], out[r, ids.shape[1] :]]) for r in range(len(lengths))]
    steps = [calls[i : i + depth] for i in range(0, len(calls), depth)]  # modules 1..D of each drafting step
    checked = 0
    for step in steps:
        assert [k for k, _, _ in step] == list(range(1, depth + 1))
        newest = step[0][1] + 1  # module 1's last column reads the newest accepted token t_n at position n - 1
        drafts = torch.stack([logits.argmax(-1) for _, _, logits in step], 1)  # greedy drafts [b, D]
        for r, row in enumerate(rows):
            n = int(newest[r])  # the row's tokens t_0 .. t_n are accepted
            if n + 1 > len(row):
                continue  # the row had finished
            # depth k at position n - 1 reads t_{n+k-1}: the newest accepted token, then the drafts (the last draft
            # only as the dummy input that lets the reference run depth D at position n - 1)
            reference = reference_mtp_logits(model, torch.cat([row[: n + 1], drafts[r]])[None])
            for k, (_, _, logits) in enumerate(step):
                torch.testing.assert_close(logits[r], reference[k][0, n - 1], rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked > 10


def test_verification_runs_the_absorbed_path(monkeypatch):
    model = agreeing_mtp_model(2, context_weight=0.3)
    calls = []  # (layer, queries, absorbed) of every attention call
    original = MultiHeadLatentAttention.use_absorbed

    def spy(self, s, t):
        absorbed = original(self, s, t)
        calls.append((self.layer_idx, s, absorbed))
        return absorbed

    monkeypatch.setattr(MultiHeadLatentAttention, "use_absorbed", spy)
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_mtp=True)
    verification = [absorbed for layer, s, absorbed in calls if layer < model.config.num_hidden_layers and s == 3]
    assert verification and all(verification)


def test_generation_config_return_dict_and_stats():
    model = agreeing_mtp_model(1, context_weight=0.3)
    ids = random_ids(model.config, 1, 6)
    plain = model.generate(ids, max_new_tokens=16, do_sample=False)
    model.generation_config.use_mtp = True  # the generation config's field routes there too
    out = model.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, plain)
    stats = out.speculative_stats
    assert stats.tokens == 15 and stats.row_steps == stats.main_forwards - 1
    assert stats.proposed == [stats.row_steps] and stats.tokens_per_forward == 15 / stats.row_steps
    assert stats.acceptance_rate == stats.accepted[0] / stats.row_steps


def _p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with an expected count under 5 are pooled into one."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2).item()  # P(chi2_dof > statistic)


@pytest.mark.parametrize("depth", [1, 2])
def test_sampling_matches_the_plain_sampling_distribution(depth):
    """On a 16-token vocabulary, with temperature, top-k and top-p: the 2nd and 3rd generated tokens (the ones the
    speculative steps produce) of 6000 independent rows follow the exact distribution of plain sampling, computed by
    enumerating every continuation. Chi-square goodness of fit at significance level 0.001 (seeded, deterministic)."""
    torch.manual_seed(11)
    model = random_model(tiny_config(vocab_size=16, num_nextn_predict_layers=depth, eos_token_id=None))
    warp = dict(temperature=0.8, top_k=10, top_p=0.95)
    prompt = torch.tensor([[5, 9, 3, 12]])
    n = 6000
    torch.manual_seed(0)
    out, stats = speculative(model, prompt.expand(n, -1), do_sample=True, max_new_tokens=3, **warp)
    assert 0.1 < stats.acceptance_rate < 0.9  # both the accept and the reject branch ran many times

    # the warpers generate() builds for these settings, in its order
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(10), TopPLogitsWarper(0.95)])

    def next_probs(seqs):
        logits = model(seqs).logits[:, -1]
        return torch.softmax(processors(seqs, logits), dim=-1)

    with torch.no_grad():
        p1 = next_probs(prompt)[0]  # [V]
        seqs1 = torch.cat([prompt.expand(16, -1), torch.arange(16)[:, None]], 1)
        p2 = next_probs(seqs1)  # [t1, t2]
        joint12 = p1[:, None] * p2
        seqs2 = torch.cat([seqs1.repeat_interleave(16, 0), torch.arange(16).repeat(16)[:, None]], 1)
        p3 = next_probs(seqs2).view(16, 16, 16)  # [t1, t2, t3]
        exact2, exact3 = joint12.sum(0), (joint12[..., None] * p3).sum((0, 1))
        # what "always accept the draft" would give for t2: depth 1's distribution, as a power check
        q2 = torch.softmax(processors(seqs2, reference_mtp_logits(model, seqs2)[0][:, 3]), -1)[::16]  # [t1, t2]
        drafted2 = (p1[:, None] * q2).sum(0)

    alpha = 0.001
    for column, exact in ((5, exact2), (6, exact3)):
        counts = torch.bincount(out[:, column], minlength=16).double()
        assert _p_value(counts, exact.double()) > alpha, column
    assert _p_value((drafted2 * n).double(), exact2.double()) < 1e-12  # a test this size would catch it


@pytest.mark.parametrize(
    "overrides, kwargs, match",
    [
        (dict(num_nextn_predict_layers=0), {}, "num_nextn_predict_layers=0"),
        (dict(use_mtp_modules=False), {}, "use_mtp_modules=False"),
        ({}, dict(num_beams=2), "beam search"),
        ({}, dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
        ({}, dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
        ({}, dict(cache_implementation="static"), "cache_implementation='static'"),
    ],
    ids=["no-modules", "switched-off", "beams", "repetition-penalty", "scores", "static-cache"],
)
def test_unsupported_requests_are_clear_errors(overrides, kwargs, match):
    model = random_model(tiny_config(**{"num_nextn_predict_layers": 1, **overrides}))
    with pytest.raises(ValueError, match=match):
        model.generate(random_ids(model.config, 1, 4), max_new_tokens=4, use_mtp=True, **kwargs)


@pytest.mark.parametrize("value", ["no", 1, "True", 0, ""])
def test_use_mtp_must_be_a_bool(value):
    """Given to generate or set in the generation config; falsy non-bools (0, "") are not taken for False."""
    from transformers import GenerationConfig

    model = random_model(tiny_config(num_nextn_predict_layers=1))
    with pytest.raises(TypeError, match=f"use_mtp = {value!r} .*must be True or False"):
        model.generate(random_ids(model.config, 1, 4), max_new_tokens=4, use_mtp=value)
    config = GenerationConfig(max_new_tokens=4)
    config.use_mtp = value
    with pytest.raises(TypeError, match=f"use_mtp = {value!r} .*must be True or False"):
        model.generate(random_ids(model.config, 1, 4), generation_config=config)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
        (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
        (dict(dola_layers="low"), "dola_layers"),
        (dict(prefill_chunk_size=2), "prefill_chunk_size"),
        (dict(num_assistant_tokens=5), "num_assistant_tokens"),
    ],
)
def test_fields_of_other_decoding_methods_are_refused_not_dropped(kwargs, field):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match=f"does not use .*'{field}'"):
        model.generate(random_ids(model.config, 1, 4), max_new_tokens=4, use_mtp=True, **kwargs)


class Recording(BaseStreamer):
    """Every `put` and `end` call, in order."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


@pytest.mark.parametrize("batch", [1, 3])
def test_a_streamer_receives_what_plain_decoding_streams(batch):
    """Accepted drafts reach the streamer in order, as plain decoding's calls: the prompt, then one column of the
    batch per token (a finished row's column holding the pad id), then `end()`."""
    model = agreeing_mtp_model(2, context_weight=0.3)
    ids, mask = left_padded(model.config, PROMPT_LENGTHS[:batch])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    eos = int(free[-1, ids.shape[1] + 12])  # the last row ends at its 13th token, the others run on or end too
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    plain, drafted = Recording(), Recording()
    expected = model.generate(ids, streamer=plain, **kwargs)
    out = model.generate(ids, streamer=drafted, use_mtp=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, expected) and out.speculative_stats.tokens_per_forward > 1.2
    assert drafted.calls == plain.calls and plain.calls[-1] == "end"
    assert len(plain.calls) == 2 + expected.shape[1] - ids.shape[1]


def test_text_streamer_prints_the_plain_text(capsys):
    tokenizer = shakespeare_tokenizer()
    model = agreeing_mtp_model(1, context_weight=0.3)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    texts = []
    for use_mtp in (False, True):
        model.generate(ids, max_new_tokens=16, do_sample=False, streamer=TextStreamer(tokenizer), use_mtp=use_mtp)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:") + 8


@functools.cache
def shakespeare_tokenizer():
    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")
    return train_tokenizer(text[:20_000], vocab_size=tiny_config().vocab_size)


def test_stop_strings_stop_at_the_token_plain_decoding_stops_at():
    """A stop string found in the middle of plain greedy output: both loops stop at the same token of each row, the
    speculative one within a step whose drafts ran past it."""
    tokenizer = shakespeare_tokenizer()
    model = agreeing_mtp_model(2, context_weight=0.3, eos_token_id=1)
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(free[0, ids.shape[1] + 8 :])
    stop = text[: max(len(text) // 4, 2)]  # text of the 9th token on: row 0 stops early
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    plain = model.generate(ids, **kwargs)
    drafted = model.generate(ids, use_mtp=True, **kwargs)
    assert torch.equal(drafted, plain)
    assert (plain[0, ids.shape[1] + 9 :] == model.config.pad_token_id).any()  # row 0 stopped before the end


def test_stopping_criteria_stop_each_row_where_plain_decoding_does():
    """A caller's criterion (stop a row at its first token from a set) sees each row's ids up to every new token."""

    class StopAt(StoppingCriteria):
        def __init__(self, tokens):
            self.tokens = torch.tensor(tokens)

        def __call__(self, input_ids, scores, **kwargs):
            return torch.isin(input_ids[:, -1], self.tokens)

    model = agreeing_mtp_model(2, context_weight=0.3, eos_token_id=1)  # with an EOS id a stopped row is padded
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    criteria = StoppingCriteriaList([StopAt([int(free[0, ids.shape[1] + 10]), int(free[2, ids.shape[1] + 5])])])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, stopping_criteria=criteria)
    drafted = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_mtp=True,
                             stopping_criteria=criteria)
    assert torch.equal(drafted, plain) and not torch.equal(plain, free)


def test_stopping_a_row_of_a_batch_without_eos_is_refused():
    """Without an EOS id plain decoding keeps generating for a row a criterion stopped: refused, saying so."""
    model = agreeing_mtp_model(1, context_weight=0.3, eos_token_id=None)
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    criteria = StoppingCriteriaList([MaxTimeCriteria(60.0)])
    with pytest.raises(ValueError, match="MaxTimeCriteria only with an eos_token_id.*keeps generating"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, use_mtp=True, stopping_criteria=criteria)
    model.generate(ids[:1], max_new_tokens=4, use_mtp=True, stopping_criteria=criteria)  # one row: no ambiguity


def test_stop_strings_without_a_tokenizer_say_so():
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match=r"stop_strings = \['x'\] needs the model's tokenizer.*tokenizer=\.\.\."):
        model.generate(random_ids(model.config, 1, 4), max_new_tokens=4, use_mtp=True, stop_strings=["x"])


@pytest.mark.parametrize("depth", [1, 2])
def test_later_steps_of_a_left_padded_batch_sample_the_plain_distribution(depth):
    """The 4th generated token of the left-padded rows of a mixed batch (so carried MTP states, masked rejected
    slots and per-row positions all take part) follows the exact plain-sampling distribution, enumerated over every
    continuation of the unpadded prompt. Chi-square goodness of fit at significance level 0.001."""
    torch.manual_seed(5)
    model = random_model(tiny_config(vocab_size=16, num_nextn_predict_layers=depth, eos_token_id=None,
                                     pad_token_id=0))
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # peaked next-token distributions, so a wrong context shows in the counts
    long, short = [7, 2, 9, 4, 11], [6, 13]
    n = 3000
    ids = torch.tensor([long, [0] * 3 + short] * n)
    mask = torch.tensor([[1] * 5, [0] * 3 + [1] * 2] * n)
    torch.manual_seed(1)
    out, stats = speculative(model, ids, attention_mask=mask, do_sample=True, max_new_tokens=4, temperature=0.9)
    assert 0.1 < stats.acceptance_rate < 0.9

    processors = LogitsProcessorList([TemperatureLogitsWarper(0.9)])
    def fourth_token(prompt: list[int]) -> torch.Tensor:
        """P(4th generated token) after `prompt`: every continuation of 1, 2, 3 tokens with its probability."""
        with torch.no_grad():
            seqs, joint = torch.tensor([prompt]), torch.ones(1)
            for _ in range(3):
                probs = torch.softmax(processors(seqs, model(seqs).logits[:, -1]), -1)  # [rows, V]
                joint = (joint[:, None] * probs).flatten()
                seqs = torch.cat([seqs.repeat_interleave(16, 0), torch.arange(16).repeat(len(seqs))[:, None]], 1)
            return (joint[:, None] * torch.softmax(processors(seqs, model(seqs).logits[:, -1]), -1)).sum(0).double()

    counts = torch.bincount(out[1::2, -1], minlength=16).double()
    assert _p_value(counts, fourth_token(short)) > 0.001
    assert _p_value(counts, fourth_token([0] * 3 + short)) < 1e-6  # attending the padding would be caught


def test_a_saved_use_mtp_flag_routes_to_this_loop_and_can_be_switched_off(tmp_path):
    """`generation_config.use_mtp` is transformers' own flag too: saved in a folder, it must run this package's loop
    (any batch size), and `use_mtp=False` must give plain decoding, never transformers' batch-1 MTP drafter."""
    model = agreeing_mtp_model(1, context_weight=0.3)
    model.generation_config.use_mtp = True
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.generation_config.use_mtp
    ids, mask = left_padded(model.config, PROMPT_LENGTHS)
    plain = reloaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_mtp=False)
    drafted = reloaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                return_dict_in_generate=True)
    assert torch.equal(drafted.sequences, plain) and drafted.speculative_stats.row_steps > 0


def test_verification_forwards_check_shapes_but_not_values():
    """The loop's verification forward passes `check_values=False`: its ids and mask come from the model, and
    reading them back every step would stall an accelerator (plain decoding's one-token steps are not read back
    either). Shapes are still checked."""
    model = random_model()
    ids = random_ids(model.config, 1, 4)
    mask = torch.tensor([[1, 2, 1, 1]])  # 2 is no padding flag: a value only a read-back finds
    with pytest.raises(ValueError, match="padding mask of 1 .token. and 0 .padding., but it holds 2"):
        model.model(ids, attention_mask=mask)
    model.model(ids, attention_mask=mask, check_values=False)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.model(ids, attention_mask=mask[:, :3], check_values=False)
    drafting = agreeing_mtp_model(1, context_weight=0.3)
    calls = []  # (new tokens, check_values) of every decoder call of the loop
    hook = drafting.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("check_values", True))),
        with_kwargs=True,
    )
    drafting.generate(random_ids(drafting.config, 1, 5), max_new_tokens=6, do_sample=False, use_mtp=True)
    hook.remove()
    assert calls[0] == (5, True)  # the prompt is checked
    assert len(calls) > 1 and calls[1:] == [(2, False)] * (len(calls) - 1)  # every verification of 1 draft is not

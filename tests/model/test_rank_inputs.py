"""Ranks that share a batch (tensor and pipeline parallelism) must receive the same inputs: two CPU processes (gloo)
given different prompts are refused at the prompt with the same `ValueError` on both, whether the prompts have the
same length or not (no abort, no hang); the same prompts decode with one check, at the prompt only. Under FSDP ranks
decode their own prompts (`test_parallel.py`, `speculative_uneven`), which nothing here checks."""

from __future__ import annotations

import pytest
import torch
from transformers.distributed import DistributedConfig

import modeling_deepseek_v3.rank_inputs as rank_inputs
from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.cache import MLACache
from modeling_deepseek_v3.rank_inputs import FIELD_SIZE, FIELDS, is_prompt, mismatch_message, summarize

from ..multiprocess import run_ranks
from ..utils import random_ids, random_model, tiny_config

LAYOUTS = {"tp": dict(tp_size=2), "pp": dict(pp_size=2)}
NEW_TOKENS = 3
RANKS_TIMEOUT = 120  # seconds: a hang in a collective fails the test rather than the suite


def refusal(call) -> str | None:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def worker(rank: int, layout: str, folder: str, out: str) -> None:
    model = DeepseekV3ForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(**LAYOUTS[layout]),
                                                  dtype=torch.float32)
    prompts = torch.load(f"{folder}/prompts.pt")
    results = {}
    with torch.no_grad():  # the same length, other tokens on rank 1
        results["same_length"] = refusal(lambda: model(prompts["same_length"][rank]))
    results["other_length"] = refusal(
        lambda: model.generate(prompts["other_length"][rank], max_new_tokens=NEW_TOKENS, do_sample=False)
    )
    checks = []  # the same prompt on both ranks: one check, at the prompt, none at the decode or verification steps
    check = rank_inputs.check_same_inputs
    rank_inputs.check_same_inputs = lambda *args: (checks.append(args[0]["input_ids"].shape), check(*args))
    for use_mtp in (False, True):
        results[use_mtp] = model.generate(prompts["same_length"][0], max_new_tokens=NEW_TOKENS, do_sample=False,
                                          use_mtp=use_mtp)
        results[use_mtp, "checks"], checks[:] = list(checks), []
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_inputs")
    torch.manual_seed(0)
    config = tiny_config(num_nextn_predict_layers=1)
    model = random_model(config)
    model.save_pretrained(root)
    same = random_ids(config, 1, 6)
    other = same.clone()
    other[0, 3] = (other[0, 3] + 1) % config.vocab_size
    prompts = dict(same_length=[same, other], other_length=[random_ids(config, 1, 7), random_ids(config, 1, 5)])
    torch.save(prompts, root / "prompts.pt")
    generated = model.generate(same, max_new_tokens=NEW_TOKENS, do_sample=False)
    return root, generated


@pytest.mark.slow  # 15 to 25 s per layout on 2 shared cores
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_given_different_prompts_are_refused(folder, tmp_path, layout):
    root, generated = folder
    run_ranks(worker, layout, str(root), str(tmp_path), timeout=RANKS_TIMEOUT)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for case in ("same_length", "other_length"):
        assert results[0][case] == results[1][case]  # the same error on every rank
    same, other = results[0]["same_length"], results[0]["other_length"]
    assert same is not None and other is not None
    for message in (same, other):
        assert "every rank computing on one batch must receive the same inputs" in message
    assert "input_ids differ in value (their checksums differ)" in same
    assert "rank 0: input_ids of shape (1, 6); rank 1: input_ids of shape (1, 6)" in same
    assert "input_ids differ in shape" in other
    assert "rank 0: input_ids of shape (1, 7)" in other and "rank 1: input_ids of shape (1, 5)" in other
    for result in results:  # the same prompts still decode as one process does, checked once
        for use_mtp in (False, True):
            assert torch.equal(result[use_mtp], generated)
            assert result[use_mtp, "checks"] == [torch.Size([1, 6])]


def test_summaries_tell_apart_what_the_ranks_must_share():
    ids = torch.tensor([[5, 6, 7]])
    swapped = torch.tensor([[6, 5, 7]])  # the same sum: the position weights tell it apart
    base = summarize(dict(input_ids=ids))
    assert torch.equal(base, summarize(dict(input_ids=ids.clone())))
    assert not torch.equal(base, summarize(dict(input_ids=swapped)))
    assert not torch.equal(base, summarize(dict(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1]]))))
    embeds = torch.randn(1, 3, 4)
    nudged = embeds.clone()
    nudged[0, 1, 2] = torch.nextafter(nudged[0, 1, 2], torch.tensor(1.0))  # one bit apart
    assert summarize(dict(inputs_embeds=embeds)).shape == (len(FIELDS) * FIELD_SIZE,)
    assert not torch.equal(summarize(dict(inputs_embeds=embeds)), summarize(dict(inputs_embeds=nudged)))
    message = mismatch_message([base.tolist(), summarize(dict(input_ids=[[5, 6, 7]])).tolist()], [0, 1])
    assert "input_ids differ in shape" in message
    assert "rank 0: input_ids of shape (1, 3); rank 1: input_ids (not a tensor of at most 4 dimensions)" in message


def test_prompts_are_more_than_one_token_or_the_first_forward():
    """Where the ranks gather their summaries: never at a one-token step into a filled cache (decoding)."""
    model = random_model(tiny_config(num_nextn_predict_layers=0))
    ids = random_ids(model.config, 1, 4)
    cache = MLACache(model.config)
    assert is_prompt(ids[:, :1], None, 0) and is_prompt(ids[:, :1], cache, 0)  # the first forward of generate
    with torch.no_grad():
        model(ids[:, :3], cache=cache)
    assert is_prompt(ids[:, 2:], cache, 0)  # two new tokens: a prompt continued
    assert not is_prompt(ids[:, 3:], cache, 0)  # a decode step
    assert is_prompt(ids[0], cache, 0)  # malformed: gathered, then the model names it

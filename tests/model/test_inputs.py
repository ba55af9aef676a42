"""Bad call arguments of the model are clear `ValueError` / `TypeError`s that name the argument, the value or shape,
and the rule, raised before anything is computed; and inputs on which transformers is silently wrong are handled."""

import math

import pytest
import torch
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import MLACache
from modeling_deepseek_v3.inputs import reads_back

from ..utils import random_ids, random_model

B, S, H = 2, 6, 64  # the tiny preset's hidden size


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def ids(model):
    return random_ids(model.config, B, S)


CASES = [
    # (name, kwargs built from the ids, error type, message pattern)
    ("ids-float", lambda ids: dict(input_ids=ids.float()), TypeError, r"input_ids must hold integers, got dtype"),
    ("ids-list", lambda ids: dict(input_ids=ids.tolist()), TypeError, r"input_ids must be a torch.Tensor, got list"),
    ("ids-1d", lambda ids: dict(input_ids=ids[0]), ValueError, r"input_ids must be \[batch, seq\].*shape \(6,\)"),
    ("embeds-2d", lambda ids: dict(inputs_embeds=torch.randn(S, H)), ValueError,
     r"inputs_embeds must be \[batch, seq, hidden_size=64\].*shape \(6, 64\)"),
    ("embeds-width", lambda ids: dict(inputs_embeds=torch.randn(B, S, 32)), ValueError,
     r"inputs_embeds must be \[batch, seq, hidden_size=64\].*shape \(2, 6, 32\)"),
    ("embeds-int", lambda ids: dict(inputs_embeds=torch.ones(B, S, H, dtype=torch.long)), TypeError,
     r"inputs_embeds must be floating point, got dtype torch.int64"),
    ("embeds-float64", lambda ids: dict(inputs_embeds=torch.randn(B, S, H, dtype=torch.float64)), TypeError,
     r"inputs_embeds has dtype torch.float64 but the model computes in torch.float32"),
    ("mask-1d", lambda ids: dict(input_ids=ids, attention_mask=torch.ones(S)), ValueError,
     r"attention_mask must be 2-D .* or a prepared 4-D mask .*got shape \(6,\)"),
    ("mask-3d", lambda ids: dict(input_ids=ids, attention_mask=torch.ones(B, S, S)), ValueError,
     r"attention_mask must be 2-D .*got shape \(2, 6, 6\)"),
    ("mask-additive-2d", lambda ids: dict(input_ids=ids, attention_mask=torch.zeros(B, S).index_fill_(1, torch.tensor(
        [0]), -math.inf)), ValueError, r"2-D attention_mask is a padding mask of 1 \(token\) and 0 \(padding\), but "
     r"it holds -inf. An additive mask .* must be given 4-D"),
    ("mask-4d-shape", lambda ids: dict(input_ids=ids, attention_mask=torch.ones(B, 1, S, S + 1, dtype=torch.bool)),
     ValueError, r"4-D attention_mask must be \[batch, heads, seq, keys\] = \[2 or 1, 1 or 4, 6, 6\], got shape "
     r"\(2, 1, 6, 7\)"),
    ("mask-4d-int", lambda ids: dict(input_ids=ids, attention_mask=torch.ones(B, 1, S, S, dtype=torch.long)),
     TypeError, r"4-D attention_mask must be boolean .* or additive floating point .*got dtype torch.int64"),
    ("positions-batch", lambda ids: dict(input_ids=ids, position_ids=torch.arange(S).expand(3, -1)), ValueError,
     r"position_ids must be \[batch, seq\] = \(2, 6\) \(or \[1, 6\], shared\), got shape \(3, 6\)"),
    ("positions-1d", lambda ids: dict(input_ids=ids, position_ids=torch.arange(S)), ValueError,
     r"position_ids must be \[batch, seq\].*got shape \(6,\)"),
    ("positions-float", lambda ids: dict(input_ids=ids, position_ids=torch.arange(S)[None].float()), TypeError,
     r"position_ids must hold integers, got dtype torch.float32"),
    ("positions-negative", lambda ids: dict(input_ids=ids, position_ids=torch.arange(S)[None] - 1), ValueError,
     r"position_ids contains -1; positions must be >= 0"),
    ("labels-batch", lambda ids: dict(input_ids=ids, labels=ids[:1]), ValueError,
     r"labels has shape \(1, 6\), expected \[batch, seq\] = \(2, 6\)"),
    ("labels-float", lambda ids: dict(input_ids=ids, labels=ids.float()), TypeError,
     r"labels must hold integers, got dtype torch.float32"),
    ("labels-outside-vocab", lambda ids: dict(input_ids=ids, labels=ids.index_fill(1, torch.tensor([2]), 600)),
     ValueError, r"labels contains 600, neither a token id in \[0, 512\) nor -100"),
    ("labels-negative", lambda ids: dict(input_ids=ids, labels=ids.index_fill(1, torch.tensor([2]), -5)),
     ValueError, r"labels contains -5"),
    ("keep-negative", lambda ids: dict(input_ids=ids, logits_to_keep=-1), ValueError,
     r"logits_to_keep = -1 is invalid: it must be 0 \(all positions\) or the number of last positions"),
    ("keep-too-many", lambda ids: dict(input_ids=ids, logits_to_keep=7), ValueError,
     r"logits_to_keep = 7 is invalid: .*at most the 6 given"),
    ("keep-bool", lambda ids: dict(input_ids=ids, logits_to_keep=True), TypeError,
     r"logits_to_keep must be an int or a 1-D integer tensor, got True"),
    ("keep-float", lambda ids: dict(input_ids=ids, logits_to_keep=1.5), TypeError, r"logits_to_keep must be an int"),
    ("keep-2d", lambda ids: dict(input_ids=ids, logits_to_keep=torch.tensor([[0, 1]])), ValueError,
     r"logits_to_keep as a tensor must be 1-D positions, got shape \(1, 2\)"),
    ("keep-outside", lambda ids: dict(input_ids=ids, logits_to_keep=torch.tensor([0, 6])), ValueError,
     r"logits_to_keep contains position 6, outside \[-6, 6\)"),
    ("cache-tuple", lambda ids: dict(input_ids=ids, cache=((torch.zeros(1),),)), TypeError,
     r"cache must be a transformers Cache \(such as MLACache\), got tuple"),
]


@pytest.mark.parametrize("make_kwargs, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_a_clear_error(model, ids, make_kwargs, error, match):
    with pytest.raises(error, match=match):
        model(**make_kwargs(ids))


def test_a_cache_of_another_batch_dtype_or_model_is_refused(model, ids):
    cache = MLACache(model.config)
    model(ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"cache holds 2 sequences but the inputs have batch 3"):
        model(random_ids(model.config, 3, 1), cache=cache, use_cache=True)
    bf16 = random_model().to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"cache holds torch.float32 latents but the model computes in torch.bfloat16"):
        bf16(ids[:, :1], cache=cache, use_cache=True)
    short = MLACache(model.config, num_layers=model.config.num_hidden_layers - 1)
    with pytest.raises(ValueError, match=r"cache has 2 layers but the model has num_hidden_layers = 3"):
        model(ids, cache=short, use_cache=True)
    assert cache.get_seq_length() == S  # the refused calls added nothing


def test_a_refused_training_call_leaves_no_state():
    model = random_model().train()
    ids = random_ids(model.config, B, S)
    with pytest.raises(ValueError, match="labels contains 600"):
        model(ids, labels=ids.index_fill(1, torch.tensor([2]), 600))
    assert model.expert_balance.pending == {}  # no tokens were counted
    assert model.training_metrics.pop() == {}  # and no loss or balance metric recorded


def test_one_token_decode_steps_on_an_accelerator_are_not_read_back():
    """Value checks read the inputs back to the host: on an accelerator only for prompts (no queue stall per decode
    step), on CPU always."""
    assert not reads_back(1, torch.device("cuda"))
    assert reads_back(2, torch.device("cuda")) and reads_back(1, torch.device("cpu"))


def test_labels_without_targets_give_zero_loss_where_transformers_gives_nan(tmp_path):
    model = random_model().train()
    ids = random_ids(model.config, B, S)
    no_targets = torch.full_like(ids, -100)
    out = model(ids, labels=no_targets)
    assert out.loss.item() == out.balance_loss.item()  # the language-model term is 0; the routers still balance
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.save_pretrained(tmp_path)
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.isnan(builtin(ids, labels=no_targets).loss)  # the mean over no target at all
    # with targets, the loss is still their mean
    model.eval()
    labels = ids.index_fill(1, torch.tensor([0, 1, 2]), -100)
    torch.testing.assert_close(model(ids, labels=labels).loss, builtin(ids, labels=labels).loss, rtol=1e-6, atol=0)


def test_an_additive_2d_mask_is_refused_where_transformers_inverts_it(tmp_path):
    """transformers casts a 2-D mask to bool, so an additive 0 / -inf mask attends the masked token and masks the
    others; ours refuses it, and the 4-D additive form it points to works."""
    model = random_model()
    ids = random_ids(model.config, 1, S)
    additive = torch.zeros(1, S)
    additive[0, 0] = -math.inf  # meaning: do not attend token 0
    with pytest.raises(ValueError, match="padding mask of 1"):
        model(ids, attention_mask=additive)
    model.save_pretrained(tmp_path)
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    padded = torch.ones(1, S, dtype=torch.long)
    padded[0, 0] = 0
    intended = builtin(ids, attention_mask=padded).logits
    assert not torch.allclose(builtin(ids, attention_mask=additive).logits[0, 1:], intended[0, 1:], atol=1e-4)
    causal = torch.full((S, S), -math.inf).triu(1)
    causal[:, 0] = -math.inf
    causal[0, 0] = 0.0  # a query attends at least itself
    torch.testing.assert_close(model(ids, attention_mask=causal[None, None]).logits[0, 1:],
                               model(ids, attention_mask=padded).logits[0, 1:], rtol=1e-5, atol=1e-5)

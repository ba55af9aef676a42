"""Training-time expert balancing (DESIGN §4): token counts, the routing-bias update, the sequence-wise balance
loss, and their metrics."""

import pytest
import torch

from modeling_deepseek_v3.moe import MoE, TopkRouter, sequence_balance_loss, update_routing_biases

from .utils import random_ids, random_model, tiny_config

GAMMA = 0.001


def routers(model) -> list[TopkRouter]:
    return [m for m in model.modules() if isinstance(m, TopkRouter)]


def counts(model) -> list[torch.Tensor]:
    return [r.tokens_per_expert.clone() for r in routers(model)]


def hand_counts(model, ids, attention_mask=None) -> list[torch.Tensor]:
    """Loads from the routers' own choices on the gate inputs, captured by hooks in an eval forward."""
    inputs = []
    hooks = [r.register_forward_hook(lambda mod, args, out: inputs.append(out[1])) for r in routers(model)]
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    keep = None if attention_mask is None else attention_mask.flatten().bool()
    return [torch.bincount((idx if keep is None else idx[keep]).flatten(), minlength=model.config.n_routed_experts)
            for idx in inputs]


def test_update_moves_each_bias_by_gamma_towards_the_mean():
    router = TopkRouter(tiny_config(n_routed_experts=8))
    router.e_score_correction_bias.normal_()
    before = router.e_score_correction_bias.clone()
    router.tokens_per_expert = torch.tensor([4, 0, 2, 2, 1, 3, 2, 2])  # mean 2
    (load,) = update_routing_biases([router], GAMMA)
    step = torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]) * GAMMA
    assert torch.equal(router.e_score_correction_bias, before + step)
    assert load.tolist() == [4, 0, 2, 2, 1, 3, 2, 2]
    assert router.tokens_per_expert is None  # reset for the next step


def test_training_forward_counts_real_tokens_and_the_update_uses_them():
    model = random_model()
    ids = random_ids(model.config, 3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding is not counted
    mask[2, :1] = 0
    expected = hand_counts(model, ids, mask)
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for got, want in zip(counts(model), expected):
        assert torch.equal(got, want)
        assert got.sum() == mask.sum() * model.config.num_experts_per_tok
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    loads = model.update_routing_bias()
    for router, b0, load in zip(routers(model), before, loads.values()):
        load = load.float()
        assert torch.equal(router.e_score_correction_bias, b0 + GAMMA * torch.sign(load.mean() - load))
    assert list(loads) == [f"model.layers.{i}" for i in range(1, model.config.num_hidden_layers)]


def test_gradient_accumulation_equals_one_large_batch():
    ids = random_ids(tiny_config(), 8, 6)
    accumulated, single = random_model(), random_model()
    single.load_state_dict(accumulated.state_dict())
    accumulated.train()
    single.train()
    for micro in ids.chunk(4):
        accumulated(micro, labels=micro).loss.backward()
    single(ids, labels=ids).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(counts(accumulated), counts(single)))
    accumulated.update_routing_bias()
    single.update_routing_bias()
    for a, b in zip(routers(accumulated), routers(single)):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_once(reentrant):
    model = random_model(seq_balance_loss_alpha=0.0)  # reentrant checkpointing cannot train the balance loss
    ids = random_ids(model.config, 2, 7)
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = counts(model)
    for router in routers(model):
        router.tokens_per_expert = None  # a bias update would change the routing
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    model(ids, labels=ids).loss.backward()  # the backward replays every layer's forward
    assert all(torch.equal(a, b) for a, b in zip(counts(model), plain))


def test_reentrant_checkpointing_with_balance_loss_is_an_error():
    model = random_model()
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    ids = random_ids(model.config, 2, 5)
    with pytest.raises(ValueError, match="use_reentrant=False, or set seq_balance_loss_alpha=0"):
        model(ids, labels=ids)


def test_eval_and_no_grad_forwards_leave_the_bias_unchanged():
    model = random_model()
    ids = random_ids(model.config, 2, 5)
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    model.eval()
    model(ids, labels=ids)
    model.train()
    with torch.no_grad():
        model(ids, labels=ids)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    loads = model.update_routing_bias()
    assert all(load.sum() == 0 for load in loads.values())
    assert all(torch.equal(r.e_score_correction_bias, b) for r, b in zip(routers(model), before))


def test_zero_speed_freezes_the_bias_and_still_reports_the_load():
    model = random_model(routing_bias_update_speed=0.0)
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    model.train()
    ids = random_ids(model.config, 2, 5)
    model(ids, labels=ids).loss.backward()
    loads = model.update_routing_bias()
    assert all(load.sum() == 10 * model.config.num_experts_per_tok for load in loads.values())
    assert all(torch.equal(r.e_score_correction_bias, b) for r, b in zip(routers(model), before))


def balance_loss_reference(scores, indices, mask, alpha):
    """DESIGN §4 written out per sequence and expert, with loops."""
    b, s, e = scores.shape
    k = indices.shape[-1]
    per_sequence = []
    for row in range(b):
        tokens = [t for t in range(s) if mask[row, t]]
        if not tokens:
            continue
        total = 0.0
        for i in range(e):
            f = e / (k * len(tokens)) * sum(float(i in indices[row, t].tolist()) for t in tokens)
            p = sum(scores[row, t, i] / scores[row, t].sum() for t in tokens) / len(tokens)
            total = total + f * p
        per_sequence.append(total)
    return alpha * sum(per_sequence) / len(per_sequence)


def test_balance_loss_equals_the_reference_and_its_gradient_flows_through_p_only():
    b, s, e, k, alpha = 3, 5, 8, 2, 0.01
    logits = torch.randn(b, s, e, requires_grad=True)
    scores = logits.sigmoid()
    indices = scores.topk(k, dim=-1).indices
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, :] = False  # a sequence of padding only is left out
    got = sequence_balance_loss(scores, indices, mask, alpha)
    want = balance_loss_reference(scores, indices, mask, alpha)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(got, logits, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-9)
    assert grad[1].abs().sum() == 0 and grad[0, :2].abs().sum() == 0  # padding gets no gradient


def test_balance_loss_is_added_to_the_loss_and_reaches_the_router():
    model = random_model(seq_balance_loss_alpha=0.5)
    ids = random_ids(model.config, 2, 6)
    model.train()
    out = model(ids, labels=ids)
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, main + out.balance_loss)
    gate = next(m.gate for m in model.modules() if isinstance(m, MoE))
    (grad,) = torch.autograd.grad(out.balance_loss, gate.weight)
    assert grad.abs().sum() > 0
    metrics = model.training_metrics.pop()
    per_layer = [v for name, v in metrics.items() if name.startswith("balance_loss/")]
    assert len(per_layer) == model.config.num_hidden_layers - 1
    assert metrics["balance_loss"] == pytest.approx(sum(per_layer), rel=1e-6)
    assert metrics["balance_loss"] == pytest.approx(out.balance_loss.item(), rel=1e-6)


def test_update_records_max_over_mean_load():
    model = random_model()
    model.train()
    ids = random_ids(model.config, 2, 8)
    model(ids, labels=ids).loss.backward()
    loads = model.update_routing_bias()
    metrics = model.training_metrics.pop()
    ratios = {name: (load.max() / load.float().mean()).item() for name, load in loads.items()}
    for name, ratio in ratios.items():
        assert metrics[f"expert_load_max_over_mean/{name}"] == pytest.approx(ratio)
    assert metrics["expert_load_max_over_mean"] == pytest.approx(max(ratios.values()))

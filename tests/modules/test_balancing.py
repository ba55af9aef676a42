"""Training-time expert balancing: token counts, the routing-bias update after every optimizer step in any training
loop, the sequence-wise balance loss, their metrics, and that no routing state outlives its forward."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_deepseek_v3 import DeepseekV3Trainer
from modeling_deepseek_v3.balancing import ExpertBalance, RoutingLog, sequence_balance_loss
from modeling_deepseek_v3.metrics import TrainingMetrics
from modeling_deepseek_v3.moe import MoE

from ..utils import random_ids, random_model, tiny_config

GAMMA = 0.001


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def biases(model) -> list[torch.Tensor]:
    return [m.gate.e_score_correction_bias.clone() for m in moe_layers(model)]


def counts(model) -> dict[int, torch.Tensor]:
    return {layer: c.clone() for layer, c in model.expert_balance.pending.items()}


def assert_same_counts(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor]) -> None:
    assert want and got.keys() == want.keys()  # something was counted, for the same layers
    assert all(torch.equal(got[layer], want[layer]) for layer in want)


def hand_counts(model, ids, attention_mask=None) -> dict[int, torch.Tensor]:
    """Loads from the routers' own choices, captured by hooks in an eval forward."""
    chosen = {}
    hooks = [m.gate.register_forward_hook(lambda mod, args, out, layer=m.layer_idx: chosen.update({layer: out.indices}))
             for m in moe_layers(model)]
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=attention_mask)
    for h in hooks:
        h.remove()
    keep = None if attention_mask is None else attention_mask.flatten().bool()
    return {layer: torch.bincount((idx if keep is None else idx[keep]).flatten(),
                                  minlength=model.config.n_routed_experts) for layer, idx in chosen.items()}


def test_update_moves_each_bias_by_gamma_towards_the_mean():
    balance = ExpertBalance(TrainingMetrics(), lambda layer: f"layer{layer}")
    bias = torch.randn(8)
    before = bias.clone()
    log = RoutingLog(recording=True)
    log.counts[3] = torch.tensor([4, 0, 2, 2, 1, 3, 2, 2])  # mean 2
    log.close()
    balance.end_forward(log, gradients_pending=False)
    loads = balance.update({3: bias}, GAMMA)
    step = torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]) * GAMMA
    assert torch.equal(bias, before + step)
    assert loads["layer3"].tolist() == [4, 0, 2, 2, 1, 3, 2, 2]
    assert balance.pending == {}  # reset for the next step


def test_training_forward_counts_real_tokens_and_the_update_uses_them():
    model = random_model()
    ids = random_ids(model.config, 3, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding is not counted
    mask[2, :1] = 0
    expected = hand_counts(model, ids, mask)
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    got = counts(model)
    assert got.keys() == expected.keys()
    for layer, want in expected.items():
        assert torch.equal(got[layer], want) and want.sum() == mask.sum() * model.config.num_experts_per_tok
    before = biases(model)
    loads = model.update_routing_bias()
    assert list(loads) == [f"model.layers.{i}" for i in range(1, model.config.num_hidden_layers)]
    for b0, b1, load in zip(before, biases(model), loads.values()):
        load = load.float()
        assert torch.equal(b1, b0 + GAMMA * torch.sign(load.mean() - load))


def test_gradient_accumulation_equals_one_large_batch():
    ids = random_ids(tiny_config(), 8, 6)
    accumulated, single = random_model(), random_model()
    single.load_state_dict(accumulated.state_dict())
    accumulated.train()
    single.train()
    for micro in ids.chunk(4):
        accumulated(micro, labels=micro).loss.backward()
    single(ids, labels=ids).loss.backward()
    assert_same_counts(counts(accumulated), counts(single))
    accumulated.update_routing_bias()
    single.update_routing_bias()
    assert all(torch.equal(a, b) for a, b in zip(biases(accumulated), biases(single)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_once(reentrant):
    model = random_model(seq_balance_loss_alpha=0.0)  # reentrant checkpointing cannot train the balance loss
    ids = random_ids(model.config, 2, 7)
    model.train()
    model(ids, labels=ids).loss.backward()
    plain = counts(model)
    model.discard_routing_counts()
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    model(ids, labels=ids).loss.backward()  # the backward replays every layer's forward
    assert_same_counts(counts(model), plain)


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
    before = biases(model)
    model.eval()
    model(ids, labels=ids)
    model.train()
    with torch.no_grad():
        model(ids, labels=ids)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    loads = model.update_routing_bias()
    assert all(load.sum() == 0 for load in loads.values())
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before))


def test_zero_speed_freezes_the_bias_and_still_reports_the_load():
    model = random_model(routing_bias_update_speed=0.0)
    before = biases(model)
    model.train()
    ids = random_ids(model.config, 2, 5)
    model(ids, labels=ids).loss.backward()
    loads = model.update_routing_bias()
    assert all(load.sum() == 10 * model.config.num_experts_per_tok for load in loads.values())
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before))


def balance_loss_reference(scores, indices, mask, alpha):
    """The balance loss written out per sequence and expert, with loops."""
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


def test_balance_loss_of_a_batch_is_the_mean_over_its_sequences():
    """Without an attention mask too: each sequence is balanced on its own, whatever else is in the batch."""
    model = random_model(seq_balance_loss_alpha=0.5)
    ids = random_ids(model.config, 3, 6)
    model.train()
    alone = torch.stack([model(row[None], labels=row[None]).balance_loss for row in ids])
    torch.testing.assert_close(model(ids, labels=ids).balance_loss, alone.mean(), rtol=1e-6, atol=0)


def test_balance_loss_is_added_to_the_loss_and_reaches_the_router():
    model = random_model(seq_balance_loss_alpha=0.5)
    ids = random_ids(model.config, 2, 6)
    model.train()
    out = model(ids, labels=ids)
    main = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, main + out.balance_loss)
    (grad,) = torch.autograd.grad(out.balance_loss, moe_layers(model)[0].gate.weight)
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


def bias_steps(before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
    """How many ±γ steps each bias took, `[layers, E]`, checked to be whole."""
    steps = (torch.stack(after) - torch.stack(before)) / GAMMA
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    return steps.round()


def hand_loop(model, batches, accumulation: int, optimizer_class=torch.optim.SGD) -> None:
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    model.train()
    for i, batch in enumerate(batches, start=1):
        model(batch, labels=batch).loss.backward()
        if i % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad()


def test_a_hand_written_loop_moves_the_bias_once_per_optimizer_step():
    """No call to update_routing_bias: the optimizer step does it, once per accumulation cycle, exactly as one
    explicit update per step after the same forwards."""
    batches = random_ids(tiny_config(), 12, 6).chunk(6)
    auto = random_model()
    manual = random_model(routing_bias_auto_update=False)
    manual.load_state_dict(auto.state_dict())
    before = biases(auto)
    hand_loop(auto, batches, accumulation=2)
    optimizer = torch.optim.SGD(manual.parameters(), lr=1e-3)
    manual.train()
    for i, batch in enumerate(batches, start=1):
        manual(batch, labels=batch).loss.backward()
        if i % 2 == 0:
            optimizer.step()
            manual.update_routing_bias()
            optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(biases(auto), biases(manual)))
    steps = bias_steps(before, biases(auto))
    assert steps.abs().max() == 3 and (steps.abs().sum(-1) > 0).all()  # 3 steps of ±γ (or 0) per expert


def test_the_switch_leaves_the_update_to_the_user():
    model = random_model(routing_bias_auto_update=False)
    before = biases(model)
    hand_loop(model, random_ids(model.config, 4, 6).chunk(2), accumulation=1)
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before))
    assert sum(c.sum() for c in counts(model).values()) > 0  # counted, waiting for update_routing_bias()


def test_a_frozen_router_keeps_its_bias_and_the_others_move(caplog):
    model = random_model()
    router = moe_layers(model)[0].gate
    router.weight.requires_grad_(False)
    before = biases(model)
    with caplog.at_level("WARNING"):
        hand_loop(model, random_ids(model.config, 4, 6).chunk(2), accumulation=1)
    assert "routers of ['model.layers.1'] are frozen" in caplog.text
    after = biases(model)
    assert torch.equal(after[0], before[0])
    assert bias_steps(before[1:], after[1:]).abs().sum() > 0


def test_an_optimizer_of_another_model_does_not_move_the_bias():
    model, other = random_model(), torch.nn.Linear(2, 2)
    model.train()
    ids = random_ids(model.config, 2, 5)
    model(ids, labels=ids).loss.backward()
    before = biases(model)
    other(torch.randn(1, 2)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before))


def test_a_step_skipped_by_loss_scaling_drops_its_counts():
    """A step whose gradients were cleared without an optimizer step (GradScaler found inf) does not count: the
    next step moves the bias by its own tokens only."""
    batches = random_ids(tiny_config(), 8, 6).chunk(4)
    skipping, clean = random_model(), random_model()
    clean.load_state_dict(skipping.state_dict())
    skipping.train()
    skipping(batches[0], labels=batches[0]).loss.backward()
    skipping.zero_grad()  # what a skipped step leaves: no optimizer.step(), gradients cleared
    before = biases(clean)
    hand_loop(skipping, batches[1:3], accumulation=2)
    hand_loop(clean, batches[1:3], accumulation=2)
    assert bias_steps(before, biases(clean)).abs().max() == 1  # the one step moved the biases
    assert all(torch.equal(a, b) for a, b in zip(biases(skipping), biases(clean)))


def test_a_forward_that_raised_leaves_nothing_behind():
    model, clean = random_model(), random_model()
    clean.load_state_dict(model.state_dict())
    ids = random_ids(model.config, 2, 6)
    model.train()
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        model(ids, labels=ids)
    handle.remove()
    assert counts(model) == {} and model.training_metrics.pop() == {}
    model.eval()
    clean.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, clean(ids, labels=ids).loss)
    model.train()
    clean.train()
    model(ids, labels=ids).loss.backward()
    clean(ids, labels=ids).loss.backward()
    assert_same_counts(counts(model), counts(clean))


class BiasOracle:
    """The expected bias after each optimizer step, computed independently of the model's bookkeeping: the routers'
    own choices on the step's micro-batches (captured from its training forwards and run again in eval), then
    `b_i + γ · sign(mean(load) − load_i)`. Call `before_step()` right before the optimizer step, `after_step()` right
    after it."""

    def __init__(self, model) -> None:
        self.model = model
        self.micro_batches: list[torch.Tensor] = []
        self.steps = 0
        self.expected: list[torch.Tensor] = []
        model.register_forward_pre_hook(self.capture, with_kwargs=True)

    def capture(self, module, args, kwargs) -> None:
        if module.training and torch.is_grad_enabled():
            self.micro_batches.append((args[0] if args else kwargs["input_ids"]).detach().clone())

    def before_step(self) -> None:
        loads = hand_counts(self.model, torch.cat(self.micro_batches))
        self.model.train()
        self.expected = []
        for bias, load in zip(biases(self.model), loads.values()):
            load = load.to(bias.dtype)
            self.expected.append(bias + GAMMA * torch.sign(load.mean() - load))
        self.micro_batches = []

    def after_step(self) -> None:
        assert all(torch.equal(got, want) for got, want in zip(biases(self.model), self.expected)), self.steps
        self.steps += 1


class OracleCallback(TrainerCallback):
    def __init__(self, oracle: BiasOracle) -> None:
        self.oracle = oracle

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.oracle.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.oracle.after_step()


@pytest.mark.parametrize("trainer_class", [Trainer, DeepseekV3Trainer])
def test_trainer_moves_the_bias_by_gamma_once_per_optimizer_step(tmp_path, trainer_class):
    """Gradient accumulation 2: after each of the 3 optimizer steps the bias is exactly the oracle's, from the tokens
    of that step's two micro-batches; a plain Trainer needs nothing of ours."""
    model = random_model()
    oracle = BiasOracle(model)
    ids = random_ids(model.config, 12, 6)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = trainer_class(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                            callbacks=[OracleCallback(oracle)])
    trainer.train()
    assert oracle.steps == 3


def test_an_accelerate_loop_moves_the_bias_by_gamma_once_per_optimizer_step():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = random_model()
    oracle = BiasOracle(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(random_ids(model.config, 12, 6), batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(batch, labels=batch).loss)
            if accelerator.sync_gradients:
                oracle.before_step()
            optimizer.step()  # accelerate steps the torch optimizer at the end of each accumulation cycle only
            if accelerator.sync_gradients:
                oracle.after_step()
            optimizer.zero_grad()
    assert oracle.steps == 3


def fp16_loop(model, batches, init_scale: float) -> list[float]:
    """fp16 autocast with a GradScaler; returns the scale after each step (it drops when a step overflowed)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-10, growth_interval=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    scales = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(batch, labels=batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skips optimizer.step() when the gradients hold inf or NaN
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    return scales


def test_a_step_that_fp16_loss_scaling_skips_leaves_the_bias_and_drops_its_counts():
    """A real overflow: under fp16 autocast GradScaler's default first scale (2^16) overflows the gradients, so the
    first optimizer step is skipped. The bias does not move for it, and its counts do not reach the next steps: the
    run ends as a run that never saw the skipped batch."""
    batches = random_ids(tiny_config(), 6, 6).chunk(3)
    skipping, clean = random_model(), random_model()
    clean.load_state_dict(skipping.state_dict())
    before = biases(skipping)
    assert fp16_loop(skipping, batches, init_scale=2.0**16) == [64.0, 64.0, 64.0]  # only the first step overflowed
    assert fp16_loop(clean, batches[1:], init_scale=64.0) == [64.0, 64.0]
    assert all(torch.equal(a, b) for a, b in zip(biases(skipping), biases(clean)))
    assert bias_steps(before, biases(skipping)).abs().max() == 2  # two steps of ±γ, none for the skipped one


def test_training_metrics_average_each_name_and_forget_them():
    metrics = TrainingMetrics()
    metrics.add("loss", torch.tensor(1.0))
    metrics.add("loss", 2.0)  # a float beside tensors
    metrics.add_each("mtp_{}_loss", torch.tensor([3.0, 5.0]))
    assert metrics.pop(distributed=True) == {"loss": 1.5, "mtp_1_loss": 3.0, "mtp_2_loss": 5.0}  # one process
    assert metrics.pop(distributed=True) == {}


def test_several_forwards_then_one_backward_count_every_micro_batch():
    """Accumulation written by hand as a sum of micro-batch losses with one backward: every micro-batch's tokens move
    the bias, exactly as one forward over the whole batch."""
    ids = random_ids(tiny_config(), 8, 6)
    summed, single = random_model(), random_model()
    single.load_state_dict(summed.state_dict())
    summed.train()
    single.train()
    sum(summed(micro, labels=micro).loss for micro in ids.chunk(4)).backward()
    single(ids, labels=ids).loss.backward()
    for model in (summed, single):
        torch.optim.SGD(model.parameters(), lr=1e-3).step()  # the step moves the biases by itself
    loads = summed.expert_balance.last_loads
    assert all(load.sum() == ids.numel() * summed.config.num_experts_per_tok for load in loads.values())
    assert all(torch.equal(a, b) for a, b in zip(loads.values(), single.expert_balance.last_loads.values()))
    assert all(torch.equal(a, b) for a, b in zip(biases(summed), biases(single)))


def test_only_an_optimizer_holding_a_router_moves_its_bias():
    """The bias belongs to its router: a step of an optimizer without the routers (here the output head only) moves
    no bias and leaves the counts to the optimizer that holds the routers, whichever steps first."""
    model = random_model()
    routers = [m.gate.weight for m in moe_layers(model)]
    head_only = torch.optim.SGD([model.lm_head.weight], lr=1e-3)
    rest = torch.optim.SGD([p for p in model.parameters() if p is not model.lm_head.weight], lr=1e-3)
    ids = random_ids(model.config, 4, 6)
    reference = random_model()
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference(ids, labels=ids).loss.backward()
    expected = reference.update_routing_bias()
    before = biases(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    head_only.step()
    assert all(torch.equal(a, b) for a, b in zip(biases(model), before))
    rest.step()
    moved = bias_steps(before, biases(model))
    assert len(routers) == 2 and (moved.abs().sum(-1) > 0).all()
    for step, load in zip(moved, expected.values()):  # by every token of the step, none taken by head_only
        assert torch.equal(step, torch.sign(load.float().mean() - load.float()))

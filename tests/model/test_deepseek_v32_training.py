"""Training DeepSeek-V3.2's lightning indexer in the report's two stages (`indexer_training_stage`): the KL loss
against a computation written out here, which parameters each loss reaches, that the losses fall, and Trainer's log.

The hand computation forms the main attention's logits per head in the expanded form (`kv_b_proj` applied to the
FP8-rounded latent) and reads the index scores from the indexer's `queries`/`keys`/`scores` (checked against
DeepSeek's own code in test_deepseek_v32.py); the target, the top-k choice and the KL are written out per query."""

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_v3 import DeepseekV3Trainer, load_preset
from modeling_deepseek_v3.indexer import fp8_round_trip
from modeling_deepseek_v3.indexer_training import indexer_kl
from modeling_deepseek_v3.rope import apply_rope

from ..utils import random_ids, random_model
from .test_trainer import arguments, dataset


def v32_model(stage: str | None, seed: int = 0, **overrides):
    """A tiny V3.2 model with trainable fp32 weights (no FP8) and random norms; `initializer_range` 0.1 makes the
    main attention peaked, so that its distribution is far from the untrained indexer's."""
    torch.manual_seed(seed)
    config = load_preset("tiny-deepseek-v32", quantization_config=None, indexer_training_stage=stage,
                         use_cache=False, initializer_range=0.1, **overrides)
    return random_model(config).train()


def is_indexer(name: str) -> bool:
    return ".indexer." in name


def attention_inputs(model) -> list:
    """Hooks that record each decoder layer's attention input `(x, (cos, sin))`."""
    seen = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda module, args: seen.append((module, args[0], args[1])))
    return seen


def hand_logits(mla, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The main attention's logits `[b, h, s, t]` (before the causal mask) and the index scores `[b, s, t]`."""
    b, s, _ = x.shape
    q_latent = mla.q_a_layernorm(mla.q_a_proj(x))
    q_nope, q_pe = mla.q_b_proj(q_latent).view(b, s, -1, mla.qk_head_dim).split(
        [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    c_kv, k_pe = mla.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    kv = mla.kv_b_proj(fp8_round_trip(mla.kv_a_layernorm(c_kv))).view(b, s, -1, mla.qk_nope_head_dim + mla.v_head_dim)
    logits = (torch.einsum("bshn,bthn->bhst", q_nope, kv[..., : mla.qk_nope_head_dim])
              + torch.einsum("bshr,btr->bhst", apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)))
    index = mla.indexer.scores(*mla.indexer.queries(x, q_latent, cos, sin), *mla.indexer.keys(x, cos, sin))
    return logits * mla.softmax_scale, index


def hand_indexer_loss(seen, topk: int | None) -> torch.Tensor:
    """Mean over layers of the mean over queries of KL(p_t ‖ softmax(I_t)) over the keys the query attends to: every
    causal key (topk None), or the `topk` best by index score, over which each head's softmax is then taken."""
    layers = []
    with torch.no_grad():
        for mla, x, (cos, sin) in seen:
            logits, index = hand_logits(mla, x.float(), cos, sin)
            b, s, _ = x.shape
            kls = []
            for i in range(b):
                for t in range(s):
                    keys = torch.arange(t + 1)
                    if topk is not None:
                        keys = index[i, t, : t + 1].topk(min(topk, t + 1)).indices
                    p = logits[i, :, t, keys].softmax(dim=-1).sum(dim=0)
                    p = p / p.sum()
                    log_q = index[i, t, keys].log_softmax(dim=-1)
                    kls.append((p * (p.log() - log_q)).sum())
            layers.append(torch.stack(kls).mean())
    return torch.stack(layers).mean()


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_indexer_loss_equals_a_hand_computation(stage):
    model = v32_model(stage)
    seen = attention_inputs(model)
    ids = random_ids(model.config, 2, 14)  # 14 > index_topk 8: the sparse stage attends to a strict subset
    out = model(ids)  # without labels: the decoder layers only (no MTP module)
    assert len(seen) == model.config.num_hidden_layers
    expected = hand_indexer_loss(seen, None if stage == "dense_warmup" else model.config.index_topk)
    assert expected > 1e-2  # far from a trivially matching 0
    torch.testing.assert_close(out.indexer_loss.detach(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_left_padding_leaves_the_indexer_loss_of_a_sequence_as_alone(stage):
    """Padding queries attend to no key and are not counted; padding keys are never in the target or the softmax."""
    model = v32_model(stage)
    short = random_ids(model.config, 1, 12)[0]
    batch = torch.cat((torch.full((5,), 2), short))[None]
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).indexer_loss
    torch.testing.assert_close(padded, model(short[None]).indexer_loss, rtol=1e-4, atol=1e-6)
    padded.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_kl_skips_queries_without_keys_and_masked_slots():
    torch.manual_seed(1)
    probs, scores = torch.rand(2, 3, 4, 5).softmax(-1), torch.randn(2, 3, 5, requires_grad=True)
    valid = torch.rand(2, 3, 5) > 0.4
    valid[0, 1] = False  # a padding query
    valid[1, 2] = True
    kl_sum, queries = indexer_kl(probs, scores, valid)
    expected = []
    for i in range(2):
        for t in range(3):
            keys = valid[i, t].nonzero()[:, 0]
            if len(keys):
                p = probs[i, t][:, keys].sum(0)
                p = p / p.sum()
                expected.append((p * (p.log() - scores[i, t, keys].log_softmax(-1))).sum())
    assert queries == len(expected) == valid.any(-1).sum()
    torch.testing.assert_close(kl_sum, torch.stack(expected).sum())
    kl_sum.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[0, 1].eq(0).all() and scores.grad[~valid].eq(0).all()


def test_warmup_trains_only_the_indexer_and_its_loss_falls():
    model = v32_model("dense_warmup")
    ids = random_ids(model.config, 1, 12)
    model(ids, labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {name for name, _ in model.named_parameters() if is_indexer(name)}  # MTP layer's included
    frozen = {name: t.clone() for name, t in model.state_dict().items() if not is_indexer(name)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # every parameter: the others must get no update
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(ids).indexer_loss  # without labels: no MTP module, a shorter step
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert all(torch.equal(model.state_dict()[name], t) for name, t in frozen.items())  # routing biases included


def test_sparse_stage_detaches_the_indexer_and_the_lm_loss_trains_the_rest():
    model = v32_model("sparse")
    ids = random_ids(model.config, 2, 14)
    out = model(ids, labels=ids)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model.eval()(ids).logits)  # the release's sparse forward
    model.train()
    indexer = [p for name, p in model.named_parameters() if is_indexer(name)]
    rest = [p for name, p in model.named_parameters() if not is_indexer(name)]
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert all(g is None for g in torch.autograd.grad(lm, indexer, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(out.indexer_loss, rest, retain_graph=True, allow_unused=True))
    decoder_indexer = [p for name, p in model.named_parameters() if is_indexer(name) and "layers.2." not in name]
    grads = torch.autograd.grad(out.indexer_loss, decoder_indexer, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)  # through the FP8 rounding too (wq_b, wk, k_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = lm.item()
    for _ in range(8):
        optimizer.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
    last = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert last < 0.9 * first, (first, last)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_activation_checkpointing_gives_the_same_gradients(stage):
    model = v32_model(stage)
    ids = random_ids(model.config, 2, 12)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, plain), (checkpointed_loss, checkpointed) = grads
    torch.testing.assert_close(checkpointed_loss, loss)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_trainer_logs_the_indexer_loss(tmp_path, stage):
    model = v32_model(stage)
    trainer = DeepseekV3Trainer(model=model, args=arguments(tmp_path, max_steps=2, per_device_train_batch_size=2),
                                train_dataset=dataset(model.config, rows=4, length=8))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["indexer_loss"] > 0 for entry in logs)


def test_training_without_a_stage_is_refused():
    model = v32_model(None)
    ids = random_ids(model.config, 1, 6)
    with pytest.raises(ValueError, match="config.indexer_training_stage to 'dense_warmup' or 'sparse'"):
        model(ids, labels=ids)
    with torch.no_grad():
        assert model(ids, labels=ids).indexer_loss is None  # a forward that trains nothing needs no stage


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse"])
def test_a_loss_computed_outside_the_model_is_refused(stage):
    """Trainer with label smoothing calls the model with num_items_in_batch and no labels: the indexer loss would be
    left out of its loss."""
    model = v32_model(stage, use_mtp_modules=False, seq_balance_loss_alpha=0.0)
    ids = random_ids(model.config, 1, 6)
    with pytest.raises(ValueError, match=rf"leave out DeepSeek-V3.2's indexer loss \(indexer_training_stage='{stage}'"):
        model(ids, num_items_in_batch=torch.tensor(5))


@pytest.mark.parametrize("field, value, rule", [
    ("indexer_training_stage", "warmup", r"must be one of \(None, 'dense_warmup', 'sparse'\)"),
    ("indexer_training_stage", "off", "must be one of"),
    ("indexer_loss_weight", -1.0, "must be a finite non-negative number"),
    ("indexer_loss_weight", float("nan"), "must be a finite non-negative number"),
])
def test_bad_training_fields_are_refused(field, value, rule):
    with pytest.raises(ValueError, match=rf"`{field}` = .* is invalid: {rule}"):
        load_preset("tiny-deepseek-v32", **{field: value})


def test_a_bad_stage_set_after_construction_is_refused_by_the_training_forward():
    model = v32_model(None)
    model.config.indexer_training_stage = "warm-up"
    ids = random_ids(model.config, 1, 6)
    with pytest.raises(ValueError, match=r"indexer_training_stage = 'warm-up' is invalid: must be one of"):
        model(ids, labels=ids)

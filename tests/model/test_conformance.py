"""The behaviour transformers' common model tests expect of a model, on a tiny config: save/load round trips,
`return_dict=False` tuples, attentions, hidden states and router logits, resizing the embeddings, gradient
checkpointing, RoPE types, the sequence / token classification heads, and loading a checkpoint of another task.
Where transformers' built-in DeepSeek-V3 classes answer the same call, ours are compared with them on the same
weights (docs/conformance.md lists the deliberate differences)."""

import ast
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.testing_utils import CaptureLogger

from modeling_deepseek_v3 import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV3ForSequenceClassification,
    DeepseekV3ForTokenClassification,
    DeepseekV3Model,
)
from modeling_deepseek_v3.rope import rope_frequencies

from ..utils import random_ids, random_model, tiny_config

HEADS = (DeepseekV3ForSequenceClassification, DeepseekV3ForTokenClassification)
ALL_CLASSES = (DeepseekV3Model, DeepseekV3ForCausalLM, *HEADS)
EVERY_OUTPUT = dict(output_hidden_states=True, output_attentions=True, output_router_logits=True)


def eager(model):
    """The same model with transformers' eager attention, the implementation that forms attention probabilities."""
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random causal LM (eager attention) and its folder."""
    torch.manual_seed(1)
    model = eager(random_model())
    path = tmp_path_factory.mktemp("conformance")
    model.save_pretrained(path)
    return model, path


def assert_same_structure(ours, theirs, atol=1e-5):
    """Equal tuples, element by element: tensors close, nested tuples alike, caches both caches, None both None."""
    assert type(ours) is tuple and type(theirs) is tuple and len(ours) == len(theirs), (len(ours), len(theirs))
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if isinstance(a, Cache):
            assert isinstance(b, Cache), i
        elif isinstance(a, tuple):
            assert_same_structure(a, b, atol)
        else:
            assert a.shape == b.shape, (i, a.shape, b.shape)
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"element {i}")


# --- save / load ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_save_load_round_trip(model_class, tmp_path):
    model = model_class(tiny_config(num_labels=3)).eval()
    ids = random_ids(model.config, 2, 7)
    before = model(ids)[0]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "generation_config.json").is_file() == model.can_generate()
    again = model_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids)[0], before, rtol=0, atol=0)


# --- return_dict=False -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_return_dict_false_is_the_dict_as_a_tuple(model_class):
    model = eager(model_class(tiny_config(num_labels=3))).eval()
    ids = random_ids(model.config, 2, 7)
    labels = torch.tensor([0, 2]) if model_class is DeepseekV3ForSequenceClassification else ids % 3
    for extra in ({}, EVERY_OUTPUT, {"labels": labels} if model_class is not DeepseekV3Model else {}):
        as_dict = model(ids, **extra).to_tuple()
        as_tuple = model(ids, return_dict=False, **extra)
        assert_same_structure(as_tuple, as_dict, atol=0)


@pytest.mark.parametrize("base", [False, True], ids=["causal_lm", "base_model"])
def test_tuple_order_is_transformers(saved, base):
    """Loss first, then logits, cache, hidden states, attentions, router logits: element for element what the built-in
    classes return on the same weights."""
    model, path = saved
    ids = random_ids(model.config, 2, 7)
    builtin_class = transformers.DeepseekV3Model if base else transformers.DeepseekV3ForCausalLM
    builtin = builtin_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = model.model if base else model
    extra = EVERY_OUTPUT if base else {"labels": ids, **EVERY_OUTPUT}
    assert_same_structure(ours(ids, return_dict=False, **extra), builtin(ids, return_dict=False, **extra))


def test_return_dict_false_from_the_config(saved):
    model, path = saved
    ids = random_ids(model.config, 2, 7)
    config = DeepseekV3Config.from_pretrained(path, return_dict=False)
    lm = DeepseekV3ForCausalLM.from_pretrained(path, config=config).eval()
    out = lm(ids, labels=ids, output_hidden_states=True)  # the causal LM reads its base model's output by name
    assert_same_structure(out, model(ids, labels=ids, output_hidden_states=True, return_dict=False))
    base = DeepseekV3Model.from_pretrained(path, config=config).eval()
    assert_same_structure(base(ids), model.model(ids, return_dict=False))
    assert not isinstance(lm(ids, return_dict=True), tuple)  # the argument wins over the config


def test_the_heads_refuse_return_dict_false_in_the_config_clearly():
    model = DeepseekV3ForSequenceClassification(tiny_config(return_dict=False)).eval()
    with pytest.raises(ValueError, match="config.return_dict=False"):
        model(random_ids(model.config, 2, 5))
    model.config.return_dict = True
    assert type(model(random_ids(model.config, 2, 5), return_dict=False)) is tuple


# --- attentions, hidden states, router logits ---------------------------------------------------------------------


def test_attentions_are_the_builtin_eager_probabilities(saved):
    model, path = saved
    builtin = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = random_ids(model.config, 2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ours = model(ids, attention_mask=mask, output_attentions=True).attentions
    theirs = builtin(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(ours) == model.config.num_hidden_layers
    for a, b in zip(ours, theirs):
        assert a.shape == (2, model.config.num_attention_heads, 7, 7)
        torch.testing.assert_close(a[:, :, 2:], b[:, :, 2:], rtol=0, atol=1e-5)  # padding queries are not compared
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
        assert (a[1, :, 2:, :2] == 0).all()  # the real queries of row 1 give its padding nothing
        future = torch.ones(7, 7, dtype=torch.bool).triu(diagonal=1)
        assert (a[0] * future == 0).all() and (a[1, :, 2:] * future[2:] == 0).all()  # causal


def test_attentions_of_the_absorbed_path_equal_the_expanded_path(saved):
    model, _ = saved
    ids = random_ids(model.config, 2, 9)
    expected = model(ids, output_attentions=True).attentions
    model.config.mla_attention_path = "absorbed"
    try:
        absorbed = model(ids, output_attentions=True).attentions
        prompt = model(ids[:, :-1], use_cache=True)  # then one decode step over the cache
        step = model(ids[:, -1:], cache=prompt.cache, output_attentions=True).attentions
    finally:
        model.config.mla_attention_path = "auto"
    for full, a, last in zip(expected, absorbed, step):
        torch.testing.assert_close(a, full, rtol=0, atol=1e-5)
        assert last.shape == (2, model.config.num_attention_heads, 1, 9)
        torch.testing.assert_close(last[:, :, 0], full[:, :, -1], rtol=0, atol=1e-5)


def test_attentions_from_the_config_and_from_generate(saved):
    model, path = saved
    config = DeepseekV3Config.from_pretrained(path, output_attentions=True)
    assert config.output_attentions is True
    loaded = DeepseekV3ForCausalLM.from_pretrained(path, config=config, attn_implementation="eager").eval()
    ids = random_ids(model.config, 1, 5)
    assert len(loaded(ids).attentions) == model.config.num_hidden_layers
    builtin = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    asked = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_attentions=True,
                 output_hidden_states=True)
    ours, theirs = model.generate(ids, **asked), builtin.generate(ids, **asked)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a_step, b_step) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert a_step[0].shape == (1, model.config.num_attention_heads, 5 if step == 0 else 1, 5 + step)
        assert_same_structure(a_step, b_step)
    assert_same_structure(ours.hidden_states[-1], theirs.hidden_states[-1])


def test_sdpa_answers_output_attentions_as_transformers_does():
    model = random_model()  # sdpa, the default: a warning (once per process) and no probabilities
    assert model(random_ids(model.config, 1, 5), output_attentions=True).attentions == ()
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True  # transformers' own rule: only with eager attention


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
def test_attentions_and_hidden_states_keep_their_gradients(path):
    """transformers' `test_retain_grad_hidden_states_attentions`: the returned tensors are the ones in the graph, on
    both attention paths (which one a training forward takes depends on the shapes)."""
    model = eager(DeepseekV3Model(tiny_config(mla_attention_path=path))).train()
    out = model(random_ids(model.config, 2, 6), output_attentions=True, output_hidden_states=True)
    first_hidden, first_attention = out.hidden_states[0], out.attentions[0]
    first_hidden.retain_grad()
    first_attention.retain_grad()
    out.last_hidden_state.flatten()[0].backward()
    assert first_hidden.grad is not None and first_attention.grad is not None
    assert first_attention.grad.abs().sum() > 0


def test_hidden_states(saved):
    model, _ = saved
    ids = random_ids(model.config, 2, 6)
    out = model.model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 6, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids), rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, rtol=0, atol=0)
    # each layer's input is the previous layer's output
    layer = model.model.layers[0]
    positions = torch.arange(6)[None].expand(2, -1)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    after_first = layer(out.hidden_states[0], model.model.rotary_emb(out.hidden_states[0], positions), causal)
    torch.testing.assert_close(out.hidden_states[1], after_first, rtol=0, atol=1e-5)
    config = tiny_config(output_hidden_states=True)
    assert len(DeepseekV3Model(config)(ids).hidden_states) == config.num_hidden_layers + 1


def test_router_logits_are_the_builtin_ones(saved):
    model, path = saved
    builtin = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(model.config, 2, 7)
    ours = model(ids, output_router_logits=True).router_logits
    theirs = builtin(ids, output_router_logits=True).router_logits
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert len(ours) == len(theirs) == moe_layers
    for a, b in zip(ours, theirs):
        assert a.shape == (2 * 7, model.config.n_routed_experts) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert model(ids).router_logits is None


def test_router_logits_from_the_config_add_no_loss():
    model = random_model(tiny_config(num_nextn_predict_layers=1, output_router_logits=True)).train()
    ids = random_ids(model.config, 2, 8)
    out = model(ids, labels=ids)
    assert len(out.router_logits) == model.config.num_hidden_layers - model.config.first_k_dense_replace
    torch.testing.assert_close(model(ids, labels=ids, output_router_logits=False).loss, out.loss, rtol=0, atol=0)


@pytest.mark.parametrize("model_class", [DeepseekV3Model, DeepseekV3ForCausalLM], ids=lambda c: c.__name__)
def test_the_moe_markers_are_truthful(model_class):
    """What marks a model as MoE to transformers' tests and tools (its `test_moe_models_record_router_logits`, TRL's
    router loss): the config's `num_experts` / `num_local_experts`, and `_can_record_outputs["router_logits"]`,
    whose modules (matched by transformers' rule: the class, and `.{layer_name}.` in the module's dotted name) must
    output exactly the router logits the forward returns, the MTP modules' routers left out."""
    config = tiny_config(num_nextn_predict_layers=1)
    assert config.num_experts == config.num_local_experts == config.n_routed_experts
    assert not hasattr(config, "router_aux_loss_coef")  # TRL weighs its own router loss by it: none on top of ours
    model = model_class(config).eval()
    recorder = model._can_record_outputs["router_logits"]
    recorded = []
    for name, module in model.named_modules():
        if isinstance(module, recorder.target_class) and f".{recorder.layer_name}." in f".{name}.":
            module.register_forward_hook(lambda module, args, output: recorded.append(output[recorder.index]))
    out = model(random_ids(config, 2, 7), output_router_logits=True)
    assert len(recorded) == len(out.router_logits) == config.num_hidden_layers - config.first_k_dense_replace
    for got, returned in zip(recorded, out.router_logits):
        assert got is returned


def test_output_flags_must_be_booleans():
    model = random_model()
    with pytest.raises(TypeError, match="output_hidden_states must be True, False or None, got 2"):
        model(random_ids(model.config, 1, 4), output_hidden_states=2)


# --- embeddings, checkpointing, RoPE --------------------------------------------------------------------------------


@pytest.mark.parametrize("new_size", [520, 500])
def test_resize_token_embeddings(new_size, tmp_path):
    model = random_model(tiny_config(num_nextn_predict_layers=1))
    old = model.config.vocab_size
    embedding, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    model.resize_token_embeddings(new_size)
    kept = min(old, new_size)
    assert model.config.vocab_size == new_size
    assert model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == new_size
    torch.testing.assert_close(model.model.embed_tokens.weight[:kept], embedding[:kept], rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight[:kept], head[:kept], rtol=0, atol=0)
    ids = torch.randint(3, new_size, (2, 8))
    out = model.train()(ids, labels=ids)
    assert out.logits.shape[-1] == new_size and torch.isfinite(out.loss) and out.mtp_losses is not None
    model.eval().save_pretrained(tmp_path)
    again = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {new_size}\\)"):
        model(torch.full((1, 3), new_size))


def gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    # reentrant checkpointing cannot train the balance loss (its forward runs without autograd): alpha = 0 there
    alpha = 0.0 if use_reentrant else 0.01
    model = random_model(tiny_config(num_nextn_predict_layers=1, seq_balance_loss_alpha=alpha)).train()
    ids = random_ids(model.config, 2, 8)
    expected = gradients(model, ids)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing
    got = gradients(model, ids)
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if use_reentrant:
        model.config.seq_balance_loss_alpha = 0.01
        with pytest.raises(ValueError, match="use_reentrant"):
            gradients(model, ids)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_types(rope_type):
    """transformers' check: on a short input dynamic scaling leaves the outputs alone and the others change them; on
    an input longer than max_position_embeddings every type changes them."""
    base = tiny_config(rope_scaling=None, max_position_embeddings=16)
    scaling = {"type": rope_type, "factor": 4.0}
    if rope_type == "yarn":
        scaling["original_max_position_embeddings"] = 16
    scaled = tiny_config(rope_scaling=scaling, max_position_embeddings=16)
    torch.manual_seed(0)
    original = DeepseekV3Model(base).eval()
    model = DeepseekV3Model(scaled).eval()
    model.load_state_dict(original.state_dict())
    short, long = random_ids(base, 1, 10), random_ids(base, 1, 24)
    same_short = torch.allclose(model(short).last_hidden_state, original(short).last_hidden_state, atol=1e-5)
    assert same_short == (rope_type == "dynamic")
    assert not torch.allclose(model(long).last_hidden_state, original(long).last_hidden_state, atol=1e-5)


def update_rope_in_place(config, settings: dict) -> None:
    """How transformers' common tests set RoPE: the config's dict updated in place, so the keys of earlier settings
    stay (`original_max_position_embeddings` under `linear`, `partial_rotary_factor` everywhere)."""
    config.rope_parameters = config.rope_parameters
    config.rope_parameters.update(settings)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_from_a_config_updated_in_place(rope_type):
    """transformers' `test_model_rope_scaling_from_config`: two models built from one config between in-place
    updates that leave keys a type does not read; those are ignored with a warning, and each model computes with the
    settings it was built with."""
    config = tiny_config(rope_scaling=None, max_position_embeddings=16)
    short, long = random_ids(config, 1, 10), random_ids(config, 1, 24)
    update_rope_in_place(config, {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 1.0,
                                  "original_max_position_embeddings": 16384})
    torch.manual_seed(42)
    original = DeepseekV3Model(config).eval()
    with torch.no_grad():
        original_short, original_long = original(short).last_hidden_state, original(long).last_hidden_state
    logger = transformers.utils.logging.get_logger("modeling_deepseek_v3.configuration.configuration_deepseek_v3")
    with CaptureLogger(logger) as captured:
        update_rope_in_place(config, {"rope_type": rope_type, "factor": 10.0, "rope_theta": 10_000.0,
                                      "partial_rotary_factor": 1.0})
        torch.manual_seed(42)
        scaled = DeepseekV3Model(config).eval()
    if rope_type != "yarn":  # yarn reads the original length (here the stale 16384)
        assert "['original_max_position_embeddings'] are not settings of" in captured.out
    with torch.no_grad():
        same_short = torch.allclose(scaled(short).last_hidden_state, original_short, atol=1e-5)
        assert same_short == (rope_type == "dynamic")  # dynamic scaling starts past max_position_embeddings
        assert not torch.allclose(scaled(long).last_hidden_state, original_long, atol=1e-5)


def test_rope_frequencies_of_each_type():
    """transformers' `test_model_rope_scaling_frequencies`, on the rotary module the base model names `rotary_emb`:
    linear position x is plain position x / factor, dynamic changes only past max_position_embeddings (and only
    lowers frequencies), yarn changes every position."""
    config = tiny_config(rope_scaling=None, max_position_embeddings=16)
    rope_class = type(DeepseekV3Model(config).rotary_emb)
    x, short, long = torch.randn(1), torch.arange(10)[None], torch.arange(24)[None]

    def tables(settings):
        update_rope_in_place(config, {"rope_theta": 10_000.0, "partial_rotary_factor": 1.0, **settings})
        rope = rope_class(config=config)
        return rope, rope(x, short), rope(x, long)

    plain, (cos_short, sin_short), (cos_long, sin_long) = tables({"rope_type": "default"})
    torch.testing.assert_close(cos_short, cos_long[:, :10])
    _, _, (linear_cos, linear_sin) = tables({"rope_type": "linear", "factor": 4})
    for position in range(0, 24, 4):
        torch.testing.assert_close(linear_cos[:, position], cos_long[:, position // 4])
        torch.testing.assert_close(linear_sin[:, position], sin_long[:, position // 4])
    dynamic, (dynamic_cos_short, _), (dynamic_cos_long, _) = tables({"rope_type": "dynamic", "factor": 4})
    torch.testing.assert_close(dynamic_cos_short, cos_short)
    assert not torch.allclose(dynamic_cos_long, cos_long) and (dynamic.inv_freq <= plain.inv_freq).all()
    _, (yarn_cos_short, yarn_sin_short), (yarn_cos_long, _) = tables({"rope_type": "yarn", "factor": 4})
    torch.testing.assert_close(yarn_cos_short, yarn_cos_long[:, :10])
    assert not torch.allclose(yarn_cos_short, cos_short) and not torch.allclose(yarn_sin_short, sin_short)


@pytest.mark.parametrize("settings", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0},  # original_max_position_embeddings: max_position_embeddings
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "truncate": False, "attention_factor": 1.5},
], ids=["linear", "dynamic", "yarn-defaults", "yarn-deepseek", "yarn-untruncated"])
def test_rope_frequencies_equal_transformers_rope_functions(settings):
    """Our inverse frequencies and cos/sin factor against transformers' own `ROPE_INIT_FUNCTIONS` on its config of the
    same settings (its DeepSeek-V3 config rotates `qk_rope_head_dim` dims)."""
    ours = tiny_config(max_position_embeddings=32, rope_scaling=dict(settings))
    theirs = transformers.DeepseekV3Config(qk_rope_head_dim=ours.qk_rope_head_dim, max_position_embeddings=32,
                                           rope_parameters={"rope_theta": ours.rope_theta, **settings})
    inv_freq, factor = rope_frequencies(ours)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[settings["rope_type"]](theirs, None)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("value", [0.5, 2.0])
def test_a_partial_rotary_factor_other_than_1_is_refused(value):
    with pytest.raises(ValueError, match=rf"`rope_scaling.partial_rotary_factor` = {value} is invalid: must be 1.0"):
        tiny_config(rope_scaling={"type": "linear", "factor": 2.0, "partial_rotary_factor": value})
    config = tiny_config()
    model = DeepseekV3Model(config)
    config.rope_parameters.update(partial_rotary_factor=value)  # in place, past the config's checks
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        model(random_ids(config, 1, 4))


# --- the Auto heads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto, model_class", [
    (AutoModel, DeepseekV3Model), (AutoModelForCausalLM, DeepseekV3ForCausalLM),
    (AutoModelForSequenceClassification, DeepseekV3ForSequenceClassification),
    (AutoModelForTokenClassification, DeepseekV3ForTokenClassification),
], ids=lambda x: getattr(x, "__name__", ""))
def test_every_auto_class_of_deepseek_v3_gives_ours(auto, model_class, saved):
    _, path = saved
    assert type(auto.from_config(tiny_config())) is model_class
    assert type(auto.from_pretrained(path)) is model_class


def test_sequence_classification_scores_the_last_real_token(saved, tmp_path):
    model, path = saved
    head = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    torch.testing.assert_close(head.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    pad = model.config.pad_token_id
    ids = random_ids(model.config, 2, 6)
    ids[1, 4:] = pad  # right padding: row 1 is scored at position 3
    out = head(ids, labels=torch.tensor([0, 2]))
    hidden = head.model(ids).last_hidden_state
    expected = torch.stack([head.score(hidden[0, 5]), head.score(hidden[1, 3])])
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, torch.tensor([0, 2])))
    # the built-in head on the same weights
    head.save_pretrained(tmp_path)
    builtin = transformers.DeepseekV3ForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(builtin(ids).logits, out.logits, rtol=0, atol=1e-5)


def test_token_classification_trains(saved):
    _, path = saved
    head = AutoModelForTokenClassification.from_pretrained(path, num_labels=4).train()
    ids = random_ids(head.config, 2, 6)
    out = head(ids, labels=ids % 4)
    assert out.logits.shape == (2, 6, 4)
    out.loss.backward()
    assert head.score.weight.grad is not None and head.model.layers[0].self_attn.q_a_proj.weight.grad is not None
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    assert head(ids, labels=ids % 4).loss < out.loss  # one step lowers the loss on its batch


def test_experts_implementation_settings(saved):
    _, path = saved
    for setting in ("grouped_mm", "eager"):
        model = DeepseekV3ForCausalLM.from_pretrained(path, experts_implementation=setting)
        # recorded as our own experts forward, so that generate() never switches it to "batched_mm"
        assert model.get_experts_implementation() == {"": "eager"}
    with pytest.raises(ValueError, match="experts_implementation='batched_mm' is not available"):
        DeepseekV3ForCausalLM.from_pretrained(path, experts_implementation="batched_mm")
    # a config the built-in class has set up for its own experts kernels
    config = DeepseekV3Config.from_pretrained(path)
    assert transformers.DeepseekV3ForCausalLM(config).get_experts_implementation() == {"": "grouped_mm"}
    assert type(AutoModelForSequenceClassification.from_config(config).model) is DeepseekV3Model


# --- checkpoints of another task --------------------------------------------------------------------------------------


def test_a_base_checkpoint_loads_into_the_causal_lm_with_a_new_head(saved, tmp_path):
    model, _ = saved
    model.model.save_pretrained(tmp_path)
    with CaptureLogger(transformers.logging.get_logger("transformers.modeling_utils")) as report:
        lm = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert "lm_head.weight" in report.out and "MISSING" in report.out  # transformers' load report
    for name, tensor in model.model.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    head = lm.lm_head.weight
    assert torch.isfinite(head).all() and 0.01 < head.std() < 0.03  # initialised, N(0, initializer_range²)
    # the MTP modules hold decoder blocks: missing, they stay an error
    with pytest.raises(ValueError, match="MTP modules"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path, num_nextn_predict_layers=1)


def test_a_missing_decoder_weight_stays_an_error(saved, tmp_path):
    _, path = saved
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    for model_class in ALL_CLASSES:
        with pytest.raises(ValueError, match="missing keys.*kv_b_proj"):
            model_class.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_class", [DeepseekV3Model, DeepseekV3ForCausalLM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_folder_without_weights_names_exactly_the_weights_to_load(model_class, tie, tmp_path):
    """transformers' `test_model_weights_reload_no_missing_tied_weights` (every weight of a nuked checkpoint reported
    missing, a tied one not): here loading refuses instead of initialising, and its error names every parameter and
    persistent buffer of the model but the output head, which is the embedding when tied and a task head that may be
    new when not (docs/conformance.md, Loading a checkpoint of another task)."""
    config = tiny_config(tie_word_embeddings=tie)
    model_class(config).save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys") as refused:
        model_class.from_pretrained(tmp_path)
    named = ast.literal_eval(re.search(r"missing keys \(\d+\): (\[[^\]]*\])", str(refused.value)).group(1))
    model = model_class(config)
    persistent = {name for name, _ in model.named_buffers()} - {
        f"{module_name}.{buffer}".lstrip(".") for module_name, module in model.named_modules()
        for buffer in module._non_persistent_buffers_set
    }
    expected = {name for name, _ in model.named_parameters()} | persistent
    assert set(named) == expected - {"lm_head.weight"} and len(named) > 40


def test_a_classifier_checkpoint_loads_into_the_causal_lm(saved, tmp_path):
    model, path = saved
    DeepseekV3ForSequenceClassification.from_pretrained(path, num_labels=2).save_pretrained(tmp_path)
    lm = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()  # `score` left out, `lm_head` new
    ids = random_ids(model.config, 1, 5)
    torch.testing.assert_close(lm.model(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=1e-5)


# --- dtypes ---------------------------------------------------------------------------------------------------------


def test_routing_biases_and_fp8_scales_load_in_fp32_under_bf16(tmp_path):
    fp8 = DeepseekV3ForCausalLM(tiny_config(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                 "weight_block_size": [32, 32]}))
    fp8.save_pretrained(tmp_path)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = {name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.dtype == torch.float32}
    assert fp32 and all(name.endswith(("_scale_inv", "e_score_correction_bias")) for name in fp32)
    assert sum(name.endswith("e_score_correction_bias") for name in fp32) == 2  # both MoE layers
    assert loaded.lm_head.weight.dtype == torch.bfloat16

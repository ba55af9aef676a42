"""The causal LM: parity with transformers' built-in class, checkpoints, Auto classes, generate, pipeline, errors."""


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline
from transformers import DeepseekV3ForCausalLM as BuiltinDeepseekV3ForCausalLM

from modeling_deepseek_v3 import DeepseekV3ForCausalLM

from ..utils import random_ids, random_model, tiny_config, word_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    model = random_model()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return model, path


def test_logits_and_greedy_equal_builtin(saved, tmp_path):
    ours, path = saved
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(ours.config, 2, 24)
    torch.testing.assert_close(ours(ids).logits, builtin(ids).logits, rtol=0, atol=1e-5)
    prompt = ids[:1, :6]
    ours_tokens = ours.generate(prompt, max_new_tokens=32, do_sample=False)
    builtin_tokens = builtin.generate(prompt, max_new_tokens=32, do_sample=False)
    assert ours_tokens.shape[1] == 38 and torch.equal(ours_tokens, builtin_tokens)
    # and the other way round: the built-in class saves, ours loads
    builtin.save_pretrained(tmp_path)
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


YARN_UNEQUAL_MSCALE = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                       "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}


@pytest.mark.parametrize(
    "overrides",
    [dict(q_lora_rank=None, rope_scaling=None), dict(rope_scaling=YARN_UNEQUAL_MSCALE)],
    ids=["no-q-compression", "yarn-mscale-0.707"],
)
def test_parity_variants(overrides, tmp_path):
    ours = random_model(tiny_config(**overrides))
    ours.save_pretrained(tmp_path)
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = random_ids(ours.config, 2, 40)
    torch.testing.assert_close(ours(ids).logits, builtin(ids).logits, rtol=0, atol=1e-5)


def test_save_load_bit_exact_with_official_keys(saved):
    model, path = saved
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    cfg = model.config
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert not any(k.endswith("mlp.experts.gate_proj") for k in keys)
    assert f"model.layers.{cfg.num_hidden_layers - 1}.self_attn.kv_a_proj_with_mqa.weight" in keys
    back = DeepseekV3ForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_bf16_keeps_router_bias_fp32(saved):
    _, path = saved
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = random_ids(model.config, 1, 5)
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_missing_and_unexpected_keys_are_errors(saved, tmp_path):
    _, path = saved
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing keys.*o_proj.*unexpected keys.*extra"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_left_padded_batch_equals_each_prompt_alone():
    model = random_model()
    prompts = [random_ids(model.config, 1, n)[0] for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[row, width:], alone[0, len(prompt):])


def test_beam_search_equals_builtin_and_is_deterministic(saved):
    model, path = saved
    builtin = BuiltinDeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(model.config, 2, 5)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    first = model.generate(ids, **kwargs)
    assert first.shape == (4, 13)
    assert torch.equal(first, model.generate(ids, **kwargs))
    assert torch.equal(first, builtin.generate(ids, **kwargs))  # reorder_cache really reorders the latent cache


def test_sampling_runs_and_is_seeded():
    model = random_model()
    ids = random_ids(model.config, 2, 4)
    torch.manual_seed(5)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    torch.manual_seed(5)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    assert a.shape == (2, 16) and torch.equal(a, b)


def test_eager_equals_sdpa():
    model = random_model()
    ids = random_ids(model.config, 2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[1], sdpa[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[0, 3:], sdpa[0, 3:], rtol=1e-5, atol=1e-5)


def test_loss_honours_num_items_in_batch_and_logits_to_keep():
    model = random_model()
    ids = random_ids(model.config, 2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100))
    summed = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss, summed / 20)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, out.logits[:, -1:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[3, 512]])), "token id 512, outside the vocabulary"),
        (dict(input_ids=torch.tensor([[3, -1]])), "token id -1"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "seq >= 1"),
        (dict(input_ids=torch.tensor([[3, 4]]), attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
        (dict(), "exactly one of input_ids"),
    ],
    ids=["id-too-large", "id-negative", "empty", "mask-shape", "no-input"],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    model = random_model()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_offloaded_weights_decode_exactly(saved, tmp_path):
    """device_map with CPU/disk offload: accelerate keeps weights on meta between calls, so decoding must not read
    kv_b_proj.weight directly (the absorbed path steps aside)."""
    model, path = saved
    ids = random_ids(model.config, 1, 6)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    offloaded = DeepseekV3ForCausalLM.from_pretrained(
        path, device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=str(tmp_path)
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    assert torch.equal(offloaded.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_labels_with_logits_to_keep_is_a_clear_error():
    model = random_model()
    ids = random_ids(model.config, 2, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_pipeline_and_auto_loading_of_a_saved_folder(saved, tmp_path):
    _, path = saved
    folder = tmp_path / "with-tokenizer"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    generator = pipeline("text-generation", model=str(folder))
    assert type(generator.model) is DeepseekV3ForCausalLM
    text = generator("w005 w009 w017", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("w005 w009 w017") and text.count("w") == 8  # the prompt's 3 words + 5 new ones


def test_decoding_under_autocast_runs_both_paths_in_the_compute_dtype():
    """An fp32 model under bf16 autocast: the absorbed path attends in the compute dtype of its absorbed query (the
    rope and latent tensors cast to it) and gives the expanded path's logits up to bf16 rounding."""
    torch.manual_seed(0)
    model = random_model()
    ids = random_ids(model.config, 2, 6)
    logits = {}
    for path in ("absorbed", "expanded"):
        model.config.mla_attention_path = path
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            cache = model(ids[:, :-1], use_cache=True).cache
            logits[path] = model(ids[:, -1:], cache=cache).logits.float()
    assert logits["expanded"].std() > 0.1
    torch.testing.assert_close(logits["absorbed"], logits["expanded"], rtol=0, atol=2e-2)

"""DeepSeek-V3.2 (`model_type = "deepseek_v32"`): its checkpoints load through the Auto classes, save back in the
release's layout, and a full forward computes what DeepSeek's own final V3.2 inference code computes: the same keys
chosen by the lightning indexer in every layer, and the same logits.

The fixtures under tests/fixtures/v32/ (made by its `make_fixtures.py` from the `tiny-deepseek-v32` preset) hold a
tiny checkpoint in the release format (FP8 e4m3 with ue8m0 scales, the indexer's `weights_proj` in bf16, an MTP
layer) and a bf16 copy of the same weights, and the fp32 outputs of DeepSeek's code on a 24-token prompt with
`index_topk` 8: the logits, and per layer the index scores and the chosen keys."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import StaticCache

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV32Config, MLACache, load_preset
from modeling_deepseek_v3 import indexer as indexer_module
from modeling_deepseek_v3.convert import convert_checkpoint
from modeling_deepseek_v3.indexer import (
    LightningIndexer,
    SparseQueries,
    fp8_round_trip,
    hadamard_rotate,
    sparse_attention,
)
from modeling_deepseek_v3.rope import apply_rope

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v32"
MEMBERS = ("tiny-deepseek-v32", "tiny-deepseek-v32-bf16")
# Both sides run in fp32, but the indexer's q and k and the latent are rounded to FP8: a value that fp32 summation
# order moves across an FP8 rounding boundary moves by one FP8 step (1/16 relative), so the logits agree to 1e-4, not
# to the 1e-5 of the family fixtures (DeepSeek's deployed code runs the attention itself in bf16, far looser).
LOGITS_ATOL = 1e-4
# a query whose k-th and (k+1)-th reference index scores are closer than this may pick either: such ties are skipped
SCORE_GAP = 1e-3


def load(member: str, **kwargs) -> DeepseekV3ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(FIXTURES / member, dtype=torch.float32, **kwargs).eval()


def reference(member: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / member / "reference.safetensors")


def chosen_keys(model, prompt: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """Run a full forward; return per layer the keys each query attends to, `[s, t]` bool."""
    select, chosen = LightningIndexer.select, []

    def recording(self, scores, allowed):
        indices, valid = select(self, scores, allowed)
        chosen.append(torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, indices, valid)[0])
        return indices, valid

    monkeypatch.setattr(LightningIndexer, "select", recording)
    with torch.no_grad():
        model(prompt[None], use_cache=False)
    return chosen


def decided_queries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The queries `[s]` whose choice is not a near tie: fewer than k allowed keys, or a gap >= SCORE_GAP between
    the k-th and (k+1)-th scores (`scores` `[s, t]`, -inf where not allowed)."""
    top = scores.topk(k + 1, dim=-1).values
    return top[:, k].isinf() | (top[:, k - 1] - top[:, k] >= SCORE_GAP)


@pytest.mark.parametrize("member", MEMBERS)
def test_logits_equal_deepseeks_final_code(member):
    model, ref = load(member), reference(member)
    assert type(model.config) is DeepseekV32Config
    with torch.no_grad():
        logits = model(ref["prompt"][None], use_cache=False).logits[0]
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("member", MEMBERS)
def test_chosen_keys_equal_deepseeks_in_every_layer(member, monkeypatch):
    model, ref = load(member), reference(member)
    k, s = model.config.index_topk, len(ref["prompt"])
    chosen = chosen_keys(model, ref["prompt"], monkeypatch)
    assert len(chosen) == model.config.num_hidden_layers
    for layer, ours in enumerate(chosen):
        theirs = ref["selected"][layer]
        assert theirs[k:].sum(-1).eq(k).all() and theirs.sum() < s * (s + 1) // 2  # a strict subset was chosen
        decided = decided_queries(ref["index_scores"][layer], k)
        assert decided.sum() >= s - 2, f"layer {layer}: too many near ties for the fixture to test the choice"
        assert torch.equal(ours[decided], theirs[decided]), f"layer {layer}"


def test_the_choice_depends_on_the_hadamard_rotation_and_the_fp8_rounding(monkeypatch):
    """What transformers' built-in port leaves out changes the keys chosen on this fixture: a check that the fixture
    can tell (and that the test above would fail without either)."""
    ref = reference("tiny-deepseek-v32-bf16")
    for step, identity in (("hadamard_rotate", lambda x: x), ("act_quant", lambda x, fmt: unrounded(x))):
        with monkeypatch.context() as patch:
            patch.setattr(indexer_module, step, identity)
            chosen = chosen_keys(load("tiny-deepseek-v32-bf16"), ref["prompt"], patch)
        assert any(not torch.equal(ours, theirs) for ours, theirs in zip(chosen, ref["selected"])), step


@pytest.mark.parametrize("step, replacement", [("fp8_round_trip", lambda x: x), ("rotate_halves", apply_rope)],
                         ids=["latent-not-rounded", "indexer-rope-interleaved"])
def test_the_logits_depend_on_the_latent_rounding_and_the_indexer_rope_layout(step, replacement, monkeypatch):
    """Leaving out the latent's FP8 rounding, or rotating the indexer's RoPE as interleaved pairs (DeepSeek's earlier
    V3.2-Exp code), moves the logits far outside the tolerance of the test above."""
    ref = reference("tiny-deepseek-v32")
    monkeypatch.setattr(indexer_module, step, replacement)
    with torch.no_grad():
        logits = load("tiny-deepseek-v32")(ref["prompt"][None], use_cache=False).logits[0]
    assert (logits - ref["logits"]).abs().max() > 100 * LOGITS_ATOL


def unrounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.float(), torch.ones(*x.shape[:-1], 1)


def test_transformers_builtin_deepseek_v32_chooses_other_keys():
    """transformers' own `DeepseekV32ForCausalLM` (5.25) skips the Hadamard rotation and the FP8 rounding of the
    indexer's q and k: on this fixture it chooses other keys than DeepSeek's code in every layer."""
    transformers = pytest.importorskip("transformers")
    ref, folder = reference("tiny-deepseek-v32-bf16"), FIXTURES / "tiny-deepseek-v32-bf16"
    config = transformers.DeepseekV32Config.from_pretrained(folder)
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    chosen = []
    for layer in model.model.layers:
        layer.self_attn.indexer.register_forward_hook(lambda module, args, out: chosen.append(out[0].long()))
    with torch.no_grad():
        model(ref["prompt"][None], use_cache=False)
    s = len(ref["prompt"])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for layer, indices in enumerate(chosen):
        builtin = torch.zeros(s, s, dtype=torch.bool).scatter_(-1, indices, True) & causal
        assert not torch.equal(builtin, ref["selected"][layer]), f"layer {layer} now agrees: update docs/v32.md"


def random_attention_inputs(mla, b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    config = mla.config

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    hidden = randn(b, s, config.hidden_size)
    q_latent = randn(b, s, config.q_lora_rank)
    q_nope, q_pe = randn(b, s, mla.num_heads, mla.qk_nope_head_dim), randn(b, s, mla.num_heads, mla.qk_rope_head_dim)
    c_kv, k_pe = randn(b, s, mla.kv_lora_rank), randn(b, s, mla.qk_rope_head_dim)
    angles = torch.arange(s)[None, :, None] * torch.rand(1, 1, mla.qk_rope_head_dim // 2, generator=g)
    return hidden, q_latent, q_nope, q_pe, c_kv, k_pe, (angles.cos().expand(b, -1, -1), angles.sin().expand(b, -1, -1))


def dense_attention(mla, q_nope, q_pe, c_kv, k_pe, allowed):
    """MLA's own dense attention (the expanded path) over the FP8-rounded latent, masked to `allowed` `[b, s, t]`."""
    return mla.attend(q_nope, q_pe, fp8_round_trip(c_kv), k_pe, allowed[:, None])


@torch.no_grad()
def test_sparse_attention_equals_dense_attention_when_every_key_is_chosen():
    config = load_preset("tiny-deepseek-v32", index_topk=64, mla_attention_path="expanded")
    mla = DeepseekV3ForCausalLM(config).model.layers[1].self_attn.eval()
    hidden, q_latent, q_nope, q_pe, c_kv, k_pe, rope = random_attention_inputs(mla, 2, 20)
    causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, -1, -1)
    sparse = sparse_attention(mla, SparseQueries(hidden, q_latent, q_nope, q_pe, rope), c_kv, k_pe, None)
    torch.testing.assert_close(sparse, dense_attention(mla, q_nope, q_pe, c_kv, k_pe, causal), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sparse_attention_attends_only_to_the_chosen_keys(monkeypatch):
    """With index_topk < s: equal to dense attention masked to the chosen keys, also when the queries are split into
    chunks of one row (the bound on long prefills' memory)."""
    mla = DeepseekV3ForCausalLM(load_preset("tiny-deepseek-v32", mla_attention_path="expanded")).model.layers[0]
    mla = mla.self_attn.eval()
    hidden, q_latent, q_nope, q_pe, c_kv, k_pe, rope = random_attention_inputs(mla, 2, 20, seed=1)
    causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, -1, -1)
    k8, k_scale = mla.indexer.keys(hidden, *rope)
    scores = mla.indexer.scores(*mla.indexer.queries(hidden, q_latent, *rope), k8, k_scale)
    indices, valid = mla.indexer.select(scores, causal)
    chosen = torch.zeros(2, 20, 20, dtype=torch.bool).scatter_(-1, indices, valid)
    assert chosen.sum(-1).max() == mla.indexer.topk < 20
    expected = dense_attention(mla, q_nope, q_pe, c_kv, k_pe, chosen)
    for chunk in (indexer_module.CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(indexer_module, "CHUNK_ELEMENTS", chunk)
        sparse = sparse_attention(mla, SparseQueries(hidden, q_latent, q_nope, q_pe, rope), c_kv, k_pe, None)
        torch.testing.assert_close(sparse, expected, rtol=1e-5, atol=1e-5)


def test_hadamard_rotation_is_the_normalised_sylvester_matrix():
    h = torch.tensor([[1.0]])
    for _ in range(5):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    x = torch.randn(3, 32)
    torch.testing.assert_close(hadamard_rotate(x), x @ h / 32**0.5)


@torch.no_grad()
def test_left_padding_leaves_each_sequence_as_alone():
    model = load("tiny-deepseek-v32")
    prompt = reference("tiny-deepseek-v32")["prompt"]
    short = prompt[:16]
    batch = torch.stack((prompt, torch.cat((torch.full((8,), 2), short))))
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(batch, attention_mask=mask, position_ids=positions, use_cache=False).logits
    alone = model(short[None], use_cache=False).logits[0]
    torch.testing.assert_close(out[1, 8:], alone, rtol=0, atol=1e-4)


def test_load_and_save_keep_the_release_layout(tmp_path):
    folder = FIXTURES / "tiny-deepseek-v32"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(AutoConfig.from_pretrained(folder)) is DeepseekV32Config
    model.save_pretrained(tmp_path)
    saved, release = load_file(tmp_path / "model.safetensors"), load_file(folder / "model.safetensors")
    assert saved.keys() == release.keys()
    assert "model.layers.2.self_attn.indexer.wq_b.weight_scale_inv" in saved  # the MTP layer's indexer
    for key, tensor in release.items():
        assert saved[key].dtype == tensor.dtype, key
        assert torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8)), key
    config = json.loads((tmp_path / "config.json").read_text())
    release_config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["architectures"] == ["DeepseekV32ForCausalLM"]
    for field in ("index_n_heads", "index_head_dim", "index_topk", "quantization_config"):
        assert config[field] == release_config[field]
    ref, reloaded = reference("tiny-deepseek-v32"), AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        logits = reloaded(ref["prompt"][None], use_cache=False).logits[0]
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=LOGITS_ATOL)


def test_release_preset_is_the_released_config():
    config = load_preset("deepseek-v32")
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (64, 128, 2048)
    assert config.fp8_quantization_config["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("field, value, rule", [
    ("index_head_dim", 48, "power of two"),
    ("index_head_dim", 256, "at most 128"),
    ("index_head_dim", 4, "qk_rope_head_dim"),
    ("index_topk", 0, "positive integer"),
    ("index_n_heads", 2.0, "positive integer"),
    ("q_lora_rank", None, "query latent"),
])
def test_config_refuses_bad_indexer_fields(field, value, rule):
    with pytest.raises(ValueError, match=rf"`{field}` = {value!r} is invalid: .*{rule}"):
        load_preset("tiny-deepseek-v32", **{field: value})


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(load_preset("tiny-deepseek-v32")).eval()


def test_a_cache_without_indexer_keys_is_refused(tiny_model):
    ids = torch.randint(3, 256, (1, 6))
    with pytest.raises(ValueError, match=r"keeps no indexer keys \(StaticCache: .* is not built yet for DeepSeek"):
        tiny_model(ids, cache=StaticCache(config=tiny_model.config, max_cache_len=16))  # transformers' own
    with pytest.raises(ValueError, match=r"keeps no indexer keys \(MLACache: "):
        tiny_model(ids, cache=MLACache())  # no config: its layers keep no indexer keys


def test_output_attentions_is_refused():
    model = load("tiny-deepseek-v32", attn_implementation="eager")  # sdpa returns no probabilities anyway
    with pytest.raises(ValueError, match="output_attentions is not built yet"):
        model(torch.randint(3, 256, (1, 6)), use_cache=False, output_attentions=True)


def test_conversion_keeps_the_release_layout(tmp_path):
    """bf16 -> FP8 quantises what the release stores in FP8 (the indexer's `wq_b` and `wk`, not its `weights_proj`);
    FP8 -> bf16 dequantises exactly: the bf16 folder computes the FP8 release's logits."""
    fp8 = convert_checkpoint(FIXTURES / "tiny-deepseek-v32-bf16", tmp_path / "fp8", "bf16-to-fp8")
    def dtypes(folder: Path) -> dict[str, torch.dtype]:
        return {key: tensor.dtype for key, tensor in load_file(folder / "model.safetensors").items()}

    assert dtypes(fp8) == dtypes(FIXTURES / "tiny-deepseek-v32")
    bf16 = convert_checkpoint(FIXTURES / "tiny-deepseek-v32", tmp_path / "bf16", "fp8-to-bf16")
    ref = reference("tiny-deepseek-v32")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)(ref["prompt"][None], use_cache=False)
    torch.testing.assert_close(logits.logits[0], ref["logits"], rtol=0, atol=LOGITS_ATOL)


def test_an_adapter_on_kv_b_proj_is_refused():
    model = load("tiny-deepseek-v32")
    model.model.layers[0].self_attn.kv_b_proj.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="wrapped kv_b_proj .* is not built yet"):
        model(torch.randint(3, 256, (1, 6)), use_cache=False)

"""The FP8 latent cache (`cache_dtype="fp8"`): what it stores against DeepSeek-V3.2's `act_quant` formulas written out
here, the absorbed decode over it against decoding over the cache dequantised here, and generation through it."""

from __future__ import annotations

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from modeling_deepseek_v3 import MLACache, MLAStaticCache, load_preset
from modeling_deepseek_v3.cache import LatentCacheLayer
from modeling_deepseek_v3.kernels import (
    act_quant,
    kernel_launches,
    mla_decode_fp8,
    mla_decode_fp8_ref,
    mla_decode_paged_fp8,
    mla_decode_ref,
    triton_on_cpu,
)
from tests.utils import random_ids, random_model, tiny_config

TILE = 128
E4M3_MAX = 448.0
RTOL = 1e-5  # fp32: the FP8 paths against the same attention over the dequantised cache


def deepseek_act_quant(x: torch.Tensor, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3.2's `act_quant` (inference/kernel.py) from its formulas, per 1×128 tile of the last dim (a partial
    last tile on its own values): amax floored at 1e-4, scale = amax · fp32(1/448), for "ue8m0" rounded up to a power
    of two by its exponent bits (2^(exponent + 1 if a mantissa bit is set)), payload clamp(x / scale, ±448) in e4m3."""
    c = x.shape[-1]
    tiles = -(-c // TILE)
    scales, payloads = [], []
    for i in range(tiles):
        tile = x[..., i * TILE : (i + 1) * TILE].float()
        amax = tile.abs().amax(dim=-1).clamp(min=1e-4)
        scale = amax * torch.tensor(1 / E4M3_MAX, dtype=torch.float32)
        if scale_fmt == "ue8m0":
            mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
            scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
        payloads.append((tile / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
        scales.append(scale)
    return torch.cat(payloads, dim=-1), torch.stack(scales, dim=-1)


def dequantised(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each e4m3 value times its tile's scale, in fp32."""
    return values.float() * scales.repeat_interleave(TILE, dim=-1)[..., : values.shape[-1]]


def varied_latents(b: int, t: int, c: int) -> torch.Tensor:
    """Random `[b, 1, t, c]` latents whose tiles span magnitudes from 1e-3 to 1e3, some below the 1e-4 floor."""
    x = torch.randn(b, 1, t, c) * 10 ** torch.empty(b, 1, t, 1).uniform_(-3, 3)
    x[0, 0, 0, :TILE] *= 1e-7  # a tile whose amax is floored
    return x


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("static", [False, True])
def test_stored_values_and_scales_are_deepseek_act_quant(scale_fmt, static):
    config = tiny_config(kv_lora_rank=192)  # one full tile and a partial one
    if static:
        cache = MLAStaticCache(config=config, max_cache_len=400, cache_dtype="fp8", scale_fmt=scale_fmt)
    else:
        cache = MLACache(config, cache_dtype="fp8", scale_fmt=scale_fmt)
    torch.manual_seed(0)
    prompt, more = varied_latents(2, 5, 192), varied_latents(2, 300, 192)  # the second fill grows the dynamic cache
    k_pe = torch.randn(2, 1, 305, config.qk_rope_head_dim)
    cache.update(prompt, k_pe[:, :, :5], 0)
    latent, rope = cache.update(more, k_pe[:, :, 5:], 0)
    values, scales = deepseek_act_quant(torch.cat([prompt, more], dim=2)[:, 0], scale_fmt)
    assert torch.equal(latent.values[:, :305].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(latent.scales[:, :305], scales)
    assert torch.equal(rope[:, :, :305], k_pe)  # the rope part is stored as given
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.frexp(scales)[0], torch.full_like(scales, 0.5))


def test_bytes_per_token_is_deepseek_v3_fp8_layout():
    """FlashMLA's FP8 row: 512 e4m3 values, 4 fp32 scales, 64 bf16 rope values = 656 bytes against 1,152 in bf16."""
    config = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64)
    sizes = {}
    for cache_dtype in (None, "fp8"):
        cache = MLACache(config, cache_dtype=cache_dtype)
        cache.update(torch.randn(1, 1, 3, 512, dtype=torch.bfloat16), torch.randn(1, 1, 3, 64, dtype=torch.bfloat16), 0)
        sizes[cache_dtype] = cache.bytes_per_token()
        assert cache.nbytes() == 3 * sizes[cache_dtype]
    assert sizes == {None: 1152, "fp8": 656}


def random_fp8_cache(b: int, t: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, scales = deepseek_act_quant(varied_latents(b, t, c)[:, 0], None)
    return values, scales


@pytest.mark.parametrize("s, masked", [(1, False), (3, True)])
def test_absorbed_decode_over_fp8_cache_equals_decoding_the_dequantised_cache(s, masked):
    torch.manual_seed(1)
    b, h, c, r, t = 2, 4, 192, 8, 300
    values, scales = random_fp8_cache(b, t, c)
    q_lat, q_pe, k_pe = torch.randn(b, s, h, c) * 0.05, torch.randn(b, s, h, r), torch.randn(b, t, r)
    mask = torch.rand(b, s, t) > 0.3 if masked else None
    expected = mla_decode_ref(q_lat, q_pe, dequantised(values, scales), k_pe, mask, 0.2)
    tolerance = dict(rtol=RTOL, atol=RTOL * expected.abs().max().item())
    chunked = mla_decode_fp8_ref(q_lat, q_pe, values, scales, k_pe, mask, 0.2, chunk=64)  # five chunks, one partial
    torch.testing.assert_close(chunked, expected, **tolerance)
    before = kernel_launches["mla_decode_fp8"]
    with triton_on_cpu():
        kernel = mla_decode_fp8(q_lat, q_pe, values, scales, k_pe, mask, 0.2)
    assert kernel_launches["mla_decode_fp8"] == before + 1
    torch.testing.assert_close(kernel, expected, **tolerance)


class RoundTripLayer(LatentCacheLayer):
    """A full-precision cache layer storing `c_kv` rounded through FP8 tiles (`quantise`) and back (`dequantised`)."""

    def __init__(self, scale_fmt: str | None, quantise=deepseek_act_quant) -> None:
        super().__init__()
        self.scale_fmt, self.quantise = scale_fmt, quantise

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(dequantised(*self.quantise(key_states.contiguous(), self.scale_fmt)), value_states)


def generated_logits(model, ids, cache, new_tokens: int = 4) -> torch.Tensor:
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=cache, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    return torch.stack(out.logits)


def rounded_latent_cache(config, scale_fmt: str | None = None, quantise=deepseek_act_quant) -> MLACache:
    cache = MLACache(config)
    cache.layers = [RoundTripLayer(scale_fmt, quantise) for _ in cache.layers]
    return cache


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_generate_with_fp8_cache_equals_generating_over_the_rounded_latent(scale_fmt):
    """Prefill (expanded path over the dequantised cache) and decode steps (absorbed, chunked) through the FP8 cache
    give the logits of a full-precision cache holding the FP8-rounded latent; they differ from the unrounded cache by
    FP8's rounding, a little. (Dense layers only: in a random MoE the rounding may flip an expert choice, which moves
    the logits by far more than the rounding itself.)"""
    torch.manual_seed(2)
    model = random_model(kv_lora_rank=192, first_k_dense_replace=3)
    ids = random_ids(model.config, 2, 7)
    full = generated_logits(model, ids, MLACache(model.config))
    fp8 = generated_logits(model, ids, MLACache(model.config, cache_dtype="fp8", scale_fmt=scale_fmt))
    expected = generated_logits(model, ids, rounded_latent_cache(model.config, scale_fmt))
    torch.testing.assert_close(fp8, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())
    difference = (fp8 - full).abs().max().item()
    assert 0 < difference < 0.05 * full.abs().max().item()
    static = MLAStaticCache(config=model.config, max_cache_len=16, cache_dtype="fp8", scale_fmt=scale_fmt)
    torch.testing.assert_close(generated_logits(model, ids, static), fp8, rtol=RTOL, atol=RTOL * fp8.abs().max().item())


def test_generate_runs_the_fp8_decode_kernel():
    torch.manual_seed(3)
    model = random_model()  # kv_lora_rank 32: a single partial tile
    ids = random_ids(model.config, 1, 5)
    before = kernel_launches["mla_decode_fp8"]
    # the other ops run on their kernels too, on both sides; the latent is rounded by the package's `act_quant` on
    # both, which is then the Triton interpreter's, whose float8 casts differ from a GPU's (tests/kernels/test_fp8.py):
    # here the decode kernel is what is compared (the rounding is checked against DeepSeek's formulas above)
    with triton_on_cpu():
        got = generated_logits(model, ids, MLACache(model.config, cache_dtype="fp8"), new_tokens=2)
        expected = generated_logits(model, ids, rounded_latent_cache(model.config, None, act_quant), new_tokens=2)
    assert kernel_launches["mla_decode_fp8"] > before
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cache_dtype="fp16"), r"cache_dtype must be one of \(None, 'fp8'\), got 'fp16'"),
        (dict(cache_dtype="fp8", scale_fmt="e8m0"), r"scale_fmt must be one of \(None, 'ue8m0'\), got 'e8m0'"),
        (dict(scale_fmt="ue8m0"), r"scale_fmt='ue8m0' applies to cache_dtype='fp8' only"),
    ],
)
def test_bad_cache_options_are_refused(options, message):
    config = tiny_config()
    with pytest.raises(ValueError, match=message):
        MLACache(config, **options)
    with pytest.raises(ValueError, match=message):
        MLAStaticCache(config=config, max_cache_len=8, **options)


def test_an_fp8_cache_for_deepseek_v32_is_refused():
    config = load_preset("tiny-deepseek-v32", quantization_config=None)
    message = r"cache_dtype='fp8' is not built for DeepSeek-V3.2"
    with pytest.raises(ValueError, match=message):
        MLACache(config, cache_dtype="fp8")
    with pytest.raises(ValueError, match=message):
        MLAStaticCache(config=config, max_cache_len=8, cache_dtype="fp8")


def test_generate_cache_config_builds_the_fp8_cache():
    """`generate(cache_config={"cache_dtype": "fp8", ...})` decodes over the FP8 latent cache, plain and speculative
    (the MTP loop's own cache), and speculative greedy decoding keeps plain greedy decoding's tokens."""
    torch.manual_seed(4)
    model = random_model(num_nextn_predict_layers=1)
    ids = random_ids(model.config, 2, 6)
    options = {"cache_dtype": "fp8", "scale_fmt": "ue8m0"}
    by_config = model.generate(ids, max_new_tokens=4, do_sample=False, cache_config=options, output_logits=True,
                               return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(torch.stack(by_config.logits), generated_logits(model, ids, MLACache(model.config, **options)))
    speculative = model.generate(ids, max_new_tokens=4, do_sample=False, use_mtp=True, cache_config=options)
    assert torch.equal(speculative, by_config.sequences)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cache_config={"cache_dtype": "fp16"}), r"cache_dtype must be one of"),
        (dict(cache_config={"dtype": "fp8"}), r"cache_config: the latent MLACache takes cache_dtype, scale_fmt, got"),
        (dict(cache_config={"cache_dtype": "fp8"}, cache_implementation="static"), "not cache_implementation='static'"),
    ],
)
def test_bad_generate_cache_config_is_refused(options, message):
    model = random_model()
    ids = random_ids(model.config, 1, 4)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2, **options)
    with pytest.raises(ValueError, match="but a cache was passed in"):
        model.generate(ids, max_new_tokens=2, cache_config={"cache_dtype": "fp8"}, cache=MLACache(model.config))


def test_beam_search_reorders_the_scales_with_the_values():
    """Beam search reorders and repeats cache rows: the FP8 cache moves its scales along (same beams as a full-precision
    cache holding the rounded latent)."""
    torch.manual_seed(5)
    model = random_model(kv_lora_rank=192, first_k_dense_replace=3)
    ids = random_ids(model.config, 2, 5)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
                 return_dict_in_generate=True)  # fmt: skip
    fp8 = model.generate(ids, cache_config={"cache_dtype": "fp8"}, **beams)
    expected = model.generate(ids, cache=rounded_latent_cache(model.config), **beams)
    assert torch.equal(fp8.sequences, expected.sequences)
    torch.testing.assert_close(fp8.sequences_scores, expected.sequences_scores, rtol=RTOL, atol=RTOL)


# ---- paged (continuous batching) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_generate_batch_over_fp8_pages_matches_generate_over_the_fp8_cache(scale_fmt):
    torch.manual_seed(6)
    model = random_model(kv_lora_rank=192, first_k_dense_replace=3)
    prompts = [random_ids(model.config, 1, n)[0].tolist() for n in (5, 9, 3)]
    options = {"cache_dtype": "fp8", "scale_fmt": scale_fmt}
    out = model.generate_batch(prompts, max_new_tokens=6, do_sample=False, cache_config=options)
    for i, prompt in enumerate(prompts):
        dense = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               cache=MLACache(model.config, **options))  # fmt: skip
        assert out[f"req_{i}"].generated_tokens == dense[0, len(prompt) :].tolist()


def test_paged_fp8_cache_reports_its_row_bytes():
    """A paged FP8 row: 192 e4m3 values, 2 fp32 scales, 8 fp32 rope values = 232 bytes per token and layer."""
    model = random_model(kv_lora_rank=192)
    config = GenerationConfig(max_new_tokens=4, cache_config={"cache_dtype": "fp8"})
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=(
            ContinuousBatchingConfig(num_blocks=4, page_size=16))) as manager:  # fmt: skip
        assert manager.batch_processor.cache.bytes_per_token() == model.config.num_hidden_layers * 232


def test_paged_fp8_decode_equals_decoding_the_dequantised_pages():
    torch.manual_seed(7)
    pages, page_size, b, s, h, c, r = 6, 16, 2, 2, 4, 192, 8
    values, scales = random_fp8_cache(pages, page_size, c)  # [pages, P, c], [pages, P, 2]
    k_pe = torch.randn(pages, page_size, r)
    block_table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([37, 20], dtype=torch.int32)
    q_lat, q_pe = torch.randn(b, s, h, c) * 0.05, torch.randn(b, s, h, r)
    # the test's own gather: row b's key j is token j % P of page block_table[b, j // P]
    dense_c_kv = dequantised(values, scales)[block_table.long()].flatten(1, 2)
    dense_k_pe = k_pe[block_table.long()].flatten(1, 2)
    positions = seq_lens[:, None] - s + torch.arange(s)
    mask = torch.arange(dense_c_kv.shape[1]) <= positions[:, :, None]
    expected = mla_decode_ref(q_lat, q_pe, dense_c_kv, dense_k_pe, mask, 0.2)
    tolerance = dict(rtol=RTOL, atol=RTOL * expected.abs().max().item())
    reference = mla_decode_paged_fp8(q_lat, q_pe, values, scales, k_pe, block_table, seq_lens, 0.2)
    torch.testing.assert_close(reference, expected, **tolerance)
    before = kernel_launches["mla_decode_paged_fp8"]
    with triton_on_cpu():
        kernel = mla_decode_paged_fp8(q_lat, q_pe, values, scales, k_pe, block_table, seq_lens, 0.2)
    assert kernel_launches["mla_decode_paged_fp8"] == before + 1
    torch.testing.assert_close(kernel, expected, **tolerance)


def test_bad_paged_cache_options_are_refused():
    model = random_model()
    with pytest.raises(ValueError, match=r"cache_dtype must be one of \(None, 'fp8'\), got 'int8'"):
        model.generate_batch([[5, 6]], max_new_tokens=2, cache_config={"cache_dtype": "int8"})


def test_generate_batch_reads_fp8_pages_through_the_kernel():
    torch.manual_seed(8)
    model = random_model(first_k_dense_replace=3)
    prompts = [random_ids(model.config, 1, n)[0].tolist() for n in (4, 6)]
    run = dict(max_new_tokens=3, do_sample=False, cache_config={"cache_dtype": "fp8"})
    expected = model.generate_batch(prompts, **run)
    before = kernel_launches["mla_decode_paged_fp8"]
    with triton_on_cpu():
        got = model.generate_batch(prompts, **run)
    assert kernel_launches["mla_decode_paged_fp8"] > before
    assert all(got[key].generated_tokens == expected[key].generated_tokens for key in expected)

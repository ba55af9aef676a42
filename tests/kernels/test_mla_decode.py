"""Latent-attention decode: the Triton kernel equals `mla_decode_ref`, in fp16 and bf16 within rounding of an fp64
reference, and a model run through the dispatch launches the kernel and gives the torch path's logits.

bf16 runs on CUDA only: the interpreter multiplies the raw bits of bf16 `tl.dot` operands (triton-lang/triton#11584).
"""

import copy

import pytest
import torch

from modeling_deepseek_v3 import MLACache, MLAStaticCache
from modeling_deepseek_v3.kernels import mla_decode_paged_ref, mla_decode_ref

from ..utils import random_ids, random_model, tiny_config
from .common import BF16_DOT, DEVICE, assert_close, ref_latent_attention, through_kernels

pytest.importorskip("triton")
from modeling_deepseek_v3.kernels.latent_decode import mla_decode_paged_triton, mla_decode_triton  # noqa: E402

LOW_PRECISION = [pytest.param(torch.float16, id="fp16"), BF16_DOT]
SCALE = 0.125


def inputs(b, s, h, c, r, t, dtype=torch.float32):
    q_lat, q_pe = torch.randn(b, s, h, c), torch.randn(b, s, h, r)
    c_kv, k_pe = torch.randn(b, t, c), torch.randn(b, t, r)
    return [x.to(dtype) for x in (q_lat, q_pe, c_kv, k_pe)]


def causal_mask(b, s, t, left_pad=()):
    """Query i at position t - s + i; row j of the batch has its first left_pad[j] keys padded."""
    mask = (torch.arange(t) <= torch.arange(t - s, t)[:, None]).expand(b, s, t).clone()
    for row, pad in enumerate(left_pad):
        mask[row, :, :pad] = False
    return mask


# b, s, h, c, r, t, splits, left padding (None: no mask, the kernel's own causal rule)
CASES = [
    (1, 1, 4, 32, 8, 37, 1, None),
    (3, 1, 16, 64, 16, 300, 3, (0, 150, 7)),  # row 1: the first split is all padding
    (2, 3, 4, 32, 8, 77, 2, None),
    (2, 3, 24, 32, 8, 130, 1, (5, 0)),  # 72 query rows: two head blocks, the second partial
    (2, 8, 4, 48, 8, 70, None, (0, 33)),  # c = 48: not a power of two
]
IDS = [f"b{b}-s{s}-h{h}-c{c}-t{t}-splits{n}-{'mask' if p else 'causal'}" for b, s, h, c, r, t, n, p in CASES]


@pytest.mark.parametrize("b, s, h, c, r, t, splits, left_pad", CASES, ids=IDS)
def test_kernel_equals_reference_fp32(b, s, h, c, r, t, splits, left_pad):
    q_lat, q_pe, c_kv, k_pe = inputs(b, s, h, c, r, t)
    mask = None if left_pad is None else causal_mask(b, s, t, left_pad)
    out = mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, SCALE, num_splits=splits)
    ref = mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kernel_low_precision_within_rounding(dtype):
    q_lat, q_pe, c_kv, k_pe = inputs(2, 3, 8, 64, 16, 200, dtype)
    mask = causal_mask(2, 3, 200, (0, 60))
    out = mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, SCALE, num_splits=3)
    assert out.dtype == dtype
    assert_close(out, ref_latent_attention(q_lat, q_pe, c_kv, k_pe, mask, SCALE), dtype)


def test_strided_queries_and_broadcast_mask():
    """The model passes q_lat as a transposed view and may pass an `expand`ed [s, t] mask: both read in place."""
    q_lat, q_pe, c_kv, k_pe = inputs(2, 3, 4, 32, 8, 50)
    q_lat = q_lat.transpose(1, 2).contiguous().transpose(1, 2)  # [b, s, h, c] with [b, h, s, c] storage
    mask = (torch.arange(50) <= torch.arange(40, 43)[:, None]).expand(2, 3, 50)  # stride 0 along b
    out = mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, SCALE, num_splits=2)
    ref = mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "three-splits"])
def test_query_without_keys_gets_zeros(splits):
    q_lat, q_pe, c_kv, k_pe = inputs(2, 2, 4, 32, 8, 200)
    mask = causal_mask(2, 2, 200)
    mask[1, 0] = False  # a padding query: nothing to attend to
    out = mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, SCALE, num_splits=splits)
    assert torch.isfinite(out).all() and not out[1, 0].any()
    ref = mla_decode_ref(q_lat, q_pe, c_kv, k_pe, mask, SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_rejects_bad_input():
    q_lat, q_pe, c_kv, k_pe = inputs(1, 2, 4, 32, 8, 10)
    with pytest.raises(ValueError, match="mask must be bool"):
        mla_decode_triton(q_lat, q_pe, c_kv, k_pe, torch.ones(1, 2, 10), SCALE)
    with pytest.raises(ValueError, match="shapes disagree"):
        mla_decode_ref(q_lat, q_pe, c_kv[:, :, :16], k_pe, None, SCALE)
    with pytest.raises(ValueError, match="share one of"):
        mla_decode_triton(q_lat.double(), q_pe, c_kv, k_pe, None, SCALE)
    with pytest.raises(ValueError, match="s <= t"):
        mla_decode_ref(q_lat, q_pe, c_kv[:, :1], k_pe[:, :1], None, SCALE)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode_triton(q_lat, q_pe, c_kv, k_pe, None, SCALE, num_splits=0)


# CPU and CUDA runs of a model differ in the order of every matmul's sums
MODEL_TOL = 1e-5 if DEVICE == "cpu" else 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])  # boolean and additive masks
@pytest.mark.parametrize("left_padding", [True, False], ids=["left-padded", "no-padding"])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_model_absorbed_path_through_kernel(attn_implementation, left_padding, new_tokens):
    """Decode and speculative steps over a cache: the kernel gives the torch path's logits (the torch path on the
    CPU, outside `triton_on_cpu`)."""
    model = random_model(tiny_config(mla_attention_path="absorbed"))
    model.set_attn_implementation(attn_implementation)
    ids = random_ids(model.config, 2, 12)
    mask = torch.ones_like(ids)
    if left_padding:
        mask[1, :4] = 0

    def step(model, ids, mask):
        cache = MLACache(model.config)
        model(ids[:, :-new_tokens], attention_mask=mask[:, :-new_tokens], cache=cache, use_cache=True)
        return model(ids[:, -new_tokens:], attention_mask=mask, cache=cache, use_cache=True).logits

    reference = step(copy.deepcopy(model).cpu(), ids.cpu(), mask.cpu())
    with through_kernels("mla_decode"), torch.no_grad():  # the kernel has no backward: it serves inference
        logits = step(model, ids, mask)
    torch.testing.assert_close(logits.cpu(), reference, rtol=MODEL_TOL, atol=MODEL_TOL)


def test_static_cache_without_mask_through_kernel():
    """No mask and a static cache: the empty slots after the filled ones stay invisible to the kernel."""
    model = random_model(tiny_config(mla_attention_path="absorbed"))
    ids = random_ids(model.config, 2, 8)
    full = copy.deepcopy(model).cpu()(ids.cpu()).logits
    cache = MLAStaticCache(config=model.config, max_cache_len=32)
    with through_kernels("mla_decode"), torch.no_grad():
        steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1).cpu(), full, rtol=MODEL_TOL, atol=MODEL_TOL)


def paged_inputs(seq_lens, s, h, c, r, page_size, dtype=torch.float32):
    """Rows of `seq_lens` keys scattered over shuffled pages of one interleaved `[pages, P, c + r]` pool (the layout of
    the paged latent cache), with spare pages in between; returns queries, the pool's c_kv / k_pe views, the block
    table and the dense per-row keys for `mla_decode_ref`."""
    b = len(seq_lens)
    width = max(-(-n // page_size) for n in seq_lens)
    num_pages = 2 * b * width + 3
    pool = torch.randn(num_pages, page_size, c + r).to(dtype)
    order = torch.randperm(num_pages).to(torch.int32)
    block_table = torch.full((b, width), -7, dtype=torch.int32)  # unread entries hold garbage on purpose
    c_kv, k_pe = torch.zeros(b, max(seq_lens), c, dtype=dtype), torch.zeros(b, max(seq_lens), r, dtype=dtype)
    for row, n in enumerate(seq_lens):
        pages = order[row * width : row * width + -(-n // page_size)]
        block_table[row, : len(pages)] = pages
        keys = pool[pages.long()].flatten(0, 1)[:n]
        c_kv[row, :n], k_pe[row, :n] = keys[:, :c], keys[:, c:]
    q_lat, q_pe = torch.randn(b, s, h, c).to(dtype), torch.randn(b, s, h, r).to(dtype)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q_lat, q_pe, pool[..., :c], pool[..., c:], block_table, seq_lens, c_kv, k_pe


def paged_causal_mask(seq_lens, s, t):
    """Query i of row b at position seq_lens[b] - s + i."""
    positions = seq_lens[:, None].long() - s + torch.arange(s)
    return torch.arange(t) <= positions[:, :, None]


# row key counts, s, h, c, r, page size, splits
PAGED_CASES = [
    ((37,), 1, 4, 32, 8, 16, 1),
    ((5, 300, 64, 129), 1, 16, 64, 16, 64, 3),  # rows end mid-page and on a page boundary; short rows skip splits
    ((40, 9), 3, 4, 48, 8, 16, None),  # c = 48 (not a power of two); three new tokens per row
    ((2, 70), 4, 24, 32, 8, 32, 2),  # row 0: 4 query slots over 2 keys, the first two see nothing (padding)
]
PAGED_IDS = [f"rows{len(n)}-s{s}-h{h}-c{c}-P{p}-splits{k}" for n, s, h, c, r, p, k in PAGED_CASES]


@pytest.mark.parametrize("seq_lens, s, h, c, r, page_size, splits", PAGED_CASES, ids=PAGED_IDS)
def test_paged_kernel_equals_reference_fp32(seq_lens, s, h, c, r, page_size, splits):
    q_lat, q_pe, c_pages, pe_pages, block_table, lens, c_kv, k_pe = paged_inputs(seq_lens, s, h, c, r, page_size)
    out = mla_decode_paged_triton(q_lat, q_pe, c_pages, pe_pages, block_table, lens, SCALE, num_splits=splits)
    ref = mla_decode_paged_ref(q_lat, q_pe, c_pages, pe_pages, block_table, lens, SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # the paged reference is the dense one on each row's own keys (up to the order of the fp32 sums)
    dense = mla_decode_ref(q_lat, q_pe, c_kv, k_pe, paged_causal_mask(lens, s, c_kv.shape[1]), SCALE)
    torch.testing.assert_close(ref, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_paged_kernel_low_precision_within_rounding(dtype):
    q_lat, q_pe, c_pages, pe_pages, block_table, lens, c_kv, k_pe = paged_inputs((100, 31, 64), 2, 8, 64, 16, 16, dtype)
    out = mla_decode_paged_triton(q_lat, q_pe, c_pages, pe_pages, block_table, lens, SCALE, num_splits=2)
    assert out.dtype == dtype
    ref = ref_latent_attention(q_lat, q_pe, c_kv, k_pe, paged_causal_mask(lens, 2, c_kv.shape[1]), SCALE)
    assert_close(out, ref, dtype)


def test_paged_rejects_bad_input():
    q_lat, q_pe, c_pages, pe_pages, block_table, lens, _, _ = paged_inputs((20, 9), 1, 4, 32, 8, 8)
    with pytest.raises(ValueError, match="block_table must be int32"):
        mla_decode_paged_triton(q_lat, q_pe, c_pages, pe_pages, block_table.long(), lens, SCALE)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        mla_decode_paged_ref(q_lat, q_pe, c_pages, pe_pages, block_table, lens[:1], SCALE)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        mla_decode_paged_ref(q_lat, q_pe, c_pages, pe_pages, block_table, lens + 100, SCALE)
    bad_table = block_table.clone()
    bad_table[0, 0] = c_pages.shape[0]
    with pytest.raises(ValueError, match="page ids outside"):
        mla_decode_paged_ref(q_lat, q_pe, c_pages, pe_pages, bad_table, lens, SCALE)
    with pytest.raises(ValueError, match="shapes disagree"):
        mla_decode_paged_ref(q_lat[..., :16], q_pe, c_pages, pe_pages, block_table, lens, SCALE)


def test_continuous_batching_through_paged_kernel():
    """generate_batch with the decode groups' latent attention in the paged kernel, reading the pool through the
    block tables the model builds: the same tokens as the torch path over gathered keys (on the CPU)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = random_model()
    prompts = [random_ids(model.config, 1, n)[0].tolist() for n in (3, 40, 17)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=model.config.eos_token_id)
    cb_config = ContinuousBatchingConfig(num_blocks=12, page_size=16, max_batch_tokens=32)

    def generate(model):
        outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config)
        return [output.generated_tokens for output in outputs.values()]

    reference = generate(copy.deepcopy(model).cpu())
    with through_kernels("mla_decode_paged"):
        tokens = generate(model)
    assert tokens == reference

"""Sparse latent attention (DeepSeek-V3.2): the Triton kernel, which gathers each query's chosen latent rows by
pointer, equals a plain reference written here (rows gathered by indexing, scores, softmax, weighted sum, fp64), with
partial tiles and invalid slots; and a tiny V3.2 model decoding through the dispatch launches the kernel and gives the
torch path's logits.

bf16 runs on CUDA only: the interpreter multiplies the raw bits of bf16 `tl.dot` operands (triton-lang/triton#11584).
"""

import pytest
import torch

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, MLACache, indexer, load_preset
from modeling_deepseek_v3.kernels import act_quant_ref, sparse_mla_decode

from .common import DEVICE, DOT_DTYPES, assert_close, through_kernels

pytest.importorskip("triton")
from modeling_deepseek_v3.kernels.sparse_latent_decode import BLOCK_N, sparse_mla_decode_triton  # noqa: E402

SCALE = 0.125


def inputs(b, s, h, c, r, t, k, dtype, invalid_fraction, generator):
    """Random queries and cache, and per query k distinct random rows of the t keys, a fraction of them invalid
    (their index -1, which the kernel must never read)."""
    q_lat, q_pe = torch.randn(b, s, h, c, generator=generator), torch.randn(b, s, h, r, generator=generator)
    c_kv, k_pe = torch.randn(b, t, c, generator=generator), torch.randn(b, t, r, generator=generator)
    indices = torch.rand(b, s, t, generator=generator).argsort(dim=-1)[..., :k]
    valid = torch.rand(b, s, k, generator=generator) >= invalid_fraction
    indices = indices.masked_fill(~valid, -1)
    return [x.to(dtype) for x in (q_lat, q_pe, c_kv, k_pe)] + [indices, valid]


def plain_reference(q_lat, q_pe, c_kv, k_pe, indices, valid, scale):
    """fp64, one query and head at a time: its valid rows gathered by indexing, scores, softmax, weighted sum."""
    b, s, h, c = q_lat.shape
    out = torch.zeros(b, s, h, c, dtype=torch.float64)
    for i in range(b):
        for j in range(s):
            rows = indices[i, j][valid[i, j]]
            if rows.numel() == 0:
                continue  # no valid slot: zeros
            keys, pe = c_kv[i, rows].double(), k_pe[i, rows].double()
            for head in range(h):
                scores = (keys @ q_lat[i, j, head].double() + pe @ q_pe[i, j, head].double()) * scale
                out[i, j, head] = scores.softmax(dim=0) @ keys
    return out


# b, s, h, c, r, t, k, invalid fraction: k not a multiple of BLOCK_N (partial last tile), h not a power of two
CASES = [
    (1, 1, 4, 32, 8, 50, 20, 0.0),  # one partial tile
    (2, 3, 5, 48, 16, 120, 70, 0.3),  # three tiles, the last partial; c = 48 not a power of two
    (2, 2, 20, 32, 8, 64, 33, 0.5),  # two head blocks (fp32: 16 heads a block), the second partial
]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("b, s, h, c, r, t, k, invalid", CASES, ids=lambda v: str(v))
def test_kernel_equals_plain_reference(b, s, h, c, r, t, k, invalid, dtype):
    assert k % BLOCK_N != 0
    generator = torch.Generator().manual_seed(b * 100 + k)
    args = [x.to(DEVICE) for x in inputs(b, s, h, c, r, t, k, dtype, invalid, generator)]
    with through_kernels("sparse_mla_decode"):
        out = sparse_mla_decode(*args, SCALE)
    assert out.dtype == dtype and out.shape == (b, s, h, c)
    assert_close(out, plain_reference(*[x.cpu() for x in args], SCALE), dtype)


def test_query_without_valid_slot_gets_zeros_and_never_reads_its_indices():
    generator = torch.Generator().manual_seed(1)
    q_lat, q_pe, c_kv, k_pe, indices, valid = inputs(2, 2, 4, 32, 8, 40, 10, torch.float32, 0.2, generator)
    valid[1, 0] = False
    indices[1, 0] = 10**9  # far outside the cache: a read would fault or give garbage
    args = [x.to(DEVICE) for x in (q_lat, q_pe, c_kv, k_pe, indices, valid)]
    out = sparse_mla_decode_triton(*args, SCALE).cpu()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    indices[1, 0] = 0
    assert_close(out, plain_reference(q_lat, q_pe, c_kv, k_pe, indices, valid, SCALE), torch.float32)


def test_broadcast_selection_and_strided_cache_are_read_in_place():
    """The dense warm-up's selection is an `expand`ed arange; a cache's latents may be a view of a larger buffer."""
    generator = torch.Generator().manual_seed(2)
    q_lat, q_pe, c_kv, k_pe, _, _ = inputs(2, 3, 4, 32, 8, 45, 45, torch.float32, 0.0, generator)
    buffer = torch.randn(2, 60, 32 + 8, generator=generator)
    buffer[:, :45, :32], buffer[:, :45, 32:] = c_kv, k_pe
    indices = torch.arange(45).expand(2, 3, 45)
    valid = (torch.arange(45) <= torch.arange(42, 45)[:, None]).expand(2, 3, 45)  # causal
    args = [x.to(DEVICE) for x in (q_lat, q_pe, buffer[:, :45, :32], buffer[:, :45, 32:], indices, valid)]
    out = sparse_mla_decode_triton(*args, SCALE)
    assert_close(out, plain_reference(q_lat, q_pe, c_kv, k_pe, indices, valid, SCALE), torch.float32)


@pytest.mark.parametrize("field, bad", [("indices", "float"), ("valid", "shape")])
def test_bad_selection_is_refused(field, bad):
    generator = torch.Generator().manual_seed(3)
    q_lat, q_pe, c_kv, k_pe, indices, valid = inputs(1, 1, 4, 32, 8, 40, 10, torch.float32, 0.0, generator)
    if bad == "float":
        indices = indices.float()
    else:
        valid = valid[..., :5]
    with pytest.raises(ValueError, match=field):
        sparse_mla_decode_triton(q_lat, q_pe, c_kv, k_pe, indices, valid, SCALE)


def test_tiny_v32_model_decodes_through_the_kernel(monkeypatch):
    """A prompt longer than index_topk (so every step attends to a chosen subset), left padding in one row, then
    single-token steps: the logits through the kernel equal the torch path's within fp32 rounding of a differently
    ordered sum (1e-4 absolute on logits of magnitude ~1).

    The indexer's FP8 rounding stays on its torch path in both runs: the interpreter rounds FP8 ties unlike CUDA and
    torch (tests/kernels/test_fp8.py), which changes a few indexer keys and so the top-k picks; this test is about
    the attention over the picks."""
    monkeypatch.setattr(indexer, "act_quant", lambda x, scale_fmt=None: act_quant_ref(x, scale_fmt=scale_fmt))
    torch.manual_seed(0)
    config = load_preset("tiny-deepseek-v32", quantization_config=None, initializer_range=0.1)
    model = DeepseekV3ForCausalLM(config).eval().to(DEVICE)
    ids = torch.randint(3, 256, (2, 14), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones(2, 14, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0
    assert config.index_topk < 11

    def decode():
        cache, logits = MLACache(config), []
        with torch.no_grad():
            for start, end in [(0, 11), (11, 12), (12, 13), (13, 14)]:
                step = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
                logits.append(step.logits)
        return torch.cat(logits, dim=1)

    torch_path = decode()
    with through_kernels("sparse_mla_decode"):
        kernel_path = decode()
    real = mask.bool()  # a padding query attends to nothing: its logits are not used
    torch.testing.assert_close(kernel_path[real], torch_path[real], rtol=0, atol=1e-4)

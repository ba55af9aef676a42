"""Every autotune config of every autotuned kernel, launched on its own (`Tuned.pin`) on small shapes that leave
partial tiles for every block size, against fp64 references written in `common.py`. The autotuner (CUDA) and the
interpreter's default (the first config) would otherwise leave the other configs untested. The non-autotuned kernels
(FP8 quantisation, `fp8_gemm`, the decode merge) have one config each, run by their own tests."""

import pytest
import torch

from ..utils import e4m3_value, row_tiles, weight_blocks
from .common import (
    SKIP_BF16_DOT_ON_CPU,
    assert_close,
    ref_grouped_mm,
    ref_grouped_wgrad,
    ref_latent_attention,
    ref_swiglu,
)

pytest.importorskip("triton")
from modeling_deepseek_v3.kernels import latent_decode, moe_gemm  # noqa: E402
from modeling_deepseek_v3.kernels.tuning import TUNED  # noqa: E402

COUNTS = [3, 0, 70]  # rows per expert: an empty expert, and 70 rows (partial tiles for BLOCK_M 32, 64 and 128)
K, N = 80, 136  # a partial second K block (BLOCK_K 64) and N tile (BLOCK_N 128)


def offsets():
    return torch.tensor(COUNTS).cumsum(0).to(torch.int32)


def expert_weights(dtype, n=N, k=K):
    return (torch.randn(len(COUNTS), n, k) * k**-0.5).to(dtype).transpose(1, 2)  # [E, K, N], a transposed view


def grouped_mm(dtype):
    x, w = torch.randn(sum(COUNTS), K).to(dtype), expert_weights(dtype)
    return moe_gemm.grouped_mm_triton(x, w, offsets()), ref_grouped_mm(x, w, offsets())


def grouped_swiglu(dtype):
    x, w_gate, w_up = torch.randn(sum(COUNTS), K).to(dtype), expert_weights(dtype), expert_weights(dtype)
    with torch.no_grad():
        out = moe_gemm.grouped_swiglu_triton(x, w_gate, w_up, offsets())
    return out, ref_swiglu(x, w_gate, w_up, offsets())


def grouped_wgrad(dtype):
    x, dy = torch.randn(sum(COUNTS), K).to(dtype), torch.randn(sum(COUNTS), N).to(dtype)
    return moe_gemm.grouped_mm_wgrad_triton(x, dy, offsets()), ref_grouped_wgrad(x, dy, offsets())


def fp8_grouped_gemm(dtype):
    k = 256  # two 128-wide quantisation blocks
    a, a_s = row_tiles(torch.randn(sum(COUNTS), k) * torch.logspace(-1, 1, k))
    w, w_s = weight_blocks(torch.randn(len(COUNTS), N, k) * 0.05)
    out = moe_gemm.fp8_grouped_gemm_triton(a, a_s, w, w_s, offsets(), dtype)
    ref = ref_grouped_mm(e4m3_value(a, a_s, (1, 128)), e4m3_value(w, w_s, (128, 128)).transpose(1, 2), offsets())
    return out, ref


def latent_decode_attention(dtype):
    b, s, h, c, r, t = 2, 2, 4, 32, 8, 77  # 77 keys: partial BLOCK_N tiles
    q_lat, q_pe, c_kv, k_pe = (torch.randn(*shape).to(dtype) for shape in ((b, s, h, c), (b, s, h, r), (b, t, c),
                                                                           (b, t, r)))
    mask = (torch.arange(t) <= torch.arange(t - s, t)[:, None]).expand(b, s, t).clone()
    mask[1, :, :20] = False  # left padding in row 1
    out = latent_decode.mla_decode_triton(q_lat, q_pe, c_kv, k_pe, mask, 0.125, num_splits=2)  # and the merge
    return out, ref_latent_attention(q_lat, q_pe, c_kv, k_pe, mask, 0.125)


# (autotuned launcher, a call that runs it): every launcher in `TUNED` must appear here
CALLS = [
    (moe_gemm._gemm, grouped_mm),
    (moe_gemm._gemm, grouped_swiglu),
    (moe_gemm._wgrad, grouped_wgrad),
    (moe_gemm._fp8_gemm, fp8_grouped_gemm),
    (latent_decode._mla_decode, latent_decode_attention),
]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
CASES = [
    # fp8_grouped_gemm multiplies e4m3 operands (a bf16 output only): its bf16 case runs in the interpreter too
    pytest.param(tuned, call, i, dtype, id=f"{call.__name__}-config{i}-{DTYPE_IDS[dtype]}",
                 marks=SKIP_BF16_DOT_ON_CPU if dtype == torch.bfloat16 and call is not fp8_grouped_gemm else ())
    for tuned, call in CALLS for i in range(len(tuned.configs)) for dtype in DTYPE_IDS
]


def test_every_autotuned_kernel_is_covered():
    assert {id(tuned) for tuned in TUNED} == {id(tuned) for tuned, _ in CALLS}


@pytest.mark.parametrize("tuned, call, index, dtype", CASES)
def test_config_equals_fp64_reference(tuned, call, index, dtype):
    with tuned.pin(tuned.configs[index]):
        out, ref = call(dtype)
    assert tuned.pinned_launches > 0
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


def test_pin_refuses_a_foreign_config():
    with pytest.raises(ValueError, match="is not one of the configs"):
        with moe_gemm._gemm.pin(moe_gemm.WGRAD_CONFIGS[0]):
            pass

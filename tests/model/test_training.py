"""FP8 training: the grouped expert matmul's gradients, the one-call switch, and a 200-step training run in FP8 that
ends as close to the same run in full precision as a change of init seed moves it (`benchmarks/fp8_training.py`)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.fp8 import FP8TrainingLinear, fp8_grouped_mm
from modeling_deepseek_v3.kernels import grouped_mm_ref
from modeling_deepseek_v3.training import enable_fp8_training

from ..utils import (
    EMULATION_TOLERANCE,
    QUANTIZATION,
    SHAPE,
    through_column_tiles,
    through_row_tiles,
    through_weight_blocks,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the training run and its data: benchmarks/fp8_training.py


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_grouped_mm_matches_fp32_within_fp8_error():
    counts = torch.tensor([40, 0, 150, 66])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 160, requires_grad=True)
    w = (torch.randn(4, 96, 160) * 0.05).requires_grad_()
    dy = torch.randn(x.shape[0], 96)
    y = fp8_grouped_mm(x, w, offsets)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = grouped_mm_ref(x_ref, w_ref.transpose(1, 2), offsets)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), dy)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw[[0, 2, 3]], dw_ref[[0, 2, 3]])):
        assert rel_err(got, ref) < 0.08, name
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))  # an expert without tokens gets no gradient


def test_switch_replaces_decoder_linears_and_keeps_parameters():
    model = DeepseekV3ForCausalLM(tiny_config())
    before = {name: p for name, p in model.named_parameters()}
    experts = model.model.layers[1].mlp.experts
    enable_fp8_training(model)
    assert dict(model.named_parameters()) == before  # the very same tensors: optimizers and checkpoints unaffected
    layers = model.model.layers
    assert type(layers[0].self_attn.kv_b_proj) is FP8TrainingLinear
    assert type(layers[0].mlp.down_proj) is FP8TrainingLinear  # dense layer
    assert type(layers[1].mlp.shared_experts.up_proj) is FP8TrainingLinear
    assert layers[1].mlp.experts is experts and experts.fp8_training  # the module itself: what set it up stays
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision
    assert not any(type(m) is nn.Linear for m in layers.modules())


def test_switch_refuses_fp8_weights():

    fp8 = DeepseekV3ForCausalLM(tiny_config(**SHAPE, quantization_config=QUANTIZATION))
    with pytest.raises(ValueError, match="master weights"):
        enable_fp8_training(fp8)
    with pytest.raises(ValueError, match="these experts store FP8 weights"):
        fp8.model.layers[1].mlp.experts.train_in_fp8()


NOISE = "seed-to-seed noise: |full_i - full_j| / full_j, per pair"


@pytest.mark.slow
def test_fp8_training_tracks_full_precision_training():
    """200 steps on Shakespeare bytes, init seed 0 and the same data order, fp32 master weights in both: every decoder
    GEMM in FP8 (experts included) vs the same GEMMs in full precision, compared on the loss of 64 held-out sequences
    at the end: `benchmarks/fp8_training.py` for one seed.

    Tolerance, from `benchmarks/results/fp8_training.json` (seeds 0, 1, 2; one torch thread): FP8 moved the end loss
    by +0.197%, +0.069% and -0.154% (seed 0: 2.4604 vs 2.4555), while changing only the init seed moved the
    full-precision loss by 0.30%, 0.52% and 0.82%. Rule: FP8 must move the loss by less than the median seed-to-seed
    difference, read from that file (0.52% now): FP8 then changes the result less than a typical change of seed does,
    with 2.6x the largest measured effect as margin, while FP8 that distorts training (losses off by whole % or more)
    fails. bf16 autocast is not the yardstick: on this model it lands ~2% from full precision by itself."""
    from fp8_training import shakespeare, train

    result = json.loads((ROOT / "benchmarks" / "results" / "fp8_training.json").read_text())
    tolerance = result["series"][NOISE]["median"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the benchmark's setting: the same sums in the same order
    try:
        data, held_out = shakespeare()
        first, end_fp8 = train(True, 200, data, held_out, seed=0)
        _, end_full = train(False, 200, data, held_out, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert end_full < 0.6 * first  # it learned something
    assert abs(end_fp8 - end_full) / end_full < tolerance, (end_fp8, end_full, tolerance)


def test_fp8_grouped_mm_uses_the_specified_tiles():
    """Each expert's GEMMs equal an fp64 emulation of the recipe's tiles (activations 1×128, weights 128×128 per
    expert, Wgrad 128×1 along the expert-sorted tokens) by the test's quantiser, within `EMULATION_TOLERANCE`."""

    counts = [40, 0, 150, 66]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 160, requires_grad=True)
    w = (torch.randn(4, 96, 160) * 0.05).requires_grad_()
    dy = torch.randn(x.shape[0], 96)
    y = fp8_grouped_mm(x, w, offsets)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xq, wq, dyq = through_row_tiles(x.detach()), through_weight_blocks(w.detach()), through_row_tiles(dy)
    dy_cols, x_cols = through_column_tiles(dy), through_column_tiles(x.detach())
    start = 0
    for e, count in enumerate(counts):
        rows = slice(start, start + count)
        if count:
            assert rel_err(y[rows], xq[rows] @ wq[e].t()) < EMULATION_TOLERANCE
            assert rel_err(dx[rows], dyq[rows] @ wq[e]) < EMULATION_TOLERANCE
            assert rel_err(dw[e], dy_cols[rows].t() @ x_cols[rows]) < EMULATION_TOLERANCE
        start += count

"""FP8 training: the grouped expert matmul's gradients, the one-call switch, and a 200-step training run in FP8 that
ends within 1% of the same run in full precision."""

from importlib import resources

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


def train(fp8: bool, steps: int, data: torch.Tensor, held_out: torch.Tensor) -> tuple[float, float]:
    """Returns (first training loss, final loss on the held-out batch). Warm-up then linear decay of the learning
    rate, so that the end point is settled rather than caught mid-descent (where tiny perturbations move it by %)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(hidden_size=128, q_lora_rank=64, kv_lora_rank=64,
                                              moe_intermediate_size=64, intermediate_size=256))
    if fp8:
        enable_fp8_training(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / steps)
    )
    generator = torch.Generator().manual_seed(1)
    first = None
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=generator)
        batch = torch.stack([data[s : s + 64] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        first = loss.item() if first is None else first
    model.eval()
    with torch.no_grad():
        return first, model(held_out, labels=held_out).loss.item()


@pytest.mark.slow
def test_fp8_training_tracks_full_precision_training():
    """200 steps on Shakespeare bytes, same seed and data order, fp32 master weights in both: every decoder GEMM in
    FP8 (experts included) vs the same GEMMs in full precision, compared on the loss of 64 held-out sequences at the
    end. Measured here: 2.4566 vs 2.4547 (0.08%; with init seed 1: 0.2%, while the two seeds themselves differ by
    0.5%); the report's figure is 0.25% at scale. bf16 autocast is not the yardstick: on this model it lands ~2%
    from full precision by itself."""
    text = resources.files("modeling_deepseek_v3.data").joinpath("shakespeare.txt").read_bytes()[:400_000]
    data = torch.tensor(list(text), dtype=torch.long)  # bytes as token ids (vocab 512 > 256)
    train_data, held_out = data[:350_000], data[350_000 : 350_000 + 64 * 64].view(64, 64)
    first, end_fp8 = train(True, 200, train_data, held_out)
    _, end_full = train(False, 200, train_data, held_out)
    assert end_full < 0.6 * first  # it learned something
    assert abs(end_fp8 - end_full) / end_full < 0.01, (end_fp8, end_full)


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

"""DeepSeekMoE: router vs brute force, the bias only chooses, grouped-GEMM experts vs a per-expert loop."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseek_v3.kernels import grouped_mm, grouped_mm_ref
from modeling_deepseek_v3.moe import MoE

from ..utils import tiny_config


def brute_force_route(scores, bias, cfg):
    """Try every allowed set of groups; inside them take the top-k biased scores (the routing rule)."""
    per_group = cfg.n_routed_experts // cfg.n_group
    out = []
    for s, choice in zip(scores, scores + bias):
        groups = choice.view(cfg.n_group, per_group)
        group_score = groups.topk(2).values.sum(-1)
        best = max(itertools.combinations(range(cfg.n_group), cfg.topk_group),
                   key=lambda gs: sum(group_score[g].item() for g in gs))
        allowed = torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in best])
        idx = allowed[choice[allowed].topk(cfg.num_experts_per_tok).indices]
        w = s[idx] / s[idx].sum() * cfg.routed_scaling_factor
        out.append(dict(zip(idx.tolist(), w.tolist())))
    return out


def make_moe(**overrides):
    moe = MoE(tiny_config(**overrides), layer_idx=1)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.normal_(0, 0.2)
    return moe


def test_router_matches_brute_force():
    moe = make_moe()
    cfg = moe.gate.config
    x = torch.randn(20, cfg.hidden_size)
    weights, indices, scores, logits = moe.gate(x)
    torch.testing.assert_close(logits, x @ moe.gate.weight.T)
    torch.testing.assert_close(scores, torch.sigmoid(x @ moe.gate.weight.T))
    for row, expected in enumerate(brute_force_route(scores, moe.gate.e_score_correction_bias, cfg)):
        got = dict(zip(indices[row].tolist(), weights[row].tolist()))
        assert got.keys() == expected.keys()
        for e in got:
            assert got[e] == pytest.approx(expected[e], rel=1e-5)


def test_bias_changes_choice_not_weights():
    moe = make_moe()
    x = torch.randn(64, moe.gate.config.hidden_size)
    w0, i0, s0, _ = moe.gate(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.add_(torch.linspace(-0.5, 0.5, moe.gate.config.n_routed_experts))
    w1, i1, s1, _ = moe.gate(x)
    assert not torch.equal(i0, i1)  # the choice moved
    torch.testing.assert_close(s0, s1)  # affinities untouched
    # the weights are always the normalised *unbiased* scores of the chosen experts
    expected = s1.gather(1, i1)
    torch.testing.assert_close(w1, expected / expected.sum(-1, keepdim=True) * moe.gate.config.routed_scaling_factor)


def test_bias_ignored_when_disabled():
    moe = make_moe(use_routing_bias=False)
    x = torch.randn(16, moe.gate.config.hidden_size)
    _, indices, scores, _ = moe.gate(x)
    assert torch.equal(indices.sort(-1).values, brute_force_indices(scores, moe.gate.config))


def brute_force_indices(scores, cfg):
    rows = brute_force_route(scores, torch.zeros(cfg.n_routed_experts), cfg)
    return torch.tensor([sorted(r) for r in rows])


def test_experts_match_per_expert_loop():
    moe = make_moe()
    ex = moe.experts
    x = torch.randn(30, moe.gate.config.hidden_size, requires_grad=True)
    weights, indices, _, _ = moe.gate(x)
    out = ex(x, indices, weights)
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], indices[t]):
            h = F.silu(x[t] @ ex.gate_proj[e].T) * (x[t] @ ex.up_proj[e].T)
            ref[t] += w * (h @ ex.down_proj[e].T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_out = torch.autograd.grad(out.square().sum(), (x, ex.up_proj), retain_graph=True)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, ex.up_proj))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("counts", [[5, 0, 20, 7], [1, 1, 1, 1], [0, 0, 0, 9]], ids=str)
def test_grouped_mm_matches_reference(counts):
    x = torch.randn(sum(counts), 24, requires_grad=True)
    w = torch.randn(4, 16, 24).transpose(1, 2).requires_grad_()  # a transposed view, as the experts pass it
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_mm(x, w, offsets)
    ref = grouped_mm_ref(x, w, offsets)
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # zero-stride gradient: torch's own grouped_mm backward rejects it
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)



def test_grouped_mm_inference_computes_only_grouped_rows():
    # the eager inference path (a decode step's); rows past the last offset are expert parallelism's off-rank routes
    counts, extra = [0, 3, 0, 1, 2, 0], 2
    x, w = torch.randn(sum(counts) + extra, 24), torch.randn(6, 16, 24).transpose(1, 2)
    with torch.inference_mode():
        out = grouped_mm(x, w, torch.tensor(counts).cumsum(0).to(torch.int32))
    start = 0
    for e, n in enumerate(counts):
        torch.testing.assert_close(out[start:start + n], x[start:start + n] @ w[e], rtol=0, atol=0)
        start += n
    assert out.shape == (len(x), 16)

def test_grouped_mm_rejects_bad_input():
    with pytest.raises(ValueError, match="int32"):
        grouped_mm(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="expected x"):
        grouped_mm(torch.randn(4, 7), torch.randn(2, 8, 3), torch.tensor([2, 4], dtype=torch.int32))

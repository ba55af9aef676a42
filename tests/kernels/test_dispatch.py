"""The dispatch: CPU tensors take the torch reference unless `triton_on_cpu()` sends them to the kernels, and
`kernel_launches` counts exactly the calls that went to a kernel."""

import pytest
import torch

from modeling_deepseek_v3.kernels import act_quant, kernel_launches, triton_on_cpu, use_triton

from .common import DEVICE

pytest.importorskip("triton")


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors reach the kernels only through the interpreter")
def test_cpu_tensors_reach_the_kernels_only_inside_triton_on_cpu():
    x = torch.randn(4, 256, device="cpu")
    before = kernel_launches["act_quant"]
    act_quant(x)
    assert not use_triton(x) and kernel_launches["act_quant"] == before
    with triton_on_cpu():
        assert use_triton(x)
        act_quant(x)
        act_quant(x)
    assert kernel_launches["act_quant"] == before + 2
    assert not use_triton(x)  # the block's end restores the reference path


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton_on_cpu needs the Triton interpreter"):
        with triton_on_cpu():
            pass

import pytest
import torch

from .common import DEVICE


@pytest.fixture(autouse=True)
def _kernel_device():
    """On a CUDA machine the kernel tests create their tensors on CUDA, where the compiled kernels run; elsewhere on
    the CPU, where the interpreter runs them."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)

import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors; on a CUDA machine they run compiled, on
# CUDA tensors. The variable must be set before triton is imported, and pytest imports this file before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

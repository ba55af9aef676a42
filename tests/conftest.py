import os

# Triton kernels run in its interpreter on this CPU-only project; the variable must be set before triton is imported,
# and pytest imports this file before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

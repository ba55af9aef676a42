import os
import sys

import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors; on a CUDA machine they run compiled, on
# CUDA tensors. The variable must be set before triton is imported, and pytest imports this file before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# DeepSpeed compiles its CPU shared-memory all-reduce (deepspeed_shm_comm, 20-50 s on 2 cores) when a rank first
# starts it, into torch's extension cache. That cache is shared by every Python environment, and a build for another
# environment (other include paths) is rebuilt: CI's fresh environment and a developer's rebuilt it for each other. One
# cache per environment; spawned and launched ranks inherit the variable.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402

# pytest-xdist runs one worker per core (pyproject.toml): more intra-op threads would only contend with the other
# workers for the cores. The processes a test starts inherit the setting, so that a result computed in the test and
# one from its subprocess sum in the same order (tests compare logits across processes exactly).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

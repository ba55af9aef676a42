"""Data-parallel training with two CPU processes (gloo): the routing-bias update all-reduces the token counts, so
every rank ends with the same biases, equal to one process training on the whole global batch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..multiprocess import WORLD, run_ranks
from ..utils import random_model, spread_routing, tiny_config

STEPS, GLOBAL_BATCH = 3, 8


def train(model, batches, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """SGD steps over `batches`, each split across `world` ranks; the optimizer step moves the routing biases."""
    module = model
    if world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for ids in batches:
        local = ids.chunk(world)[rank]
        model(local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [b.clone() for n, b in module.named_buffers() if n.endswith("e_score_correction_bias")]


def make_model():
    """A tiny model whose routing varies from token to token, so the ranks' local loads differ from the global one."""
    torch.manual_seed(0)
    return spread_routing(random_model())


def worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.save(train(make_model(), make_batches(), rank, WORLD), f"{out_dir}/rank{rank}.pt")


def make_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    vocab = tiny_config().vocab_size
    return [torch.randint(3, vocab, (GLOBAL_BATCH, 6), generator=generator) for _ in range(STEPS)]


def test_two_gloo_ranks_hold_the_biases_of_one_process(tmp_path):
    run_ranks(worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = make_model()
    initial = [b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    single = train(model, make_batches())
    assert any(not torch.equal(a, b) for a, b in zip(single, initial))  # the biases did move
    for biases in ranks:
        assert all(torch.equal(a, b) for a, b in zip(biases, single))


@pytest.mark.slow
def test_torchrun_example_trains_with_two_ranks(tmp_path):
    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "finetune.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
               "--steps", "4", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = re.findall(r"rank (\d): routing-bias checksum (\S+) \(\|b\| sum (\S+)\)", result.stdout)
    assert sorted(rank for rank, _, _ in checksums) == ["0", "1"]
    assert checksums[0][1:] == checksums[1][1:]
    assert float(checksums[0][2]) > 0  # the biases moved (a fresh model's are all 0)
    for noise in ("find_unused_parameters", "pin_memory"):  # neither DDP's nor the data loader's warning
        assert noise not in result.stderr, result.stderr[-3000:]

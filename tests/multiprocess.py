"""Multi-process tests on CPU: `run_ranks(fn, *args)` runs `fn(rank, *args)` in two spawned processes with the
environment `torchrun --standalone` gives them (RANK, LOCAL_RANK, WORLD_SIZE, a free MASTER_PORT on localhost), so
that `torch.distributed.init_process_group("gloo")` or transformers' distributed engine sets up the group itself.

`fn` must be a module-level function (spawn imports it by name); it reports through files it writes.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, *args, world: int = WORLD, timeout: float | None = None) -> None:
    """Run `fn(rank, *args)` on `world` processes and wait; a failure on any rank fails the call. With `timeout`
    (seconds), ranks still running then (a hang) are killed and the call raises `TimeoutError`."""
    ranks = mp.spawn(_run_rank, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    # join returns False while any rank runs (it wakes as each one ends)
    while not ranks.join(None if deadline is None else max(deadline - time.monotonic(), 0)):
        if deadline is not None and time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} still ran on some of {world} ranks after {timeout} s")


def _run_rank(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1): the ranks share the cores
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

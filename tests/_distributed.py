"""Run a function on N gloo ranks (torch.multiprocessing), through the same env-var path torchrun uses."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from sde.training import cleanup_distributed, init_distributed


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, target: Callable[[int, int, str], None], world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = init_distributed()
    assert info.backend == "gloo" and info.world_size == world
    try:
        target(rank, world, tmp)
    finally:
        cleanup_distributed()


def run_ranks(target: Callable[[int, int, str], None], world: int, tmp: str) -> list:
    """``target(rank, world, tmp)`` on ``world`` processes that form one gloo group (``target`` is module-level
    and saves its results to ``{tmp}/rank{rank}.pt``); returns those results, loaded, in rank order."""
    mp.spawn(_entry, args=(target, world, free_port(), tmp), nprocs=world, join=True)
    return [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(world)]

"""Process-group setup for ``torchrun``: the same training script runs on 1 or N processes.

``torchrun`` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; when
WORLD_SIZE > 1 we join the group with NCCL on CUDA and gloo on CPU. Without those variables
everything degrades to a single process and no collective is ever called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes; global batch = per-rank batch * world_size
    local_rank: int = 0  # rank on this node; selects the GPU
    backend: str | None = None  # "nccl" / "gloo" when distributed, else None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and shows the progress bar."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device this rank should train on: its GPU under NCCL, else the CPU."""
        if self.backend == "nccl":  # a task that sees only its own GPU(s) (SLURM gpu binding) uses them in turn
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the environment (idempotent).

    Args:
        backend: force a backend; default NCCL when CUDA is available, else gloo.

    Returns:
        The :class:`DistInfo` of this process (rank 0 of 1 when not launched by torchrun).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))  # before init: NCCL binds it
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=dist.get_backend())


def current_dist_info() -> DistInfo:
    """The :class:`DistInfo` of an already-initialised group (single process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    world = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=local_rank, backend=dist.get_backend())


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""The Hydra apps under ``torchrun`` and multi-task SLURM/submitit jobs: one process group, one run folder.

    torchrun --nproc_per_node 8 experiments/train.py experiment=cifar10_ddpmpp_vp device=cuda
    torchrun --nproc_per_node 8 experiments/sample.py score.path=... num_samples=50000 device=cuda

What changes when an app is launched that way (WORLD_SIZE set by torchrun, or a submitit task with
more than one task, whose SLURM/local variables are turned into torchrun's):

* every rank joins the group (NCCL on CUDA, gloo on CPU) and uses its own GPU (``cuda:LOCAL_RANK``);
* all ranks work in rank 0's run folder (Hydra's ``${now:}`` can differ per process; a stray folder
  holding only Hydra's own files is removed); only rank 0 writes files, the W&B run and the summary;
* train.py trains with the Trainer's DDP; ``train.batch_size`` stays the GLOBAL batch (each rank takes
  ``batch_size / world_size``), so a run means the same thing on 1 or N GPUs;
* sample.py / evaluate.py / likelihood.py shard the samples (or data points) in fixed chunks seeded from
  ``(seed, chunk)`` (sde.distributed_eval): the gathered result does not depend on the number of
  processes, and ``torchrun --nproc_per_node 1`` reproduces an 8-GPU run on one device. A plain
  ``python experiments/sample.py`` keeps the single-generator stream of a one-process run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, open_dict

from . import run_dir, setup
from .app import Body, Check, check
from .app import run_task as _run_task_one_process
from .tracking import NullTracker

__all__ = ["launched", "run_task", "per_rank_batch", "draw_sharded", "likelihood_sharded"]

_APPS = str(Path(__file__).resolve().parents[1])  # experiments/: where `_common` is importable from


def _export_app_folder() -> None:
    """Put experiments/ on PYTHONPATH for child processes: a submitit worker (local or SLURM, which exports
    the submitting environment) unpickles the Hydra job, which refers to `_common`, before any app code runs."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _APPS not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_APPS, *paths])


_export_app_folder()


def launched() -> bool:
    """True when this process is one task of a torchrun (any size) or multi-task submitit job."""
    return "WORLD_SIZE" in os.environ or _submitit_tasks() > 1


def _submitit_tasks() -> int:
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    return int(submitit.JobEnvironment().num_tasks)


def _torchrun_env_from_submitit() -> None:
    """Export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for a submitit task (SLURM or local)."""
    if "WORLD_SIZE" in os.environ or _submitit_tasks() <= 1:
        return
    import submitit

    env = submitit.JobEnvironment()
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    master = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", master)
    os.environ.setdefault("MASTER_PORT", str(20000 + int(digits) % 20000))  # one port per job, same on all tasks


def _join(cfg: DictConfig):
    """Join the process group; CUDA ranks get their own device in ``cfg.device``."""
    from sde.training import init_distributed

    _torchrun_env_from_submitit()
    wants_cuda = str(cfg.device).startswith("cuda")
    info = init_distributed("nccl" if wants_cuda else "gloo")
    if wants_cuda:
        with open_dict(cfg):
            cfg.device = str(info.device)
    return info


def _shared_run_dir(info) -> Path:
    """Rank 0's run folder on every rank; a rank's own, different folder is removed if Hydra's files are all it has."""
    mine = run_dir()
    if not info.distributed:  # torchrun --nproc_per_node 1
        return mine
    box = [str(mine)]
    dist.broadcast_object_list(box, src=0)
    shared = Path(box[0])
    if not info.is_main and mine.resolve() != shared.resolve() and mine.is_dir():
        if all(p.name == ".hydra" or p.suffix == ".log" for p in mine.iterdir()):
            shutil.rmtree(mine, ignore_errors=True)
    return shared


def run_task(cfg: DictConfig, task: str, body: Body, validate: Check | None = None) -> dict[str, Any]:
    """:func:`_common.app.run_task`, also under torchrun: rank 0 records, the other ranks only compute.

    ``body`` runs on every rank with the shared run folder; on ranks other than 0 it gets a tracker that
    records nothing and may return ``{}`` (nothing is written for them). Every rank checks the config
    (``validate``) before joining the group.
    """
    if not launched():
        return _run_task_one_process(cfg, task, body, validate)
    from sde.training import cleanup_distributed

    check(cfg, task, validate)
    info = _join(cfg)
    try:
        out = _shared_run_dir(info)

        def in_shared_folder(cfg, tracker, _own, device, dtype, generator):
            return body(cfg, tracker, out, device, dtype, generator)

        if info.is_main:
            return _run_task_one_process(cfg, task, in_shared_folder)
        device, dtype, generator = setup(cfg)
        return body(cfg, NullTracker(), out, device, dtype, generator)
    finally:
        cleanup_distributed()


def per_rank_batch(global_batch: int) -> int:
    """This rank's share of the global batch ``train.batch_size`` (the whole batch in one process).

    Raises:
        ValueError: the global batch is not divisible by the world size.
    """
    from sde.training.distributed import current_dist_info

    world = current_dist_info().world_size
    if global_batch % world:
        raise ValueError(f"train.batch_size={global_batch} (the global batch) must be divisible by the "
                         f"{world} processes of this launch")
    return global_batch // world


def _chunk_size(batch_size: int | None) -> int:
    from sde.distributed_eval import DEFAULT_CHUNK_SIZE

    return DEFAULT_CHUNK_SIZE if batch_size is None else int(batch_size)


def draw_sharded(score_fn, sde, sampler_cfg: DictConfig, shape: tuple[int, ...], *, generator: torch.Generator,
                 seed: int, device: torch.device, dtype: torch.dtype, batch_size: int | None = None,
                 strip_frames: int = 0, progress: bool = False):
    """:func:`_common.sampling.draw`, sharded over the ranks of a launch in chunks of ``batch_size``.

    Returns:
        (x, nfe, strip, strip_nfe) as ``draw``; under a launch ``x`` is None on ranks other than 0,
        ``nfe`` sums over all chunks and the strip (and its ``strip_nfe``) follows chunk 0 (on rank 0).
    """
    from sde.distributed_eval import shard_map

    from .sampling import draw

    if not launched():
        return draw(score_fn, sde, sampler_cfg, shape, generator=generator, device=device, dtype=dtype,
                    batch_size=batch_size, strip_frames=strip_frames, progress=progress)
    kept: dict[str, Any] = {"strip": [], "strip_nfe": 0}

    def chunk(idx: range, g: torch.Generator):
        frames = strip_frames if idx.start == 0 else 0
        x, nfe, strip, strip_nfe = draw(score_fn, sde, sampler_cfg, (len(idx), *shape[1:]), generator=g,
                                        device=device, dtype=dtype, strip_frames=frames, progress=progress)
        if strip:
            kept.update(strip=strip, strip_nfe=strip_nfe)
        return x, nfe

    outs, nfe = shard_map(chunk, shape[0], seed=seed, chunk_size=_chunk_size(batch_size), device=device)
    return (None if outs is None else outs[0]), nfe, kept["strip"], kept["strip_nfe"]


def likelihood_sharded(score_fn, sde, x: torch.Tensor, *, generator: torch.Generator, seed: int,
                       preprocess: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                       batch_size: int | None = None, **options: Any):
    """``y = preprocess(x, generator)`` then ``log_likelihood(score_fn, sde, y, ...)``, sharded under a launch.

    Returns:
        (LikelihoodResult, y): the result over all points and the (dequantized) points it scored; under a
        launch (None, None) on ranks other than 0, every chunk drawing its own generator (one ODE solve per
        chunk: ``batch_nfe`` lists each chunk's evaluations in chunk order, ``nfe`` their sum).
    """
    from sde.distributed_eval import shard_map
    from sde.likelihood import LikelihoodResult, log_likelihood

    if not launched():
        y = x if preprocess is None else preprocess(x, generator)
        return log_likelihood(score_fn, sde, y, generator=generator, batch_size=batch_size, **options), y

    vjp_per_eval = [0]

    def chunk(idx: range, g: torch.Generator):
        y = x[idx.start: idx.stop]
        y = y if preprocess is None else preprocess(y, g)
        res = log_likelihood(score_fn, sde, y, generator=g, **options)
        vjp_per_eval[0] = res.n_vjp // max(res.nfe, 1)  # D (exact) or n_probes: the same for every chunk
        return (res.logp, res.z, y, chunk_nfe_rows(res.batch_nfe, len(idx))), res.nfe

    size = _chunk_size(batch_size)
    outs, nfe = shard_map(chunk, x.shape[0], seed=seed, chunk_size=size, device=x.device)
    if outs is None:
        return None, None
    logp, z, y, rows = outs
    return LikelihoodResult(logp, z, nfe, nfe * vjp_per_eval[0], chunk_nfe_list(rows, size)), y


def chunk_nfe_rows(batch_nfe: list[int], rows: int) -> torch.Tensor:
    """A chunk's per-solve evaluations repeated on each of its ``rows`` rows, so ``shard_map`` gathers them."""
    return torch.tensor(batch_nfe, dtype=torch.int64).expand(rows, len(batch_nfe))


def chunk_nfe_list(rows: torch.Tensor, chunk_size: int) -> list[int]:
    """The gathered :func:`chunk_nfe_rows` back as every solve's evaluations, in chunk order."""
    return rows[::chunk_size].flatten().tolist()

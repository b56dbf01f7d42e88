"""Sampling, likelihood and feature statistics sharded over ``torchrun`` ranks, independent of the world size.

The global sample index ``0 .. num - 1`` is cut into fixed-size chunks; chunk ``c`` is drawn with its
own generator seeded from ``(seed, c)`` (:func:`chunk_seed`) and chunks are dealt to ranks round-robin
(chunk ``c`` runs on rank ``c % world_size``). Every chunk therefore sees the same inputs, the same batch
shape and the same random stream whatever the number of processes, so the gathered union is bit-equal
between 1 and N processes (on the same device type). Results are gathered on rank 0 in global order;
feature statistics (:class:`sde.metrics.RunningStats`: float64 mean and centred scatter) are merged
exactly. Without an initialised process group every function runs as rank 0 of 1.

    res = distributed_sample(score_fn, sde, (50_000, 3, 32, 32), "pc", seed=0, chunk_size=256)
    if res is not None:   # rank 0
        torch.save(res.x, "samples.pt")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_int
from .training.distributed import DistInfo, current_dist_info

__all__ = ["DEFAULT_CHUNK_SIZE", "chunk_seed", "chunk_generator", "rank_chunks", "shard_map",
           "distributed_sample", "distributed_log_likelihood", "gather_running_stats"]

DEFAULT_CHUNK_SIZE = 256  # samples per chunk: one generator and one batch; fixes the result, not the world size

_MASK = (1 << 63) - 1
ChunkFn = Callable[[range, torch.Generator], "tuple[Tensor | Sequence[Tensor], int]"]


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of a run seeded with ``seed`` (a splitmix64-style hash).

    Args:
        seed: the run's seed (>= 0).
        chunk: the chunk index (>= 0).

    Returns:
        A seed in [0, 2^63) that differs between chunks and between run seeds.
    """
    check_int("seed", seed, 0)
    check_int("chunk", chunk, 0)
    z = (seed * 0x9E3779B97F4A7C15 + (chunk + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def chunk_generator(seed: int, chunk: int, device: torch.device | str | None = None) -> torch.Generator:
    """A fresh generator seeded with :func:`chunk_seed` ``(seed, chunk)``.

    Args:
        seed: the run's seed (>= 0).
        chunk: the chunk index (>= 0).
        device: the generator's device (default CPU); draws must happen on it.

    Returns:
        The seeded ``torch.Generator``.
    """
    return torch.Generator(device=device or "cpu").manual_seed(chunk_seed(seed, chunk))


def rank_chunks(num: int, chunk_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The global index ranges this rank owns: chunks ``rank, rank + world_size, ...`` of ``range(num)``.

    Args:
        num: total number of samples (>= 1).
        chunk_size: samples per chunk (>= 1); the last chunk may be shorter.
        rank: this process's rank, in [0, world_size).
        world_size: number of processes (>= 1).

    Returns:
        The ranges, in increasing order.

    Raises:
        ValueError: a size below 1 or a rank outside [0, world_size).
    """
    check_int("num", num, 1)
    check_int("chunk_size", chunk_size, 1)
    check_int("world_size", world_size, 1)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    starts = range(rank * chunk_size, num, world_size * chunk_size)
    return [range(s, min(s + chunk_size, num)) for s in starts]


def shard_map(fn: ChunkFn, num: int, *, seed: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
              device: torch.device | str | None = None, dist_info: DistInfo | None = None,
              gather: bool = True) -> tuple[list[Tensor] | None, int]:
    """Run ``fn`` on this rank's chunks of ``range(num)`` and gather the outputs on rank 0 in global order.

    Args:
        fn: ``fn(index_range, generator) -> (outputs, nfe)``: ``outputs`` a tensor (or a sequence of
            tensors) with ``len(index_range)`` rows, computed only from the chunk's indices and its generator.
        num: total number of rows (>= 1).
        seed: the run seed; chunk ``c`` gets ``chunk_generator(seed, c, device)``.
        chunk_size: rows per chunk; the result depends on it, never on the world size.
        device: device of the chunk generators (the device the random draws happen on).
        dist_info: the process group position; default :func:`current_dist_info`.
        gather: collect the outputs on rank 0; False returns this rank's own chunks (concatenated in
            order) and its own nfe, with no collective (e.g. to stream features into per-rank statistics).

    Returns:
        (outputs, nfe): on rank 0 the list of gathered tensors (``num`` rows each, chunk order), ``None``
        on other ranks; ``nfe`` summed over all chunks of all ranks (on every rank). With ``gather=False``:
        this rank's outputs and nfe.

    Raises:
        ValueError: ``fn`` returned a tensor whose row count is not its chunk's length.
    """
    info = dist_info if dist_info is not None else current_dist_info()
    chunks = rank_chunks(num, chunk_size, info.rank, info.world_size)
    parts: list[list[Tensor]] = []
    nfe = 0
    for idx in chunks:
        out, n = fn(idx, chunk_generator(seed, idx.start // chunk_size, device))
        outs = [out] if isinstance(out, Tensor) else list(out)
        for o in outs:
            if o.shape[0] != len(idx):
                raise ValueError(f"fn returned {o.shape[0]} rows for the {len(idx)} indices {idx}")
        parts.append(outs)
        nfe += int(n)
    local = [torch.cat(cols) for cols in zip(*parts)] if parts else []
    if not (info.distributed and gather):
        return local, nfe
    return _gather_chunks(local, num, chunk_size, info), _sum_int(nfe, info)


def _sum_int(value: int, info: DistInfo) -> int:
    """Sum an int over all ranks (on the collective's device)."""
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def _comm_device(info: DistInfo) -> torch.device:
    return info.device if info.backend == "nccl" else torch.device("cpu")


def _gather_chunks(local: list[Tensor], num: int, chunk_size: int, info: DistInfo) -> list[Tensor] | None:
    """Gather every rank's concatenated chunks on rank 0 and put the rows back in global order."""
    meta = [[(tuple(t.shape[1:]), t.dtype) for t in local]] if info.is_main else [None]
    dist.broadcast_object_list(meta, src=0)  # rank 0 always owns chunk 0: it knows the shapes
    world, per_rank = info.world_size, len(rank_chunks(num, chunk_size, 0, info.world_size)) * chunk_size
    dev = _comm_device(info)
    gathered: list[Tensor] = []
    for k, (shape, dtype) in enumerate(meta[0]):
        padded = torch.zeros((per_rank, *shape), dtype=dtype, device=dev)
        if local:
            padded[: local[k].shape[0]] = local[k]
        bucket = [torch.empty_like(padded) for _ in range(world)] if info.is_main else None
        dist.gather(padded, bucket, dst=0)
        if info.is_main:
            rows = []
            for c in range(-(-num // chunk_size)):  # chunk c = rank c % world's (c // world)-th chunk
                start = (c // world) * chunk_size
                rows.append(bucket[c % world][start: start + min(chunk_size, num - c * chunk_size)])
            gathered.append(torch.cat(rows).to(local[k].device))
    return gathered if info.is_main else None


def distributed_sample(score_fn: Callable[[Tensor, Tensor], Tensor], sde: Any, shape: Sequence[int],
                       sampler: str = "pc", *, seed: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                       dist_info: DistInfo | None = None, **options: Any):
    """Draw ``shape[0]`` samples over all ranks; chunk ``c`` runs ``sample`` from its own ``x_T`` and generator.

    Each chunk does ``x_T = sde.prior_sampling((n_c, *shape[1:]), generator=g_c)`` then
    ``sample(score_fn, sde, x_T, sampler, generator=g_c, **options)``, so with ``chunk_size >= shape[0]``
    it is exactly one ordinary :func:`sde.samplers.sample` call with generator ``chunk_generator(seed, 0)``.

    Args:
        score_fn: ``score_fn(x, t)``; every rank holds the same one.
        sde: the forward SDE.
        shape: (N, ...) the full sample shape over all ranks.
        sampler: a name in ``sde.samplers.SAMPLERS``.
        seed: the run seed (see :func:`chunk_seed`).
        chunk_size: samples per chunk and per sampler call.
        device, dtype: of the drawn x_T (and of the chunk generators).
        dist_info: default :func:`current_dist_info`.
        **options: the sampler's own options.

    Returns:
        On rank 0 a ``SampleResult`` with all N samples in global order and ``nfe`` summed over all chunks;
        ``None`` on other ranks.

    Raises:
        ValueError: a bad shape or chunk size, or the sampler's own checks.
    """
    from .samplers import SampleResult, sample

    shape = tuple(int(s) for s in shape)
    check_int("shape[0]", shape[0] if shape else 0, 1)
    last: dict[str, Any] = {}

    def run(idx: range, g: torch.Generator) -> tuple[Tensor, int]:
        x_T = sde.prior_sampling((len(idx), *shape[1:]), generator=g, device=device, dtype=dtype)
        res = sample(score_fn, sde, x_T, sampler, generator=g, **options)
        last["res"] = res
        return res.x, res.nfe

    outs, nfe = shard_map(run, shape[0], seed=seed, chunk_size=chunk_size, device=device, dist_info=dist_info)
    if outs is None:
        return None
    return SampleResult(outs[0], nfe, last["res"].sampler, last["res"].options)


def distributed_log_likelihood(score_fn: Callable[[Tensor, Tensor], Tensor], sde: Any, x: Tensor, *, seed: int,
                               chunk_size: int = DEFAULT_CHUNK_SIZE,
                               preprocess: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                               dist_info: DistInfo | None = None, **options: Any) -> tuple[Tensor | None, int]:
    """Per-point PF-ODE log-likelihoods of all rows of ``x`` (every rank holds all of ``x``), sharded by chunk.

    Chunk ``c`` (rows ``c * chunk_size ...``) runs ``log_likelihood(score_fn, sde, preprocess(x_c, g_c),
    generator=g_c, **options)`` with its own generator, so Hutchinson probes and dequantization noise do not
    depend on the world size.

    Args:
        score_fn: ``score_fn(x, t)``.
        sde: the forward SDE.
        x: (N, ...) data in model space, the same on every rank.
        seed: the run seed (see :func:`chunk_seed`).
        chunk_size: rows per chunk and per ODE solve.
        preprocess: optional ``preprocess(x_chunk, generator) -> x_chunk`` drawn before the solve
            (e.g. uniform dequantization); it uses the chunk's generator first.
        dist_info: default :func:`current_dist_info`.
        **options: :func:`sde.likelihood.log_likelihood` options (divergence, probe, n_probes, method, ...).

    Returns:
        (logp, nfe): on rank 0 the (N,) log-densities in nats in row order (``None`` on other ranks),
        and the score evaluations summed over all chunks (every rank).

    Raises:
        ValueError / TypeError: as :func:`sde.likelihood.log_likelihood`.
    """
    from .likelihood import log_likelihood

    if not isinstance(x, Tensor) or x.dim() < 2:
        raise TypeError(f"x must be a (N, ...) tensor, got {type(x).__name__} {getattr(x, 'shape', '')}")

    def run(idx: range, g: torch.Generator) -> tuple[Tensor, int]:
        xb = x[idx.start: idx.stop]
        if preprocess is not None:
            xb = preprocess(xb, g)
        res = log_likelihood(score_fn, sde, xb, generator=g, **options)
        return res.logp, res.nfe

    outs, nfe = shard_map(run, x.shape[0], seed=seed, chunk_size=chunk_size, device=x.device, dist_info=dist_info)
    return (outs[0] if outs is not None else None), nfe


def gather_running_stats(stats: Any, dist_info: DistInfo | None = None) -> Any:
    """Merge every rank's :class:`sde.metrics.RunningStats` (float64 mean + centred scatter) on every rank.

    The per-rank summaries are exchanged as objects and folded in rank order with the exact pairwise
    (Chan et al.) merge, so the result equals one stream over all features up to float64 rounding.

    Args:
        stats: this rank's ``RunningStats`` (it may have seen no samples).
        dist_info: default :func:`current_dist_info`.

    Returns:
        A new ``RunningStats`` of all ranks' features (``stats`` itself when not distributed).

    Raises:
        TypeError: ``stats`` is not a ``RunningStats``.
    """
    from .metrics import RunningStats

    if not isinstance(stats, RunningStats):
        raise TypeError(f"stats must be a sde.metrics.RunningStats, got {type(stats).__name__}")
    info = dist_info if dist_info is not None else current_dist_info()
    if not info.distributed:
        return stats
    everyone: list[Any] = [None] * info.world_size
    dist.all_gather_object(everyone, stats.to("cpu"))
    merged = RunningStats()
    for s in everyone:
        merged.merge(s)
    return merged.to(stats.device)

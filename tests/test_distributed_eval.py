"""Sharded sampling, likelihood and feature statistics: 2 gloo processes give the 1-process result."""

from __future__ import annotations

import pytest
import torch
from _distributed import run_ranks

from sde.distributed_eval import (
    chunk_generator,
    chunk_seed,
    distributed_log_likelihood,
    distributed_sample,
    gather_running_stats,
    rank_chunks,
    shard_map,
)
from sde.metrics import RunningStats
from sde.oracle import GaussianMixture
from sde.samplers import sample
from sde.sdes import VPSDE

F64 = torch.float64
N, CHUNK, SEED = 70, 16, 3  # 5 chunks, the last one short: rank 0 gets 3 chunks, rank 1 gets 2


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[-2.0, 0.0], [1.5, 1.0]], dtype=F64), stds=torch.tensor([0.3, 0.5],
                           dtype=F64), weights=torch.tensor([0.4, 0.6], dtype=F64))


def _dequantize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.01 * torch.rand(x.shape, generator=g, dtype=x.dtype)


def _features(idx: range, g: torch.Generator):
    """Stand-in feature extractor: features with a large mean (the case a naive sum/sum-of-squares loses)."""
    return 1e3 + torch.randn(len(idx), 5, generator=g, dtype=F64) @ torch.randn(5, 5, generator=g, dtype=F64), 0


def _evaluate() -> dict:
    """Everything the test compares; runs identically in 1 or N processes."""
    torch.set_num_threads(1)
    gm, sde = _mixture(), VPSDE()
    score = gm.score_fn(sde)
    out: dict = {}
    res = distributed_sample(score, sde, (N, 2), "euler_maruyama", seed=SEED, chunk_size=CHUNK, dtype=F64,
                             steps=20)
    x = gm.sample(N, generator=torch.Generator().manual_seed(0))
    logp, nfe = distributed_log_likelihood(score, sde, x, seed=SEED, chunk_size=CHUNK, preprocess=_dequantize,
                                           divergence="hutchinson", rtol=1e-6, atol=1e-6)
    feats, _ = shard_map(_features, N, seed=SEED, chunk_size=CHUNK)
    local, _ = shard_map(_features, N, seed=SEED, chunk_size=CHUNK, gather=False)  # this rank's chunks only
    mine = RunningStats()
    for f in local:
        mine.update(f)
    stats = gather_running_stats(mine).finalize()  # merged over ranks
    out.update(samples=None if res is None else res.x, sample_nfe=None if res is None else res.nfe,
               logp=logp, ll_nfe=nfe, features=None if feats is None else feats[0],
               mean=stats.mean, cov=stats.cov, n=stats.n)
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.save(_evaluate(), f"{tmp}/rank{rank}.pt")


# ------------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("num,chunk", [(1, 4), (70, 16), (64, 16), (5, 1)])
def test_rank_chunks_partition_the_index_for_every_world_size(num, chunk):
    for world in range(1, 6):
        owned = [rank_chunks(num, chunk, r, world) for r in range(world)]
        flat = sorted(i for ranges in owned for rg in ranges for i in rg)
        assert flat == list(range(num))
        for r, ranges in enumerate(owned):  # round-robin over the same fixed chunks
            assert all(rg.start % chunk == 0 and (rg.start // chunk) % world == r for rg in ranges)
            assert all(len(rg) == min(chunk, num - rg.start) for rg in ranges)


def test_rank_chunks_and_seeds_reject_bad_input():
    with pytest.raises(ValueError, match="rank"):
        rank_chunks(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_chunks(10, 0)
    with pytest.raises(ValueError, match="seed"):
        chunk_seed(-1, 0)
    seeds = {chunk_seed(s, c) for s in range(20) for c in range(200)}
    assert len(seeds) == 20 * 200 and all(0 <= s < 2 ** 63 for s in seeds)


def test_one_chunk_is_one_ordinary_sample_call():
    gm, sde = _mixture(), VPSDE()
    score = gm.score_fn(sde)
    res = distributed_sample(score, sde, (N, 2), "euler_maruyama", seed=SEED, chunk_size=N, dtype=F64, steps=10)
    g = chunk_generator(SEED, 0)
    ref = sample(score, sde, sde.prior_sampling((N, 2), generator=g, dtype=F64), "euler_maruyama", generator=g,
                 steps=10)
    assert torch.equal(res.x, ref.x) and res.nfe == ref.nfe == 11  # 10 steps + the final denoising call


def test_shard_map_checks_row_counts():
    with pytest.raises(ValueError, match="rows"):
        shard_map(lambda idx, g: (torch.zeros(len(idx) + 1), 0), 10, seed=0, chunk_size=4)


def test_running_stats_merge_equals_one_stream():
    g = torch.Generator().manual_seed(0)
    a, b = 1e3 + torch.randn(40, 6, generator=g, dtype=F64), 1e3 + torch.randn(25, 6, generator=g, dtype=F64)
    merged = RunningStats().update(a).merge(RunningStats().update(b)).finalize()
    ref = torch.cat([a, b])
    torch.testing.assert_close(merged.mean, ref.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.cov, torch.cov(ref.T), rtol=0, atol=1e-12)
    assert merged.n == 65
    with pytest.raises(TypeError, match="other"):
        RunningStats().merge("stats")


# ------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    ranks = run_ranks(_worker, 2, str(tmp_path))
    threads = torch.get_num_threads()
    try:
        single = _evaluate()
    finally:
        torch.set_num_threads(threads)
    two = ranks[0]
    assert ranks[1]["samples"] is None and ranks[1]["logp"] is None  # only rank 0 holds the gathered union
    assert two["samples"].shape == (N, 2) and torch.equal(two["samples"], single["samples"])  # bit-equal
    assert two["sample_nfe"] == single["sample_nfe"] == 21 * 5  # (20 steps + final denoise) summed over the 5 chunks
    assert torch.equal(two["logp"], single["logp"]) and two["ll_nfe"] == ranks[1]["ll_nfe"] == single["ll_nfe"]
    assert torch.equal(two["features"], single["features"])
    for r in ranks:  # every rank gets the merged statistics; equal to one stream to 1e-12 (float64)
        assert r["n"] == single["n"] == N
        torch.testing.assert_close(r["mean"], single["mean"], rtol=1e-12, atol=0)
        torch.testing.assert_close(r["cov"], single["cov"], rtol=1e-12, atol=1e-12)
    # the union is not trivially equal: different chunks draw different noise, and the samples look right
    assert not torch.equal(two["samples"][:CHUNK], two["samples"][CHUNK:2 * CHUNK])
    exact = _mixture().log_prob(two["samples"]).mean()
    assert exact > _mixture().log_prob(_mixture().sample(N, generator=torch.Generator().manual_seed(1))).mean() - 1.0
    assert torch.isfinite(two["logp"]).all()

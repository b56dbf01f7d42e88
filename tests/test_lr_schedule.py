"""Learning-rate decay (sde.training.lr_schedule): the formulas, and the Trainer following a run's progress."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sde.sdes import VPSDE
from sde.training import LR_DECAYS, TrainConfig, Trainer, scheduled_lr, warmup_lr

F64 = torch.float64


def quadratic_loss(model, sde, x0, *, generator=None):
    return ((model(x0) - x0) ** 2).mean()


def fit_lrs(progress=None, **config) -> list[float]:
    """The learning rate each step of a 10-step run used (logged every step)."""
    torch.manual_seed(0)
    logs: list[dict] = []
    data = torch.randn(32, 2, dtype=F64)
    base = dict(total_steps=10, batch_size=8, lr=0.1, warmup_steps=2, log_every=1, ckpt_every=0, progress=False)
    trainer = Trainer(nn.Linear(2, 2).to(F64), VPSDE(), data, TrainConfig(**{**base, **config}),
                      loss_fn=quadratic_loss, log_fn=logs.append)
    trainer.fit(progress=progress)
    return [m["lr"] for m in logs]


def test_decays_written_out():
    p = torch.linspace(0, 1, 11).tolist()
    assert [LR_DECAYS["constant"](x) for x in p] == [1.0] * 11
    assert [LR_DECAYS["linear"](x) for x in p] == pytest.approx([1 - x for x in p])
    assert [LR_DECAYS["cosine"](x) for x in p] == pytest.approx([math.cos(math.pi * x / 2) ** 2 for x in p])
    # warm-up times decay, floored at final_ratio; progress past 1 (a budget overrun) stays at the end value
    assert scheduled_lr(1, 0.2, 4, decay="cosine", progress=0.5) == pytest.approx(0.2 / 4 * 0.5)
    assert scheduled_lr(9, 0.2, 4, decay="linear", progress=0.75, final_ratio=0.1) == pytest.approx(0.2 * 0.325)
    assert scheduled_lr(9, 0.2, 4, decay="cosine", progress=1.3, final_ratio=0.1) == pytest.approx(0.02)
    assert scheduled_lr(3, 0.2, 4) == warmup_lr(3, 0.2, 4) == pytest.approx(0.15)


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay="step"), r"decay='step' is not supported"),
    (dict(decay="cosine", final_ratio=1.0), r"final_ratio must lie in \[0.0, 1.0\), got 1.0"),
    (dict(decay="constant", final_ratio=0.1), r"final_ratio=0.1 has no effect with decay='constant'"),
    (dict(decay="cosine", progress=-0.1), r"progress must be a fraction of the run >= 0, got -0.1"),
    (dict(decay="cosine", progress=float("nan")), r"progress must be a fraction of the run >= 0, got nan"),
])
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scheduled_lr(1, 0.1, 0, **kwargs)
    if "progress" not in kwargs:  # TrainConfig validates the same pair when it is built
        named = match.replace("decay=", "lr_decay=").replace("final_ratio", "lr_final_ratio")
        with pytest.raises(ValueError, match=named):
            TrainConfig(lr_decay=kwargs["decay"], lr_final_ratio=kwargs.get("final_ratio", 0.0))


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_trainer_decays_over_total_steps(decay):
    lrs = fit_lrs(lr_decay=decay)
    expected = [0.1 * min(1, s / 2) * LR_DECAYS[decay]((s - 1) / 10) for s in range(1, 11)]
    assert lrs == pytest.approx(expected)
    if decay != "constant":
        assert lrs[-1] < 0.1 * 0.1  # decayed close to 0 at the end of the run


def test_trainer_follows_a_progress_callback():
    # a run that ends on a budget: the decay follows the spent fraction the callback reports, not total_steps
    lrs = fit_lrs(progress=lambda step: step / 5, lr_decay="linear", lr_final_ratio=0.2)
    expected = [0.1 * min(1, s / 2) * (0.2 + 0.8 * max(0.0, 1 - (s - 1) / 5)) for s in range(1, 11)]
    assert lrs == pytest.approx(expected)
    assert lrs[5:] == pytest.approx([0.02] * 5)  # held at final_ratio * lr past the callback's end
    with pytest.raises(TypeError, match="progress"):
        fit_lrs(progress=0.5, lr_decay="linear")

"""The non-finite guard: no checkpoint with a NaN/inf weight, EMA or optimizer moment is ever written,
and the error names a checkpoint only when one exists. TrainConfig refuses non-finite settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sde.sdes import VPSDE
from sde.training import NonFiniteLossError, TrainConfig, Trainer, load_checkpoint

F64 = torch.float64


class Tiny(nn.Module):
    def __init__(self, dtype=F64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2)).to(dtype)

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def eps_loss(model, sde, x0, *, generator=None):
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype) * 0.99 + 0.01
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return ((model(mean + std[:, None] * z, t) - z) ** 2).sum(1).mean()


def data(dtype=F64):
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


def config(tmp_path, **kw):
    base = dict(total_steps=8, batch_size=16, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=2,
                out_dir=str(tmp_path), progress=False)
    return TrainConfig(**{**base, **kw})


def all_finite(state: dict) -> bool:
    """Every float tensor of a checkpoint (weights, EMA, optimizer moments) is finite."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(walk(x) for x in v)
        return True
    return all(walk(state[k]) for k in ("model", "ema", "optimizer"))


def checkpoints(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".pt")


def test_lr_inf_never_reaches_a_checkpoint(tmp_path):
    """lr = inf from the first step (set after validation, as a scheduler bug would): the update of
    step 1 makes the weights non-finite, the save at step 2 is never written."""
    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path), loss_fn=eps_loss)
    trainer.config.lr = math.inf  # TrainConfig(lr=inf) is refused; this reaches the optimizer anyway
    with pytest.raises(NonFiniteLossError, match="update of step 1.*non-finite values in the weights, EMA") as err:
        trainer.fit()
    assert "no checkpoint was written yet" in str(err.value) and "latest.pt" not in str(err.value)
    assert checkpoints(tmp_path) == []


def test_lr_inf_after_a_checkpoint_keeps_it_and_names_it(tmp_path):
    calls = {"n": 0}

    def loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        if calls["n"] == 2:  # step 3 updates with lr = inf (step 2's lr is already set; its checkpoint is good)
            trainer.config.lr = math.inf
        return eps_loss(model, sde, x0, generator=generator)

    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, ckpt_every=1), loss_fn=loss)
    with pytest.raises(NonFiniteLossError, match="update of step 3") as err:
        trainer.fit()
    assert f"last good checkpoint kept: {tmp_path / 'latest.pt'}" in str(err.value)
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 2 and all_finite(state)


def test_nan_loss_at_step_1_names_no_checkpoint(tmp_path):
    def loss(model, sde, x0, *, generator=None):
        return eps_loss(model, sde, x0, generator=generator) * float("nan")

    model = Tiny()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1") as err:
        Trainer(model, VPSDE(), data(), config(tmp_path), loss_fn=loss).fit()
    assert "no checkpoint was written yet" in str(err.value) and "latest.pt" not in str(err.value)
    assert checkpoints(tmp_path) == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # never applied


def test_nan_loss_after_a_checkpoint_names_it(tmp_path):
    calls = {"n": 0}

    def loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        return eps_loss(model, sde, x0, generator=generator) * (float("nan") if calls["n"] == 5 else 1.0)

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 5") as err:
        Trainer(Tiny(), VPSDE(), data(), config(tmp_path), loss_fn=loss).fit()
    assert f"last good checkpoint kept: {tmp_path / 'latest.pt'}" in str(err.value)
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 4 and all_finite(state)


def test_without_out_dir_the_message_says_so(tmp_path):
    def loss(model, sde, x0, *, generator=None):
        return eps_loss(model, sde, x0, generator=generator) * float("inf")

    with pytest.raises(NonFiniteLossError, match="loss is inf at step 1.*out_dir is None"):
        Trainer(Tiny(), VPSDE(), data(), config(tmp_path, out_dir=None), loss_fn=loss).fit()


def test_non_finite_optimizer_moment_alone_is_caught(tmp_path):
    """An inf second moment (as a corrupted or overflowed AdamW state would hold) leaves the weights
    finite (the update is m / (sqrt(inf) + eps) = 0): the guard still refuses to write that state."""
    calls = {"n": 0}

    def loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        if calls["n"] == 2:
            state = trainer.optimizer.state[next(model.parameters())]
            state["exp_avg_sq"].fill_(math.inf)
        return eps_loss(model, sde, x0, generator=generator)

    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, ckpt_every=2), loss_fn=loss)
    with pytest.raises(NonFiniteLossError, match="update of step 2.*values in the optimizer moments;"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert checkpoints(tmp_path) == []


def test_last_step_is_checked_without_out_dir(tmp_path):
    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, total_steps=1, out_dir=None), loss_fn=eps_loss)
    trainer.config.lr = math.inf
    with pytest.raises(NonFiniteLossError, match="update of step 1"):
        trainer.fit()  # no later sync and no save: the last update is checked on the spot


def test_a_clean_run_is_unchanged_by_the_guard(tmp_path):
    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path), loss_fn=eps_loss)
    trainer.fit()
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 8 and trainer._pending_state_norm is None


def test_best_metric_must_be_a_hook_metric(tmp_path):
    trainer = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, eval_every=2, best_metric="bpd"), loss_fn=eps_loss,
                      callbacks=[lambda step, model, ema: {"val_loss": 1.0}])
    with pytest.raises(ValueError, match=r"best_metric='bpd' is not among the eval hooks' metrics \['val_loss'\]"):
        trainer.fit()


BAD_CONFIGS = [
    ("lr", math.inf, ValueError), ("lr", math.nan, ValueError), ("lr", 1e39, ValueError), ("lr", 0.0, ValueError),
    ("lr", True, TypeError), ("lr", "1e-3", TypeError), ("weight_decay", math.nan, ValueError),
    ("weight_decay", -0.1, ValueError), ("weight_decay", math.inf, ValueError), ("adam_eps", math.inf, ValueError),
    ("adam_eps", 0.0, ValueError), ("grad_clip", math.nan, ValueError), ("grad_clip", math.inf, ValueError),
    ("betas", (0.9,), ValueError), ("betas", (0.9, 0.99, 0.999), ValueError), ("betas", (0.9, 1.0), ValueError),
    ("betas", (-0.1, 0.999), ValueError), ("betas", (math.nan, 0.999), ValueError), ("betas", "ab", ValueError),
    ("ema_decay", 1.0, ValueError), ("ema_decay", math.nan, ValueError), ("ema_decay", -0.5, ValueError),
    ("best_metric", "", ValueError), ("best_metric", 3, ValueError), ("bf16", "false", TypeError),
    ("resume", 1, TypeError), ("out_dir", 5, TypeError),
]


@pytest.mark.parametrize("key,value,error", BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIGS])
def test_train_config_refuses(key, value, error):
    with pytest.raises(error, match=key.replace("[", r"\[")):
        TrainConfig(**{key: value})


def test_lr_times_weight_decay_must_stay_below_one():
    with pytest.raises(ValueError, match="lr \\* weight_decay must be < 1.*lr=2.0, weight_decay=0.5"):
        TrainConfig(lr=2.0, weight_decay=0.5)


def test_a_huge_but_finite_state_is_not_refused(tmp_path):
    """The per-step screen is the 2-norm of the state, which overflows float32 for entries above ~1e19 even
    when every entry is finite: the exact entry-by-entry check then lets training go on."""
    calls = {"n": 0}

    def loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        if calls["n"] == 2:  # a finite second moment whose square overflows: the update becomes ~0, loss stays finite
            trainer.optimizer.state[next(model.parameters())]["exp_avg_sq"].fill_(1e38)
        return eps_loss(model, sde, x0, generator=generator)

    f32 = torch.float32
    trainer = Trainer(Tiny(f32), VPSDE(), data(f32), config(tmp_path), loss_fn=loss)
    trainer.fit()
    assert not math.isfinite(float(nn.utils.get_total_norm(trainer._state_tensors(), 2.0)))  # the screen tripped
    assert all(torch.isfinite(t).all() for t in trainer._state_tensors())
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 8


def test_fused_adamw_is_the_same_adamw(tmp_path, monkeypatch):
    """On CPU the trainer uses torch's fused AdamW kernel; 8 steps of it land where the default per-tensor
    implementation does (float64: to rounding)."""
    import sde.training.trainer as trainer_module

    fused = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, out_dir=None, weight_decay=0.1), loss_fn=eps_loss)
    assert fused.optimizer.defaults["fused"] is True
    fused.fit()
    monkeypatch.setattr(trainer_module, "_fused_adamw", lambda params: None)
    plain = Trainer(Tiny(), VPSDE(), data(), config(tmp_path, out_dir=None, weight_decay=0.1), loss_fn=eps_loss)
    assert not plain.optimizer.defaults["fused"]
    plain.fit()
    initial = list(Tiny().parameters())
    for a, b, a0 in zip(fused.model.parameters(), plain.model.parameters(), initial):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert (a - a0).abs().max() > 1e-3  # the 8 steps moved every tensor

"""The training loop: EMA math, LR warmup, clipping, NaN stop, hooks, bf16/compile on CPU, learning an exact score."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sde.oracle import GaussianMixture
from sde.sdes import VPSDE
from sde.training import EMA, NonFiniteLossError, TrainConfig, Trainer, ema_decay, load_checkpoint, warmup_lr

F64 = torch.float64


class TinyScore(nn.Module):
    """A small time-conditioned MLP: enough to learn a Gaussian score, cheap enough for tests."""

    def __init__(self, dim: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def eps_dsm_loss(model, sde, x0, *, generator=None, eps=1e-3):
    """Self-contained denoising score matching (model predicts -std * score, i.e. the noise)."""
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device) * (1 - eps) + eps
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return ((model(mean + std[:, None] * z, t) - z) ** 2).sum(1).mean()


def make_data(n=64, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=F64) * 0.5 + 0.3


def make_model(seed=0, dim=2, hidden=32):
    torch.manual_seed(seed)
    return TinyScore(dim, hidden).to(F64)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: intra-op threads only add contention on a shared 2-core runner (~40x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg(**kw):
    base = dict(total_steps=10, batch_size=16, lr=1e-2, warmup_steps=3, log_every=1, ckpt_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ EMA
def test_ema_decay_warmup_formula():
    assert ema_decay(0, 0.999) == pytest.approx(1 / 10)
    assert ema_decay(8, 0.999) == pytest.approx(9 / 18)
    assert ema_decay(10**6, 0.999) == 0.999
    assert ema_decay(0, 0.999, warmup=False) == 0.999
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)


def test_ema_update_matches_recursion():
    model = nn.Linear(3, 2).to(F64)
    model.register_buffer("counter", torch.zeros((), dtype=F64))
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for n in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
            model.counter.fill_(n)
        d = ema.update(model, n)
        assert d == min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        for e, p_ema in zip(expected, ema.model.parameters()):
            torch.testing.assert_close(p_ema, e, rtol=1e-14, atol=1e-14)
        assert ema.model.counter.item() == n  # buffers are copied, not averaged
    assert not any(p.requires_grad for p in ema.model.parameters())


# ------------------------------------------------------------------------------------------ LR and clipping
def test_warmup_lr_schedule_is_used_by_the_optimizer():
    assert [warmup_lr(s, 1.0, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert warmup_lr(1, 0.3, 0) == 0.3
    logs = []
    Trainer(make_model(), VPSDE(), make_data(), cfg(lr=0.02, warmup_steps=4), loss_fn=eps_dsm_loss,
            log_fn=logs.append).fit()
    assert [m["step"] for m in logs] == list(range(1, 11))
    assert [m["lr"] for m in logs] == [0.02 * min(1, s / 4) for s in range(1, 11)]
    assert all(m["steps_per_sec"] > 0 and math.isfinite(m["loss"]) for m in logs)


def linear_loss(model, sde, x0, *, generator=None):
    # d/dw of sum(w * c) is c, whatever the data: a known gradient with norm 5
    return (model.weight * torch.tensor([[3.0, 4.0]], dtype=model.weight.dtype)).sum()


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_gradient_clipping(clip):
    model = nn.Linear(2, 1, bias=False).to(F64)
    logs = []
    trainer = Trainer(model, VPSDE(), make_data(), cfg(total_steps=2, grad_clip=clip), loss_fn=linear_loss,
                      log_fn=logs.append)
    trainer.fit()
    assert [m["grad_norm"] for m in logs] == pytest.approx([5.0, 5.0])  # the pre-clip norm is logged
    expected = torch.tensor([[3.0, 4.0]], dtype=F64) * (clip / 5 if clip else 1.0)
    torch.testing.assert_close(model.weight.grad, expected)


# ------------------------------------------------------------------------------------------ NaN stop
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky_loss(model, sde, x0, *, generator=None):
        calls["n"] += 1
        loss = eps_dsm_loss(model, sde, x0, generator=generator)
        return loss * float("nan") if calls["n"] == 7 else loss

    model = make_model()
    with pytest.raises(NonFiniteLossError, match="step 7"):
        Trainer(model, VPSDE(), make_data(), cfg(ckpt_every=5, out_dir=str(tmp_path)), loss_fn=flaky_loss).fit()
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was never applied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


# ------------------------------------------------------------------------------------------ config and data
def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="total_steps"):
        TrainConfig(total_steps=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="batch_size=128 exceeds"):
        Trainer(make_model(), VPSDE(), make_data(n=64), TrainConfig(batch_size=128), loss_fn=eps_dsm_loss)
    with pytest.raises(TypeError, match="data"):
        Trainer(make_model(), VPSDE(), torch.arange(10), cfg(), loss_fn=eps_dsm_loss)


def test_data_order_is_a_reproducible_permutation_per_epoch():
    trainer = Trainer(make_model(), VPSDE(), make_data(n=64), cfg(batch_size=16), loss_fn=eps_dsm_loss)
    assert trainer.batches_per_epoch == 4
    epoch0 = torch.cat([trainer.batch_indices(s) for s in range(4)])
    epoch1 = torch.cat([trainer.batch_indices(s) for s in range(4, 8)])
    assert sorted(epoch0.tolist()) == list(range(64)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    again = Trainer(make_model(), VPSDE(), make_data(n=64), cfg(batch_size=16), loss_fn=eps_dsm_loss)
    assert torch.equal(again.batch_indices(5), trainer.batch_indices(5))


def test_labels_are_passed_to_the_loss():
    seen = []

    def loss_with_y(model, sde, x0, *, generator=None, y=None):
        seen.append((x0[:, 0].clone(), y.clone()))
        return eps_dsm_loss(model, sde, x0, generator=generator)

    data = make_data(n=32)
    labels = torch.arange(32)
    Trainer(make_model(), VPSDE(), data, cfg(total_steps=3, batch_size=8), labels=labels, loss_fn=loss_with_y).fit()
    for x_col, y in seen:
        torch.testing.assert_close(x_col, data[y, 0], rtol=0, atol=0)


def _weights_after(config, callbacks=()):
    model = make_model()
    trainer = Trainer(model, VPSDE(), make_data(), config, loss_fn=eps_dsm_loss, callbacks=callbacks)
    trainer.fit()
    return [p.detach().clone() for p in model.parameters()] + [p.clone() for p in trainer.ema.model.parameters()]


def test_bf16_autocasts_the_forward_on_cpu():
    """bf16=True runs the forward in bfloat16 on CPU (torch.autocast "cpu"): the trajectory changes, training works."""
    dtypes = []
    model32 = make_model().float()
    model32.net[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    data = make_data().float()
    plain = Trainer(make_model().float(), VPSDE(), data, cfg(), loss_fn=eps_dsm_loss).fit()
    flagged = Trainer(model32, VPSDE(), data, cfg(bf16=True), loss_fn=eps_dsm_loss).fit()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert next(model32.parameters()).dtype == torch.float32  # weights stay fp32
    assert flagged["loss"] != plain["loss"] and abs(flagged["loss"] - plain["loss"]) < 0.1 * plain["loss"]


def test_bf16_rejects_a_device_without_autocast():
    from sde.training.trainer import _bf16_autocast

    with pytest.raises(ValueError, match="bf16=True needs a cuda or cpu device"):
        _bf16_autocast(torch.device("meta"))


@pytest.mark.slow
def test_compile_trains_the_same_model_on_cpu():
    """compile=True wraps the training forward in torch.compile on CPU too (inductor; tens of seconds)."""
    plain = _weights_after(cfg(total_steps=3))
    compiled = _weights_after(cfg(total_steps=3, compile=True))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(plain, compiled))


def test_eval_hooks_run_every_k_steps_without_changing_the_trajectory():
    calls = []

    def hook(step, model, ema_model):
        assert not model.training and ema_model is not model
        torch.rand(100)  # consumes the global RNG: must not leak into training
        calls.append(step)
        return {"bpd": 1.0 / step}

    plain = _weights_after(cfg())
    hooked = _weights_after(cfg(eval_every=4), callbacks=[hook])
    assert calls == [4, 8, 10]  # every k steps and at the end
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))


# ------------------------------------------------------------------------------------------ it learns
@pytest.mark.slow
def test_training_learns_the_exact_gaussian_score():
    """Train on samples of a Gaussian and compare the EMA model with the oracle's exact score."""
    sde = VPSDE()
    mean = torch.tensor([[0.5, -0.3]], dtype=F64)
    target = GaussianMixture(mean, stds=torch.tensor([[0.6, 0.3]], dtype=F64))
    data = target.sample(2048, torch.Generator().manual_seed(0))
    model = make_model(hidden=64)
    config = cfg(total_steps=1500, batch_size=128, lr=3e-3, warmup_steps=50, log_every=0, ema_decay=0.99)
    trainer = Trainer(model, sde, data, config, loss_fn=eps_dsm_loss)
    trainer.fit()
    for t in (0.3, 0.6):
        marg = target.marginal(sde, t)
        x = marg.sample(4000, torch.Generator().manual_seed(1))
        tt = torch.full((x.shape[0],), t, dtype=F64)
        std = sde.marginal_prob(x, tt)[1][:, None]
        with torch.no_grad():
            learned = -trainer.ema.model(x, tt) / std
        exact = target.score_fn(sde)(x, tt)
        rel = ((learned - exact).norm(dim=1) ** 2).mean() / (exact.norm(dim=1) ** 2).mean()
        assert rel < 0.02, (t, rel.item())


def test_stop_rule_ends_the_run_like_total_steps(tmp_path):
    calls = []
    trainer = Trainer(make_model(), VPSDE(), make_data(), cfg(out_dir=str(tmp_path), ckpt_every=100),
                      loss_fn=eps_dsm_loss, callbacks=[lambda s, m, e: calls.append(s)])
    trainer.fit(stop=lambda step: step == 4)
    assert trainer.step == 4 and calls == [4]  # final eval ran at the stop step
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 4  # and the final checkpoint was written

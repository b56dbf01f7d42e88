"""DDP: 2 gloo processes on CPU reproduce a single process with the same global batch; DDP resume is exact;
the apps under torchrun (2 gloo processes) work in one run folder and sample.py / likelihood.py do not depend
on the world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed import free_port, run_ranks
from torch import nn

from sde.sdes import VPSDE
from sde.training import TrainConfig, Trainer

F64 = torch.float64
GLOBAL_BATCH = 16
STEPS = 12


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], dim=1))


def regression_loss(model, sde, x0, *, generator=None):
    """Noise-free loss: per-example terms depend only on the example, so shards can be compared exactly."""
    t = torch.full((x0.shape[0],), 0.5, dtype=x0.dtype)
    return ((model(x0, t) - x0.flip(1) ** 2) ** 2).sum(1).mean()


def noisy_loss(model, sde, x0, *, generator=None):
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype) * 0.999 + 1e-3
    mean, std = sde.marginal_prob(x0, t)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return ((model(mean + std[:, None] * z, t) - z) ** 2).sum(1).mean()


def build(batch_size, loss_fn, total_steps=STEPS, out_dir=None, log_fn=None, ckpt_every=0):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyNet().to(F64)
    data = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    config = TrainConfig(total_steps=total_steps, batch_size=batch_size, lr=1e-2, warmup_steps=2, log_every=1,
                         ckpt_every=ckpt_every, progress=False, out_dir=out_dir)
    return Trainer(model, VPSDE(), data, config, loss_fn=loss_fn, log_fn=log_fn)


def _weights(trainer):
    ema = [p.clone() for p in trainer.ema.model.parameters()]
    return [p.detach().clone() for p in trainer.model.parameters()] + ema


def _worker(rank: int, world: int, tmp: str) -> None:
    """One rank: a DDP fit, and a DDP run resumed from its checkpoint against a straight one."""
    losses = []
    trainer = build(GLOBAL_BATCH // world, regression_loss, log_fn=lambda m: losses.append(m["loss"]))
    trainer.fit()
    # Exact resume under DDP: 6 steps, then a fresh trainer continues to 12 from the checkpoint.
    build(GLOBAL_BATCH // world, noisy_loss, 6, out_dir=f"{tmp}/resumed", ckpt_every=3).fit()
    resumed = build(GLOBAL_BATCH // world, noisy_loss, out_dir=f"{tmp}/resumed", ckpt_every=3)
    resumed.fit()
    straight = build(GLOBAL_BATCH // world, noisy_loss, out_dir=f"{tmp}/straight", ckpt_every=3)
    straight.fit()
    torch.save({"losses": losses, "weights": _weights(trainer), "resumed": _weights(resumed),
                "straight": _weights(straight), "noise": resumed.noise_generator.get_state(),
                "noise_straight": straight.noise_generator.get_state()}, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    ranks = run_ranks(_worker, 2, str(tmp_path))
    n = torch.get_num_threads()
    try:
        single_losses = []
        single = build(GLOBAL_BATCH, regression_loss, log_fn=lambda m: single_losses.append(m["loss"]))
        single.fit()
    finally:
        torch.set_num_threads(n)
    assert len(ranks[0]["losses"]) == STEPS
    assert ranks[1]["losses"] == []  # only rank 0 logs
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"], dtype=F64), torch.tensor(single_losses, dtype=F64),
                               rtol=1e-12, atol=0)
    assert single_losses[-1] < 0.5 * single_losses[0]  # it is training, so the comparison is not vacuous
    for a, b in zip(ranks[0]["weights"], _weights(single)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for r in ranks:  # DDP keeps replicas identical; resume continues bit-for-bit on every rank
        assert all(torch.equal(a, b) for a, b in zip(r["weights"], ranks[0]["weights"]))
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["straight"]))
        assert torch.equal(r["noise"], r["noise_straight"])
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])  # ranks draw independent loss noise
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["latest.pt"]


# ------------------------------------------------------------------------------------------ the apps under torchrun
ROOT = Path(__file__).resolve().parents[1]
APP_FAST = ["threads=1", "logger=none"]


def _torchrun(script: str, nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N experiments/<script>`` with gloo on the CPU."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", WANDB_MODE="offline",
               SCORE_SDE_CACHE=str(cwd / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(ROOT / "experiments" / script), *APP_FAST, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _only_run_folder(cwd: Path, task: str) -> Path:
    runs = [p for p in (cwd / "outputs" / task).glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # every rank worked in rank 0's folder; no stray ${now:} folder is left
    return runs[0]


@pytest.mark.slow
def test_torchrun_sample_and_likelihood_do_not_depend_on_the_world_size(tmp_path):
    oracle = ["data=gmm", "score=oracle", "sde=subvp"]
    results = {}
    for nproc in (1, 2):
        cwd = tmp_path / f"n{nproc}"
        cwd.mkdir()
        _torchrun("sample.py", nproc, [*oracle, "sampler=em", "sampler.options.steps=30", "num_samples=150",
                                      "batch_size=32", "reference_samples=100"], cwd)
        _torchrun("likelihood.py", nproc, [*oracle, "num_points=40", "batch_size=16", "likelihood.divergence=exact",
                                          "likelihood.rtol=1e-5", "likelihood.atol=1e-5"], cwd)
        s, ll = _only_run_folder(cwd, "sample"), _only_run_folder(cwd, "likelihood")
        results[nproc] = {"x": torch.load(s / "samples.pt"), "logp": torch.load(ll / "logp.pt"),
                          "sample": json.loads((s / "metrics.json").read_text()),
                          "likelihood": json.loads((ll / "metrics.json").read_text())}
    one, two = results[1], results[2]
    assert one["x"].shape == (150, 2) and torch.equal(one["x"], two["x"])  # bit-equal union of the shards
    assert one["logp"].shape == (40,) and torch.equal(one["logp"], two["logp"])
    assert one["sample"]["nfe"] == two["sample"]["nfe"] == 31 * 5  # 5 chunks of (30 steps + final denoise)
    assert one["likelihood"]["score_calls"] == two["likelihood"]["score_calls"]
    assert two["likelihood"]["mean_abs_logp_error"] < 1e-2  # and it is the right density (exact oracle)
    assert two["sample"]["mmd"] < 0.05


@pytest.mark.slow
def test_torchrun_train_uses_ddp_in_one_run_folder(tmp_path):
    tiny = ["model=mlp", "model.net.hidden=16", "model.net.depth=1", "train.total_steps=6", "train.batch_size=32",
            "train.eval_every=0", "train.ckpt_every=3", "train.keep_every=0", "train.warmup_steps=2",
            "eval.num_samples=4", "eval.bpd_samples=0", "eval.strip_frames=0", "sampler.options.steps=5"]
    _torchrun("train.py", 2, tiny, tmp_path)
    run = _only_run_folder(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["config"]["batch_size"] == 16  # train.batch_size is the global batch: 32 over 2 ranks
    assert state["rng"]["world_size"] == 2 and len(state["rng"]["per_rank"]) == 2  # written by the DDP Trainer
    assert (run / "checkpoint.pt").is_file() and (run / "samples.png").is_file()


@pytest.mark.slow
def test_submitit_local_sweep_runs_each_point_as_a_two_rank_job(tmp_path):
    """The SLURM launcher's plumbing on one machine: a 2-point sweep, each point 2 submitit tasks = 2 ranks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, str(ROOT / "experiments" / "sample.py"), "-m", "launcher=submitit_local", *APP_FAST,
           "data=gmm", "score=oracle", "num_samples=64", "batch_size=32", "reference_samples=50",
           "sampler=em,ddim", "sampler.options.steps=10", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    sweep = tmp_path / "sweep"
    rows = [json.loads((sweep / "rows" / f"{i}.json").read_text()) for i in range(2)]
    assert [r["sampler"] for r in rows] == ["euler_maruyama", "ddim"]
    assert all(r["nfe"] == 2 * 11 for r in rows)  # 2 chunks
    for i in range(2):
        assert torch.load(sweep / str(i) / "samples.pt").shape == (64, 2)  # rank 0 gathered both chunks
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and any(p.iterdir())]
    assert len(jobs) == 2
    for job in jobs:  # two tasks per job; only rank 0 prints the summary table
        out = {t: next(job.glob(f"*_{t}_log.out")).read_text() for t in (0, 1)}
        assert "sample: gmm ->" in out[0] and "sample: gmm ->" not in out[1]

"""Checkpoints: atomic writes, weights_only loads, retention, mismatch errors, exact resume (also after SIGKILL)."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sde.training import CheckpointMismatchError, load_checkpoint, save_checkpoint
from sde.training.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]

# The same script runs in-process (runpy) and in a subprocess that we SIGKILL mid-write.
SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from sde.sdes import VPSDE
    from sde.training import TrainConfig, Trainer

    class TinyScore(nn.Module):
        def __init__(self, hidden=32):
            super().__init__()
            # Dropout draws from the global torch RNG: resume must restore it too.
            self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Dropout(0.1), nn.Linear(hidden, 2))

        def forward(self, x, t):
            return self.net(torch.cat([x, t[:, None]], dim=1))

    def loss(model, sde, x0, *, generator=None):
        t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype) * 0.999 + 1e-3
        mean, std = sde.marginal_prob(x0, t)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return ((model(mean + std[:, None] * z, t) - z) ** 2).sum(1).mean()

    def build(out_dir, total_steps, hidden=32, callbacks=(), **overrides):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = TinyScore(hidden).double()
        data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        options = dict(total_steps=total_steps, batch_size=16, lr=1e-2, warmup_steps=3, ckpt_every=4, log_every=0,
                       ema_decay=0.9, progress=False, out_dir=out_dir)
        options.update(overrides)
        return Trainer(model, VPSDE(), data, TrainConfig(**options), loss_fn=loss, callbacks=callbacks,
                       model_config={"hidden": hidden})

    def run(out_dir, total_steps, **kw):
        trainer = build(out_dir, total_steps, **kw)
        trainer.fit()
        return trainer

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]))
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_tiny.py"
    path.write_text(SCRIPT)
    n = torch.get_num_threads()
    yield path, runpy.run_path(str(path))
    torch.set_num_threads(n)


def snapshot(trainer):
    """Every tensor that defines the run's future: weights, EMA, optimizer moments, loss-noise RNG."""
    opt = trainer.optimizer.state_dict()["state"]
    tensors = list(trainer.model.state_dict().values()) + list(trainer.ema.state_dict().values())
    tensors += [v for s in opt.values() for v in s.values()] + [trainer.noise_generator.get_state()]
    return trainer.step, tensors


def assert_same_run(a, b):
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_resume_is_bit_exact(script, tmp_path):
    _, ns = script
    straight = snapshot(ns["run"](str(tmp_path / "a"), 12))
    ns["run"](str(tmp_path / "b"), 6)  # "interrupted" after 6 steps (latest.pt at step 6)
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["step"] == 6
    resumed = snapshot(ns["run"](str(tmp_path / "b"), 12))
    assert_same_run(straight, resumed)
    fresh = snapshot(ns["run"](str(tmp_path / "c"), 12, seed=1))
    assert not torch.equal(fresh[1][0], straight[1][0])  # the comparison can fail


# Fault injection lives here, not in the library: the writer's payload step is replaced so that the
# second write of latest.pt (step 8, ckpt_every=4) stops half-way, touches a marker and waits to be killed.
PAUSING_WRITER = textwrap.dedent('''
    import os, runpy, sys, time
    from pathlib import Path
    import sde._io

    out, steps, marker, script = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    real, latest_writes = sde._io._write_payload, []

    def pausing(f, data, path):
        if path.name == "latest.pt":
            latest_writes.append(path)
            if len(latest_writes) == 2:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                marker.touch()
                time.sleep(3600)
        real(f, data, path)

    sde._io._write_payload = pausing
    runpy.run_path(script)["run"](out, steps)
''')


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(script, tmp_path):
    path, ns = script
    out, marker = tmp_path / "killed", tmp_path / "paused"
    wrapper = tmp_path / "pausing_writer.py"
    wrapper.write_text(PAUSING_WRITER)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, str(wrapper), str(out), "12", str(marker), str(path)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "writer never reached the pause"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # half of the step-8 checkpoint is on disk
    finally:
        proc.kill()
        proc.wait()
    partial = list(out.glob(".tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(Exception):  # noqa: B017 - the half-written file is unreadable, whatever the error
        torch.load(partial[0], weights_only=True)
    assert load_checkpoint(out / "latest.pt")["step"] == 4  # the previous checkpoint survived intact
    resumed = snapshot(ns["run"](str(out), 12))
    assert not list(out.glob(".tmp-*"))  # the stale temp file is cleaned up
    straight = snapshot(ns["run"](str(tmp_path / "straight"), 12))
    assert_same_run(straight, resumed)


def test_retention_latest_best_and_every_k(script, tmp_path):
    _, ns = script
    bpd = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.5, 10: 2.7}
    ns["run"](str(tmp_path), 10, ckpt_every=2, keep_every=4, eval_every=2, callbacks=[lambda s, m, e: {"bpd": bpd[s]}])
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    assert names == ["best.pt", "latest.pt", "step_00000004.pt", "step_00000008.pt"]
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 10
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 8 and best["best_value"] == 2.5 and best["eval_metrics"] == {"bpd": 2.5}
    assert load_checkpoint(tmp_path / "step_00000004.pt")["step"] == 4


def test_checkpoint_holds_only_weights_only_types(script, tmp_path):
    _, ns = script
    trainer = ns["run"](str(tmp_path), 4)
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert set(state) >= {"model", "ema", "optimizer", "scheduler", "step", "config", "rng", "model_config"}
    assert state["config"] == trainer.config.to_dict() and state["model_config"] == {"hidden": 32}
    rng = state["rng"]["per_rank"][0]
    assert torch.equal(rng["noise"], trainer.noise_generator.get_state())
    assert set(rng) == {"torch_cpu", "cuda", "python", "numpy", "noise"}


def test_mismatched_checkpoint_names_the_differing_keys(script, tmp_path):
    _, ns = script
    ns["run"](str(tmp_path), 4)
    with pytest.raises(CheckpointMismatchError, match=r"hidden: checkpoint=32 current=16"):
        ns["run"](str(tmp_path), 8, hidden=16)
    with pytest.raises(CheckpointMismatchError, match=r"lr: checkpoint=0.01 current=0.02"):
        ns["run"](str(tmp_path), 8, lr=0.02)
    trainer = ns["build"](str(tmp_path), 8, hidden=16)
    trainer.model_config = {"hidden": 32}  # a model_config that lies: the weight shapes still catch it
    with pytest.raises(CheckpointMismatchError, match=r"net\.0\.weight: checkpoint \(32, 3\) vs model \(16, 3\)"):
        trainer.fit()


def test_atomic_write_leaves_old_file_and_no_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "ck.pt"
    save_checkpoint(target, {"w": torch.arange(3)})
    save_checkpoint(target, {"w": torch.arange(4)})  # overwrite
    assert torch.equal(load_checkpoint(target)["w"], torch.arange(4))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"w": torch.arange(5)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    assert torch.equal(load_checkpoint(target)["w"], torch.arange(4))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_manager_removes_stale_temp_files(tmp_path):
    (tmp_path / ".tmp-latest.pt.abc").write_bytes(b"half")
    (tmp_path / "latest.pt").write_bytes(b"keep")
    CheckpointManager(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]

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


# -- one format, rebuilt only through the project's registries ------------------------------------------
SPEC = {
    "sde": {"_target_": "sde.sdes.VPSDE", "beta_min": 0.1, "beta_max": 12.0, "schedule": "linear"},
    "model": {"net": {"_target_": "sde.nets.MLP", "dim": 2, "hidden": 16, "depth": 1}, "parametrization": "eps"},
    "data": {"name": "gmm", "loader": {"_target_": "sde.data.load_dataset", "name": "gmm"}, "shape": [2]},
}


def _trainer_checkpoint(tmp_path, spec=SPEC):
    """A real Trainer run whose model_config describes its model (what experiments/train.py passes)."""
    from sde.checkpoint import build_score_model, build_sde
    from sde.training import TrainConfig, Trainer

    torch.manual_seed(0)
    sde = build_sde(SPEC["sde"])
    model = build_score_model(SPEC["model"], sde, SPEC["data"]["shape"])
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(total_steps=3, batch_size=16, warmup_steps=0, ckpt_every=0, log_every=0, progress=False,
                         out_dir=str(tmp_path / "ckpts"))
    trainer = Trainer(model, sde, data, config, model_config=spec)
    trainer.fit()
    return trainer, tmp_path / "ckpts" / "latest.pt"


def test_trainer_and_app_checkpoints_rebuild_the_same_model(tmp_path):
    from sde.checkpoint import load_score_model
    from sde.nets import MLP
    from sde.sdes import VPSDE

    trainer, latest = _trainer_checkpoint(tmp_path)
    final = trainer.save_as(tmp_path / "checkpoint.pt", metrics={"steps": 3})
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), torch.full((5,), 0.3)
    for path in (latest, final):
        loaded = load_score_model(path)
        assert type(loaded.sde) is VPSDE and loaded.sde.beta_max == 12.0 and type(loaded.model.net) is MLP
        assert loaded.weights == "ema" and loaded.state["step"] == 3
        assert torch.equal(loaded.model(x, t), trainer.ema.model(x, t))
    raw = load_score_model(final, ema=False)
    assert torch.equal(raw.model(x, t), trainer.model(x, t)) and raw.state["metrics"] == {"steps": 3}
    # Files written before the formats were merged (train.py's old checkpoint.pt) still load.
    legacy = {"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "config": SPEC, "step": 3}
    save_checkpoint(tmp_path / "legacy.pt", legacy)
    assert torch.equal(load_score_model(tmp_path / "legacy.pt").model(x, t), trainer.ema.model(x, t))


PAYLOAD_SPECS = [  # (where, node) planted in an otherwise valid checkpoint; each would run code via instantiate
    ("sde", {"_target_": "pathlib.Path.write_text", "self": "{marker}", "data": "pwned"}),
    ("sde", {"_target_": "os.system", "command": "touch {marker}"}),
    ("sde", {"_target_": "sde.sdes.VPSDE", "beta_max": {"_target_": "os.system", "command": "touch {marker}"}}),
    ("sde", {"_target_": "torch.load", "f": "{payload}", "weights_only": False}),
    ("model", {"net": {"_target_": "os.system", "command": "touch {marker}"}}),
    ("model", {"net": {"_target_": "sde.nets.MLP", "dim": 2, "_args_": ["touch {marker}"]}}),
    ("data", {"loader": {"_target_": "os.system", "command": "touch {marker}"}, "shape": [2]}),
]


class _Payload:
    """Pickles to a call of os.system (what a malicious checkpoint would hide)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("where,node", PAYLOAD_SPECS, ids=[f"{w}-{i}" for i, (w, _) in enumerate(PAYLOAD_SPECS)])
def test_checkpoint_naming_foreign_code_is_refused(tmp_path, where, node):
    import json

    from sde.checkpoint import CheckpointSpecError, load_score_model

    marker, payload = tmp_path / "marker", tmp_path / "payload.pt"
    torch.save({"x": _Payload(f"touch {marker}")}, payload)  # the nested pickle a torch.load node would read
    trainer, latest = _trainer_checkpoint(tmp_path)
    spec = json.loads(json.dumps(SPEC))
    spec[where] = json.loads(json.dumps(node).replace("{marker}", str(marker)).replace("{payload}", str(payload)))
    state = torch.load(latest, weights_only=True)
    state["model_config"] = spec
    save_checkpoint(tmp_path / "evil.pt", state)
    with pytest.raises(CheckpointSpecError, match=rf"^{where}") as err:
        load_score_model(tmp_path / "evil.pt")
        if where == "data":
            from sde.checkpoint import build_data

            build_data(spec["data"])
    assert "not a registered" in str(err.value) or "not allowed" in str(err.value)
    assert not marker.exists()


def test_data_description_naming_foreign_code_is_refused(tmp_path):
    from sde.checkpoint import CheckpointSpecError, build_data

    marker = tmp_path / "marker"
    with pytest.raises(CheckpointSpecError, match=r"data.loader._target_='os.system'"):
        build_data({"loader": {"_target_": "os.system", "command": f"touch {marker}"}})
    with pytest.raises(CheckpointSpecError, match=r"data.loader.n._target_"):
        build_data({"loader": {"_target_": "sde.data.load_dataset", "name": "gmm", "n": {"_target_": "os.getpid"}}})
    assert not marker.exists()
    assert build_data({"loader": {"name": "load_dataset"}}, name="gmm", split="test").shape == (2,)


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    from sde.checkpoint import CheckpointError, load_score_model

    marker = tmp_path / "marker"
    trainer, latest = _trainer_checkpoint(tmp_path)
    state = torch.load(latest, weights_only=True)
    state["metrics"] = {"note": _Payload(f"touch {marker}")}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights-only"):
        load_score_model(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        trainer.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_every_torch_and_numpy_load_in_the_repository_is_weights_only():
    """The repository's own loads stay weights_only=True / allow_pickle=False (docs/security.md lists them)."""
    import re

    offenders = []
    for path in [*REPO.glob("sde/**/*.py"), *REPO.glob("experiments/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"\btorch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.relative_to(REPO)}: {m.group(0)[:80]}")
        for m in re.finditer(r"\bnp\.load\(([^()]|\([^()]*\))*\)", text):
            if "allow_pickle=False" not in m.group(0):
                offenders.append(f"{path.relative_to(REPO)}: {m.group(0)[:80]}")
        if re.search(r"\b(instantiate|get_class|get_method|pickle\.loads?)\(", text) and path.name != "data.py":
            offenders.append(f"{path.relative_to(REPO)}: calls instantiate/get_class/pickle.load")
    assert offenders == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_applies_the_umask(tmp_path, umask, mode):
    from sde._io import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.txt", "text")
        save_checkpoint(tmp_path / "b.pt", {"w": torch.zeros(1)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "text"
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode and (tmp_path / "b.pt").stat().st_mode & 0o777 == mode


def test_unreadable_checkpoint_names_the_path(tmp_path):
    from sde.checkpoint import CheckpointError, load_score_model

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt"):
        load_checkpoint(tmp_path / "empty.pt")
    save_checkpoint(tmp_path / "bare.pt", {"model": {}})
    with pytest.raises(CheckpointError, match=r"bare\.pt.*does not describe its model"):
        load_score_model(tmp_path / "bare.pt")

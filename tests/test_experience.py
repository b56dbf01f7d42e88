"""What a person sees when running the apps: bars and logs, early config errors, W&B names and lineage,
files readable by the group, labelled pictures, the evaluation floor and sweep tables with their parameters.

Unit tests first (no subprocess); the end-to-end runs of the apps (subprocesses, tiny settings) are slow.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import stat
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import plots  # noqa: E402
from _common.console import progress_enabled  # noqa: E402
from _common.sweeps import names_from  # noqa: E402
from test_configs import _compose  # noqa: E402
from test_experiments import FAST, TINY_TRAIN, _env, _wandb_records, read_offline_run, run_app  # noqa: E402

# ----------------------------------------------------------------------------------------------- unit tests


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("out,err,expected", [(True, True, True), (True, False, False), (False, True, False)])
def test_progress_auto_needs_a_terminal_on_stdout_and_stderr(monkeypatch, out, err, expected):
    monkeypatch.setattr(sys, "stdout", _Stream(out))
    monkeypatch.setattr(sys, "stderr", _Stream(err))
    assert progress_enabled("auto") is expected
    assert progress_enabled(True) is True and progress_enabled("false") is False  # YAML bools or strings


def test_progress_refuses_other_values_naming_the_key():
    with pytest.raises(ValueError, match=r"train.progress='sometimes' is not supported; choose one of \['auto'"):
        progress_enabled("sometimes", "train.progress")


def test_train_progress_resolves_to_a_bool_so_the_node_stays_a_trainconfig():
    from sde.training import TrainConfig

    cfg = _compose("train", ["progress=true"], hydra_node=False)
    assert cfg.train.progress is True and TrainConfig(**{**dict(cfg.train), "betas": (0.9, 0.999)}).progress
    assert _compose("train", ["progress=false"], hydra_node=False).train.progress is False


def test_bad_train_value_names_the_config_key():
    from train import check_train_config

    for override, message in [("train.total_steps=-5", "train.total_steps must be >= 1, got -5"),
                              ("train.lr=-1", "train.lr must be a finite number > 0"),
                              ("train.keep_every=1.5", "train.keep_every must be an int, got float"),
                              ("loss.label_dropout=2", r"loss.label_dropout=2 must be a probability")]:
        with pytest.raises((ValueError, TypeError), match=message):
            check_train_config(_compose("train", [override], hydra_node=False))
    check_train_config(_compose("train", [], hydra_node=False))  # the defaults pass


def test_unset_score_path_names_the_command_that_writes_one():
    from _common.checks import check_config

    for app in ("sample", "likelihood", "evaluate"):
        with pytest.raises(ValueError, match=r"score.path is not set.*\n    python experiments/train.py\n"):
            check_config(_compose(app, [], hydra_node=False))
    with pytest.raises(FileNotFoundError, match=r"score.path='/nonexistent.pt' does not exist"):
        check_config(_compose("evaluate", ["score.path=/nonexistent.pt"], hydra_node=False))
    check_config(_compose("sample", ["data=gmm", "score=oracle"], hydra_node=False))  # no path needed


def test_sweep_names_groups_runs_and_parameters():
    single = names_from("train", "digits", ["sde=ve", "hydra.run.dir=/x"], None, None)
    assert (single.group, single.run, single.params) == ("digits", "sde=ve", {})
    basic = names_from("sample", "gmm", ["sde=ve", "sampler=ddim", "num_samples=300", "hydra.sweep.dir=/s"],
                       ["sde=vp,ve", "sampler=ddim,dpm", "num_samples=300", "hydra.sweep.dir=/s"], None)
    assert basic.group == "sample:gmm num_samples=300 sde=vp,ve sampler=ddim,dpm"
    assert basic.run == "sde=ve sampler=ddim" and basic.params == {"sde": "ve", "sampler": "ddim"}
    optuna = names_from("train", "digits", ["hparams_search=optuna", "train.lr=0.003", "train.batch_size=64"], [],
                        {"train.lr": "tag(log, interval(1e-4, 1e-2))", "train.batch_size": "choice(64, 128)"})
    assert optuna.params == {"train.lr": 0.003, "train.batch_size": 64}
    assert optuna.group.startswith("train:digits hparams_search=optuna train.lr=tag(log")
    assert optuna.run == "train.lr=0.003 train.batch_size=64"


def test_evaluation_halves_have_equal_class_counts():
    from evaluate import balanced_halves

    from sde.data import load_dataset

    labels = load_dataset("digits", split="test").labels
    for n in (179, 50, 7):
        a, b = balanced_halves(labels, len(labels), n)
        assert len(a) == len(b) <= n and len(a) >= min(n, 170)
        assert not set(a.tolist()) & set(b.tolist())  # disjoint
        ca, cb = torch.bincount(labels[a], minlength=10), torch.bincount(labels[b], minlength=10)
        assert (ca - cb).abs().max() <= 1  # stratified: equal counts (here exactly)
        if n >= 50:  # the reference half keeps the split's class mix
            share = torch.bincount(labels, minlength=10) / len(labels)
            assert (ca / ca.sum() - share).abs().max() < 0.03
    # the old split (first half vs second half) did not: 39 threes against 13
    old = torch.bincount(labels[:179], minlength=10)[3], torch.bincount(labels[179:358], minlength=10)[3]
    assert old[0] - old[1] > 10
    odd = torch.tensor([0, 0, 0, 1, 1, 2])  # odd classes lose one point, a singleton class drops out
    a, b = balanced_halves(odd, 6, 10)
    assert sorted(odd[a].tolist()) == sorted(odd[b].tolist()) == [0, 1]
    a, b = balanced_halves(None, 9, 10)
    assert a.tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6, 7]


def test_strip_columns_carry_their_labels(tmp_path):
    from _common.sampling import Strip, strip_label

    from sde.sdes import VESDE, VPSDE

    assert strip_label(VPSDE(), 0.5) == "t=0.5" and strip_label(VESDE(sigma_max=50.0), 1.0) == "σ=50"
    frames = Strip([torch.full((2, 1, 8, 8), -1.0) for _ in range(3)], ["t=1", "t=0.5", "final"])
    plain = np.asarray(Image.open(plots.save_strip(list(frames), tmp_path / "plain.png")))
    labelled = np.asarray(Image.open(plots.save_strip(frames, tmp_path / "labelled.png")))  # labels from the Strip
    assert labelled.shape[0] == plain.shape[0] + plots._HEADER and labelled.shape[1] == plain.shape[1]
    assert (labelled[plots._HEADER:] == plain).all()  # the tiles are unchanged below the band
    column = plain.shape[1] // 3
    for j in range(3):  # some dark text pixels above every column
        assert (labelled[:plots._HEADER, j * column:(j + 1) * column] < 128).any()
    with pytest.raises(ValueError, match="labels must have one entry per frame"):
        plots.save_strip(list(frames), tmp_path / "x.png", labels=["t=1"])


def test_scatter_shows_the_reference_density_and_a_legend():
    from sde.oracle import GaussianMixture

    gm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64), stds=torch.tensor([0.2, 0.3]))
    g = torch.Generator().manual_seed(0)
    fig = plots.scatter_figure(gm.sample(200, generator=g), gm.sample(500, generator=g), gm.log_prob, "t",
                               reference_label="oracle samples")
    try:
        ax = fig.axes[0]
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == ["oracle samples (2-D histogram)", "exact density (contours)", "samples"]
        kinds = {type(c).__name__ for c in ax.collections}
        assert "QuadMesh" in kinds and "PathCollection" in kinds  # histogram and the sample dots
        assert any("Contour" in type(a).__name__ for a in [*ax.collections, *ax.get_children()])
    finally:
        plots._pyplot().close(fig)


class _FakeConfig:
    def update(self, values: dict, allow_val_change: bool = False) -> None:
        self.__dict__.update(values)


class _FakeRun:
    """What WandbTracker.use_checkpoint touches of a wandb run (online use_artifact cannot run here)."""

    def __init__(self) -> None:
        self.used, self.config = [], _FakeConfig()

    def use_artifact(self, ref, type=None):  # noqa: A002 - wandb's argument name
        self.used.append((ref, type))


def test_evaluation_runs_declare_the_checkpoint_artifact(tmp_path):
    from _common.tracking import WandbTracker, checkpoint_artifact

    run = tmp_path / "train_run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    assert checkpoint_artifact(run / "checkpoint.pt") is None  # no metrics.json: not from a logged run
    (run / "metrics.json").write_text(json.dumps({"checkpoint_artifact": "score-vp-mlp-digits",
                                                  "checkpoint_artifact_ref": "me/p/score-vp-mlp-digits:v3"}))
    (run / "checkpoints").mkdir()
    assert checkpoint_artifact(run / "checkpoints" / "latest.pt") is None  # never logged
    for offline, used in [(False, [("me/p/score-vp-mlp-digits:v3", "model")]), (True, [])]:
        tracker = object.__new__(WandbTracker)
        tracker.offline, tracker.run = offline, _FakeRun()
        found = tracker.use_checkpoint(run / "checkpoint.pt")
        assert found["name"] == "score-vp-mlp-digits" and tracker.run.used == used  # offline: wandb refuses use
        assert tracker.run.config.checkpoint_artifact == "score-vp-mlp-digits"


# ----------------------------------------------------------------------------------------------- end to end

def _in_terminal(args: list[str], env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run ``python args`` with stdout and stderr on a pseudo-terminal; (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns (a new pty has 0)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, preexec_fn=lambda: os.umask(0o022))
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "wandb" not in p.relative_to(folder).parts]


@pytest.mark.slow
def test_terminal_run_shows_bars_and_logs_the_same_lines_to_train_log(tmp_path):
    run = tmp_path / "run"
    args = [str(ROOT / "experiments" / "train.py"), *FAST, *TINY_TRAIN, "train.log_every=5", f"hydra.run.dir={run}"]
    code, out = _in_terminal(args, _env(tmp_path))
    assert code == 0, out[-3000:]
    assert "train:" in out and "it/s" in out and "20/20" in out  # the Trainer's tqdm bar (step, rate, ETA)
    assert "euler_maruyama" in out and "log-likelihood" in out  # the sampler's and the likelihood's bars
    log = (run / "train.log").read_text()
    for step in (5, 10, 15, 20):
        assert f"train: step {step}/20 loss " in log and "steps/s ETA" in log
    assert "train: step 10 val_loss " in log and "| test_bpd " in log  # eval metrics and the summary table
    # the console had the bar instead of the step lines
    assert "train: step 5/20" not in out
    # every file the app wrote is readable by the group and others under umask 022, like the PNGs
    written = _files(run)
    names = {p.name for p in written}
    assert {"metrics.json", "checkpoint.pt", "latest.pt", "best.pt", "train_config.json", "samples.png",
            "strip.png", "train.log"} <= names
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, f"{p} is {oct(p.stat().st_mode)}"


@pytest.mark.slow
def test_bad_value_fails_before_a_run_folder_gets_anything_but_hydras_files(tmp_path):
    run = tmp_path / "run"
    proc = run_app("train.py", ["threads=1", "logger=wandb", "train.total_steps=-5", f"hydra.run.dir={run}"],
                   tmp_path, check=False, WANDB_MODE="offline")
    assert proc.returncode != 0
    assert "ValueError: train.total_steps must be >= 1, got -5" in proc.stderr
    # What exists afterwards: Hydra creates the run folder, its .hydra/ and train.log before calling the app;
    # nothing else (no train_config.json, no checkpoints, no wandb/ run).
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "train.log"]
    assert "train: invalid config, nothing was run: train.total_steps must be >= 1" in (run / "train.log").read_text()
    for app in ("evaluate.py", "likelihood.py"):  # score.path ??? : says what writes a checkpoint
        out = tmp_path / app
        proc = run_app(app, ["threads=1", "logger=wandb", f"hydra.run.dir={out}"], tmp_path, check=False,
                       WANDB_MODE="offline")
        assert proc.returncode != 0 and "MissingMandatoryValue" not in proc.stderr
        assert "ValueError: score.path is not set" in proc.stderr and "python experiments/train.py" in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [".hydra", f"{app[:-3]}.log"]


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _records(run_folder: Path) -> list:
    (offline,) = sorted((run_folder / "wandb").glob("offline-run-*"))
    (log,) = offline.glob("*.wandb")
    return _wandb_records(log)


@pytest.mark.slow
def test_wandb_names_lineage_failures_and_no_files_in_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_MODE": "offline"}
    base = _env(tmp_path, **env)
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        base.pop(key)  # wandb's defaults: ~/.local/share/wandb, ~/.cache/wandb, ~/.config/wandb
    share, cache = home / ".local" / "share", home / ".cache"
    before = _du(share), _du(cache)
    run = tmp_path / "train"
    tiny = [a for a in TINY_TRAIN if not a.startswith("train.keep_every")]  # the default: no step_*.pt
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "threads=1", "logger=wandb", *tiny,
           "sde=vp", f"hydra.run.dir={run}"]  # sde=vp: the artifact name spells the SDE
    proc = subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "it/s" not in proc.stderr  # not a terminal: no bars
    assert "train: step 20/20 loss" in proc.stdout and "train: step 20/20 loss" in (run / "train.log").read_text()
    after = _du(share), _du(cache)
    # measured with wandb 0.31: the checkpoint was staged (copied) into ~/.local/share/wandb/artifacts/staging
    assert after == before == (0, 0), f"bytes in ~/.local/share, ~/.cache: {before} -> {after}"
    m = json.loads((run / "metrics.json").read_text())
    assert m["checkpoint_artifact"] == "score-vp-mlp-digits"
    assert not list((run / "checkpoints").glob("step_*.pt"))  # train.keep_every defaults to 0
    records = _records(run)
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert [(a.name, a.type) for a in arts] == [("score-vp-mlp-digits", "model")]
    meta = json.loads(arts[0].metadata)
    assert meta["sde"]["_target_"] == "sde.sdes.VPSDE" and meta["model"]["net"]["hidden"] == 32
    keys = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for i in r.history.item}
    assert {"train/loss", "train/steps_per_sec", "val/loss", "test/bpd"} <= keys and "val_loss" not in keys
    group, job_type, config, _ = read_offline_run(next((run / "wandb").glob("offline-run-*")))
    assert (group, job_type) == ("digits", "train")
    (name,) = [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"]
    assert name.startswith("threads=1 logger=wandb model=mlp train.total_steps=20")  # the run's overrides

    ev = tmp_path / "eval"
    run_app("evaluate.py", ["threads=1", "logger=wandb", f"score.path={run / 'checkpoint.pt'}", "sampler=ddim",
                            "sampler.options.steps=5", "num_samples=20", f"hydra.run.dir={ev}"], tmp_path, **env)
    _, job_type, config, _ = read_offline_run(next((ev / "wandb").glob("offline-run-*")))
    assert job_type == "evaluate" and config["checkpoint_artifact"] == "score-vp-mlp-digits"

    bad = tmp_path / "bad"  # fails inside the job, after the W&B run was opened
    proc = run_app("sample.py", ["threads=1", "logger=wandb", "score=oracle", f"hydra.run.dir={bad}"], tmp_path,
                   check=False, **env)
    assert proc.returncode != 0 and "score=oracle needs a data set with an exact score" in proc.stderr
    records = _records(bad)
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    _, _, _, summary = read_offline_run(next((bad / "wandb").glob("offline-run-*")))
    assert summary["error"].startswith("ValueError: score=oracle needs a data set")
    assert "sample failed: ValueError: score=oracle" in (bad / "sample.log").read_text()
    assert _du(share) == 0 and _du(cache) == 0


@pytest.mark.slow
def test_optuna_results_table_lists_each_trials_parameters(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY_TRAIN if not a.startswith("train.batch_size")]
    run_app("train.py", ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST, *tiny,
                         "eval.bpd_samples=0", "eval.strip_frames=0", f"hydra.sweep.dir={sweep}"], tmp_path)
    md = (sweep / "results.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:3] == ["train.lr", "train.batch_size", "train.ema_decay"] and len(md) == 4
    for job, line in enumerate(md[2:]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        trial = json.loads((sweep / str(job) / "train_config.json").read_text())["train"]
        assert float(cells["train.lr"]) == pytest.approx(trial["lr"], rel=1e-3)
        assert int(cells["train.batch_size"]) == trial["batch_size"] and cells["val_loss"] != ""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["launcher=slurm", "hydra/launcher=submitit_slurm"])
def test_slurm_launcher_config_prints_without_a_cluster(tmp_path, launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_app("train.py", [launcher, "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p", "hydra.launcher"],
                   tmp_path)
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: gpu" in proc.stdout

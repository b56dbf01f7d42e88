"""End-to-end runs of the Hydra apps with tiny settings (subprocesses, outputs in tmp dirs).

train.py -> checkpoint -> sample.py / likelihood.py / evaluate.py on it; the oracle paths; the
error messages for a missing or mismatched checkpoint; a W&B-offline multirun read back.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Every test here starts Python + torch + Hydra in a subprocess (seconds each): all are slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["threads=1", "logger=none"]
TINY_TRAIN = [
    "model=mlp", "train.total_steps=20", "train.batch_size=32", "train.eval_every=10", "train.ckpt_every=10",
    "train.keep_every=10", "train.warmup_steps=5",
    "model.net.hidden=32", "model.net.depth=1", "eval.num_samples=9", "eval.bpd_samples=4", "eval.strip_frames=4",
    "sampler.options.steps=10", "eval.likelihood.rtol=1e-3", "eval.likelihood.atol=1e-3",
]


def _env(tmp: Path, **extra: str) -> dict:
    env = dict(os.environ, WANDB_SILENT="true", HYDRA_FULL_ERROR="1", SCORE_SDE_CACHE=str(tmp / "cache"))
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[key] = str(tmp / "wandb_home")
    env.pop("WANDB_MODE", None)
    env.update(extra)
    return env


def run_app(script: str, args: list[str], tmp: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT, env=_env(tmp, **env),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics_of(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    assert not list(folder.glob(".metrics.json.*"))  # the atomic writer left no temp file
    return m


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    run_app("train.py", [*FAST, *TINY_TRAIN, f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


def test_train_writes_checkpoint_metrics_and_pictures(trained):
    m = metrics_of(trained)
    assert m["task"] == "train" and m["sde"] == "vp" and m["model"] == "mlp" and m["dims"] == 64
    assert m["levels"] == 17 and m["bpd_points"] == 4
    assert math.isfinite(m["test_bpd"]) and 0 < m["test_bpd"] < 30
    assert math.isfinite(m["val_loss"]) and m["sample_nfe"] >= 10
    with Image.open(trained / "samples.png") as im:  # 9 digits: 3x3 tiles of 8 px + 1 px padding, x8
        assert im.size == ((3 * 9 + 1) * 8, (3 * 9 + 1) * 8)
        assert len(np.unique(np.asarray(im))) > 2  # not a blank picture
    with Image.open(trained / "strip.png") as im:  # 8 samples x (x_t, x0_hat) rows, 4 frames + the result,
        assert im.size == ((5 * 9 + 1) * 8, (16 * 9 + 1) * 8 + 18)  # under an 18-px band of column labels (t)
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["model_config"]["sde"]["_target_"] == "sde.sdes.VPSDE"
    assert ckpt["model_config"]["model"]["parametrization"] == "eps"  # the main job's defaults: eps-MSE on VP
    assert ckpt["model_config"]["model"]["net"]["hidden"] == 32 and ckpt["ema"] is not None
    assert (trained / "checkpoints" / "step_00000010.pt").is_file()
    # One format: checkpoint.pt is the Trainer's final state (plus the app's metrics), like latest.pt.
    latest = torch.load(trained / "checkpoints" / "latest.pt", weights_only=True)
    assert set(ckpt) == set(latest) | {"metrics"} and ckpt["format"] == latest["format"] == 1
    assert all(torch.equal(ckpt["ema"][k], latest["ema"][k]) for k in latest["ema"])
    assert ckpt["config"]["total_steps"] == 20 and ckpt["metrics"]["steps"] == 20


def _library_bpd(checkpoint: Path, n: int, seed: int = 0, **options) -> float:
    """Test bits/dim computed here, in-process, from the saved weights: the independent reference."""
    from sde.checkpoint import load_score_model
    from sde.data import load_dataset

    loaded = load_score_model(checkpoint)
    test = load_dataset("digits", split="test")
    res = test.bits_per_dim(loaded.model, loaded.sde, test.data[:n], generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float32, **options)
    return res.mean


def test_train_test_bpd_likelihood_app_and_library_agree(trained, tmp_path):
    """One bits/dim: the main job's test_bpd, likelihood.py's bpd and the library on the saved checkpoint."""
    out = tmp_path / "lik_same"
    args = [*FAST, f"score.path={trained / 'checkpoint.pt'}", "num_points=4", "batch_size=64", "likelihood.rtol=1e-3",
            "likelihood.atol=1e-3", f"hydra.run.dir={out}"]
    run_app("likelihood.py", args, tmp_path)
    train_bpd, app_bpd = metrics_of(trained)["test_bpd"], metrics_of(out)["bpd"]
    library = _library_bpd(trained / "checkpoint.pt", 4, batch_size=64, rtol=1e-3, atol=1e-3)
    assert abs(train_bpd - app_bpd) < 1e-6 and abs(library - train_bpd) < 1e-6
    other_seed = _library_bpd(trained / "checkpoint.pt", 4, seed=1, batch_size=64, rtol=1e-3, atol=1e-3)
    assert abs(other_seed - train_bpd) > 1e-4  # the comparison can fail: another dequantization draw differs


def test_sample_from_checkpoint(trained, tmp_path):
    out = tmp_path / "sample"
    args = [*FAST, f"score.path={trained / 'checkpoint.pt'}", "sampler=ddim", "sampler.options.steps=5",
            "num_samples=6", "strip_frames=3", f"hydra.run.dir={out}"]
    proc = run_app("sample.py", args, tmp_path)
    m = metrics_of(out)
    assert m["sampler"] == "ddim" and m["num_samples"] == 6 and m["sde"] == "vp" and m["nfe"] >= 5
    x = torch.load(out / "samples.pt", weights_only=True)
    assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
    assert (out / "samples.png").stat().st_size > 100 and (out / "strip.png").is_file()
    assert "| nfe" in proc.stdout  # the summary table


def test_likelihood_from_checkpoint_matches_its_own_logp(trained, tmp_path):
    out = tmp_path / "lik"
    args = [*FAST, f"score.path={trained / 'checkpoint.pt'}", "num_points=5", "likelihood.rtol=1e-3",
            "likelihood.atol=1e-3", f"hydra.run.dir={out}"]
    run_app("likelihood.py", args, tmp_path)
    m = metrics_of(out)
    logp = torch.load(out / "logp.pt", weights_only=True).double()
    assert logp.shape == (5,) and m["points"] == 5 and m["levels"] == 17
    # The dataset's convention: bins of width 2/(L-1) around the grid 2k/(L-1) - 1, so
    # bpd = -(log p + D ln(2/(L-1))) / (D ln 2), the same as test_bpd of train.py.
    D, L = 64, 17
    bpd = -(logp + D * math.log(2 / (L - 1))) / (D * math.log(2))
    assert m["bpd"] == pytest.approx(bpd.mean().item(), rel=1e-6)
    assert m["nll_nats"] == pytest.approx(-logp.mean().item(), rel=1e-6)
    library = _library_bpd(trained / "checkpoint.pt", 5, batch_size=128, rtol=1e-3, atol=1e-3)
    assert m["bpd"] == pytest.approx(library, abs=1e-6)  # recomputed here from the weights
    assert (out / "bpd_hist.png").is_file() and (out / "logp_hist.png").is_file()


@pytest.mark.parametrize("app,args,key", [
    ("sample.py", ["sampler=ddim", "sampler.options.steps=5", "num_samples=6"], "nfe"),
    ("likelihood.py", ["num_points=3", "likelihood.rtol=1e-3", "likelihood.atol=1e-3"], "bpd"),
    ("evaluate.py", ["sampler=ddim", "sampler.options.steps=5", "num_samples=20"], "fd_digits"),
    ("controllable.py", ["control=inpaint", "num_images=2", "sampler.options.steps=5"], "consistency_max_error"),
])
def test_every_app_loads_a_trainer_checkpoint(trained, tmp_path, app, args, key):
    """checkpoints/latest.pt (the Trainer's file) works as score.path like checkpoint.pt (one format)."""
    out = tmp_path / "out"
    run_app(app, [*FAST, f"score.path={trained / 'checkpoints' / 'step_00000010.pt'}", *args, f"hydra.run.dir={out}"],
            tmp_path)
    assert math.isfinite(metrics_of(out)[key])


def test_a_checkpoint_naming_foreign_code_is_refused(trained, tmp_path):
    """A checkpoint whose config names pathlib.Path.write_text: the app refuses it and nothing is written."""
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    ckpt["model_config"]["sde"] = {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "x"}
    torch.save(ckpt, tmp_path / "evil.pt")
    for app in ("sample.py", "likelihood.py"):
        proc = run_app(app, [*FAST, f"score.path={tmp_path / 'evil.pt'}", f"hydra.run.dir={tmp_path / app}"], tmp_path,
                       check=False)
        assert proc.returncode != 0 and "sde._target_='pathlib.Path.write_text'" in proc.stderr
    assert not marker.exists()


def test_missing_checkpoint_says_what_to_run(tmp_path):
    proc = run_app("sample.py", [*FAST, f"score.path={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path}"],
                   tmp_path, check=False)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "python experiments/train.py" in proc.stderr


def test_mismatched_checkpoint_lists_differing_keys(trained, tmp_path):
    args = [*FAST, f"score.path={trained / 'checkpoint.pt'}", "sde=ve", "model.net.hidden=64",
            f"hydra.run.dir={tmp_path}"]
    proc = run_app("likelihood.py", args, tmp_path, check=False)
    assert proc.returncode != 0
    assert "sde._target_: checkpoint='sde.sdes.VPSDE' requested='sde.sdes.VESDE'" in proc.stderr
    assert "model.net.hidden: checkpoint=32 requested=64" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_oracle_sampling_recovers_the_mixture(tmp_path):
    out = tmp_path / "oracle"
    args = [*FAST, "data=gmm", "score=oracle", "sde=subvp", "sampler=dpm", "num_samples=2000", f"hydra.run.dir={out}"]
    run_app("sample.py", args, tmp_path)
    m = metrics_of(out)
    assert m["score"] == "oracle" and m["nonfinite"] == 0 and m["nfe"] >= 20
    assert m["weights_l1"] < 0.1  # exact samples give about 0.06 at n = 2000
    assert abs(m["mean_logp"] - m["oracle_mean_logp"]) < 0.3
    assert (out / "samples_2d.png").stat().st_size > 1000


def test_oracle_likelihood_matches_the_exact_density(tmp_path):
    out = tmp_path / "oracle_lik"
    args = [*FAST, "data=gmm", "score=oracle", "sde=vp", "num_points=16", "likelihood.divergence=exact",
            "likelihood.rtol=1e-6", "likelihood.atol=1e-6", "dtype=float64", f"hydra.run.dir={out}"]
    run_app("likelihood.py", args, tmp_path)
    m = metrics_of(out)
    assert "bpd" not in m  # continuous data: nats, no bits/dim
    assert m["mean_abs_logp_error"] < 1e-3
    assert m["nll_nats"] == pytest.approx(m["exact_nll_nats"], abs=1e-3)


def test_evaluate_from_checkpoint(trained, tmp_path):
    out = tmp_path / "eval"
    args = [*FAST, f"score.path={trained / 'checkpoint.pt'}", "sampler=ddim", "sampler.options.steps=5",
            "num_samples=40", f"hydra.run.dir={out}"]
    run_app("evaluate.py", args, tmp_path)
    m = metrics_of(out)
    for key in ("fd_digits", "kid", "inception_score", "mmd", "energy_distance", "sliced_w2"):
        assert math.isfinite(m[key]) and math.isfinite(m[f"floor_{key}"])
    assert 1 <= m["inception_score"] <= 10
    assert m["fd_digits"] > m["floor_fd_digits"]  # 20 training steps are far from the data


def _wandb_records(path: Path) -> list:
    """Protobuf records of an offline run's .wandb file (a LevelDB-style log after a 7-byte W&B header).

    wandb >= 0.19 keeps the config and summary of offline runs only in this file (no config.yaml).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, records, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a record header never straddles a block: the tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def read_offline_run(run_dir: Path) -> tuple[str, str, dict, dict]:
    """(group, job_type, config, summary) of one offline run folder, from its .wandb file."""
    (log,) = run_dir.glob("*.wandb")
    group = job_type = ""
    config, summary = {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group, job_type = record.run.run_group, record.run.job_type
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    return group, job_type, config, summary


def test_wandb_offline_multirun_gives_one_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "threads=1", "logger=wandb", "data=gmm", "score=oracle", "sde=vp,ve", "sampler=ddim,dpm",
            "num_samples=300", "reference_samples=300", f"hydra.sweep.dir={sweep}"]
    run_app("sample.py", args, tmp_path, WANDB_MODE="offline")
    table = (sweep / "results.csv").read_text().splitlines()
    assert len(table) == 5 and (sweep / "results.md").is_file()
    seen = set()
    for job in range(4):
        m = metrics_of(sweep / str(job))
        runs = sorted((sweep / str(job) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"job {job} has runs {runs}"  # one run per job, never shared
        group, job_type, config, summary = read_offline_run(runs[0])
        # the group names the sweep (config, name, overrides), the run its own values of the swept keys
        assert group.startswith("sample:gmm threads=1 logger=wandb data=gmm score=oracle") and job_type == "sample"
        assert group.endswith("sde=vp,ve sampler=ddim,dpm") and "hydra.sweep.dir" not in group
        (run_name,) = [r.run.display_name for r in _wandb_records(next(runs[0].glob("*.wandb")))
                       if r.WhichOneof("record_type") == "run"]
        assert run_name == f"sde={m['sde']} sampler={ {'ddim': 'ddim', 'dpm_solver': 'dpm'}[m['sampler']] }"
        assert config["sde"]["_target_"] == {"vp": "sde.sdes.VPSDE", "ve": "sde.sdes.VESDE"}[m["sde"]]  # this job's
        assert config["sampler"]["name"] == m["sampler"]  # one spelling: the sde.samplers.SAMPLERS key
        assert config["task"] == "sample" and config["score"]["kind"] == "oracle" and config["num_samples"] == 300
        assert summary["nfe"] == m["nfe"] and summary["weights_l1"] == pytest.approx(m["weights_l1"])
        seen.add((m["sde"], m["sampler"]))
    assert seen == set(itertools.product(["vp", "ve"], ["ddim", "dpm_solver"]))


# Fault injection for the resume test (test-side only): train.py runs under a writer whose second write of
# checkpoints/latest.pt (step 20 with ckpt_every=10) touches a marker and hangs until the test kills it.
KILLABLE_TRAIN = '''
import os, runpy, sys, time
from pathlib import Path
import sde._io

marker, real, seen = Path(os.environ["PAUSE_MARKER"]), sde._io._write_payload, []

def pausing(f, data, path):
    if path.name == "latest.pt":
        seen.append(path)
        if len(seen) == 2:
            marker.touch()
            time.sleep(3600)
    real(f, data, path)

sde._io._write_payload = pausing
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
'''


def test_train_resume_last_continues_a_killed_run_exactly(tmp_path):
    import signal
    import time

    runs = tmp_path / "runs"
    config = [*FAST, *TINY_TRAIN, "train.total_steps=30", "eval.bpd_samples=0", "eval.strip_frames=0"]
    run_app("train.py", [*config, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
    wrapper, marker = tmp_path / "killable.py", tmp_path / "paused"
    wrapper.write_text(KILLABLE_TRAIN)
    proc = subprocess.Popen([sys.executable, str(wrapper), str(ROOT / "experiments" / "train.py"), *config,
                             f"output_root={runs}"], cwd=ROOT, env=_env(tmp_path, PAUSE_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "train.py never reached the step-20 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (killed,) = (runs / "train" / "digits").iterdir()
    assert not (killed / "metrics.json").exists() and torch.load(killed / "checkpoints" / "latest.pt",
                                                                  weights_only=True)["step"] == 10
    # A different config is refused, naming the key; nothing changes in the run.
    proc = run_app("train.py", [*config, f"output_root={runs}", "train.resume=last", "train.lr=0.5"], tmp_path,
                   check=False)
    assert proc.returncode != 0 and "train.lr: run=0.004 requested=0.5" in proc.stderr
    run_app("train.py", [*config, f"output_root={runs}", "train.resume=last"], tmp_path)
    assert [p.name for p in (runs / "train" / "digits").iterdir()] == [killed.name]  # no new folder
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert metrics_of(killed)["val_loss"] == metrics_of(tmp_path / "straight")["val_loss"]  # (train_loss is the
    # mean over the last log window, which a resumed run starts at its resume step)
    proc = run_app("train.py", [*config, f"output_root={runs}", f"train.resume={killed}"], tmp_path, check=False)
    assert proc.returncode != 0 and "already finished" in proc.stderr

"""score=diffusers end to end: sample.py, likelihood.py, evaluate.py and controllable.py on tiny UNet2DModels
(random weights, saved with save_pretrained in tmp_path), each writing its metrics and files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow  # each test is one app subprocess (a few seconds on an idle machine)

ROOT = Path(__file__).resolve().parents[1]
NULL = 10  # the conditional model's label-dropout id: 10 digit classes + the null class


def tiny_unet(channels: int = 1, **kw) -> diffusers.UNet2DModel:
    """8x8 like scikit-learn's digits (data=digits, the apps' default), one channel unless told."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **kw,
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, unet in (("uncond", tiny_unet()), ("cond", tiny_unet(num_class_embeds=NULL + 1)),
                       ("rgb", tiny_unet(channels=3))):
        unet.save_pretrained(root / name / "unet")
        diffusers.DDIMScheduler(clip_sample=False).save_pretrained(root / name / "scheduler")
        out[name] = root / name
    return out


def run_app(app: str, run: Path, path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "experiments" / f"{app}.py"), "score=diffusers", f"score.path={path}",
           "logger=none", "threads=1", f"hydra.run.dir={run}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def metrics_of(out: subprocess.CompletedProcess, run: Path) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def test_sample_app(models, tmp_path):
    path = models["rgb"]  # data=digits is only the default name: the samples take the model's (3, 8, 8)
    m = metrics_of(run_app("sample", tmp_path, path, "sampler=ddim", "sampler.options.steps=3", "num_samples=4",
                           "strip_frames=0"), tmp_path)
    x = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert x.shape == (4, 3, 8, 8) and torch.isfinite(x).all()
    assert m["sde"] == "DiscreteVPSDE"


def test_likelihood_app(models, tmp_path):
    m = metrics_of(run_app("likelihood", tmp_path, models["uncond"], "num_points=4", "batch_size=4",
                           "likelihood.rtol=1e-3", "likelihood.atol=1e-3"), tmp_path)
    assert m["score"] == "diffusers" and m["sde"] == "DiscreteVPSDE" and m["points"] == 4 and m["dims"] == 64
    assert math.isfinite(m["bpd"]) and m["bpd"] > 0 and m["levels"] == 17 and m["score_calls"] > 0
    logp = torch.load(tmp_path / "logp.pt", weights_only=True)
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    assert (tmp_path / "bpd_hist.png").is_file() and (tmp_path / "logp_hist.png").is_file()


def test_evaluate_app(models, tmp_path):
    m = metrics_of(run_app("evaluate", tmp_path, models["uncond"], "sampler=ddim", "sampler.options.steps=3",
                           "num_samples=8"), tmp_path)
    assert m["sde"] == "DiscreteVPSDE" and m["nfe"] == 4 and m["num_samples"] == 8  # 3 steps + the denoise
    for key in ("fd_digits", "kid", "mmd", "energy_distance", "floor_fd_digits"):
        assert math.isfinite(m[key]), key
    assert (tmp_path / "samples.png").is_file()


def test_controllable_inpaint_app(models, tmp_path):
    m = metrics_of(run_app("controllable", tmp_path, models["uncond"], "control=inpaint", "sampler=ddim",
                           "sampler.options.steps=3", "num_images=4"), tmp_path)
    assert m["control"] == "inpaint" and m["method"] == "replacement" and m["nfe"] == 4
    r = torch.load(tmp_path / "results.pt", weights_only=True)
    assert r["x"].shape == (4, 1, 8, 8) and torch.isfinite(r["x"]).all()
    known = r["mask"].bool()
    assert torch.equal(r["x"][known], r["truth"][known]) and m["consistency_max_error"] == 0.0  # replacement
    assert (tmp_path / "inpaint.png").is_file()


def test_controllable_cfg_app(models, tmp_path):
    m = metrics_of(run_app("controllable", tmp_path, models["cond"], f"score.null_class={NULL}", "control=cfg",
                           "control.scale=3", "sampler=ddim", "sampler.options.steps=3", "num_images=4"), tmp_path)
    assert m["control"] == "cfg" and m["scale"] == 3.0 and m["nfe"] == 4 and "class_accuracy" in m
    r = torch.load(tmp_path / "results.pt", weights_only=True)
    assert r["labels"].tolist() == [0, 1, 2, 3] and torch.isfinite(r["x"]).all()
    assert (tmp_path / "cfg.png").is_file()


def test_app_errors_name_the_fix(models, tmp_path):
    out = run_app("controllable", tmp_path / "a", models["cond"], "control=cfg", "num_images=2")
    assert out.returncode != 0 and "score.null_class=" in out.stderr, out.stderr[-2000:]
    out = run_app("likelihood", tmp_path / "b", models["rgb"], "num_points=2")  # digits are (1, 8, 8)
    assert out.returncode != 0 and "takes (3, 8, 8) (its in_channels and sample_size)" in out.stderr, out.stderr[-2000:]

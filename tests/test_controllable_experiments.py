"""End-to-end runs of experiments/controllable.py and experiments/train_classifier.py with tiny settings.

A conditional model is trained for a few steps by train.py (labels + label dropout), then one Hydra
multirun drives controllable.py through cfg, inpaint, super_resolve and interpolate on its checkpoint;
the measurements are checked exactly (known pixels, block means). Bad inputs are checked in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_experiments import FAST, TINY_TRAIN, metrics_of, run_app
from torch.nn import functional as F

pytestmark = pytest.mark.slow  # subprocesses with torch + Hydra: seconds each

ROOT = Path(__file__).resolve().parents[1]
TINY_CONTROL = [*FAST, "num_images=4", "sampler.options.steps=8"]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cond")
    run_app("train.py", [*FAST, *TINY_TRAIN, "model.net.num_classes=10", "loss.label_dropout=0.2",
                         f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def controls(conditional, tmp_path_factory) -> Path:
    """cfg, inpaint, super_resolve, interpolate on the conditional checkpoint, in one multirun process."""
    tmp = tmp_path_factory.mktemp("controls")
    run_app("controllable.py", ["-m", *TINY_CONTROL, f"score.path={conditional / 'checkpoint.pt'}",
                                "control=cfg,inpaint,super_resolve,interpolate", f"hydra.sweep.dir={tmp / 'sweep'}"],
            tmp)
    return tmp / "sweep"


def test_conditional_training_saves_a_class_embedding(conditional):
    ckpt = torch.load(conditional / "checkpoint.pt", weights_only=True)
    assert ckpt["model_config"]["model"]["net"]["num_classes"] == 10
    embed = [k for k in ckpt["model"] if "class_embed" in k]
    assert embed and any(ckpt["model"][k].shape[0] == 11 for k in embed)  # 10 classes + the null class
    m = metrics_of(conditional)
    assert np.isfinite(m["test_bpd"]) and np.isfinite(m["val_loss"])


def test_cfg_samples_the_requested_classes(controls):
    out = controls / "0"
    m = metrics_of(out)
    assert m["control"] == "cfg" and m["scale"] == 2.0 and m["nfe"] >= 8
    assert 0.0 <= m["class_accuracy"] <= 1.0
    res = torch.load(out / "results.pt", weights_only=True)
    assert res["x"].shape == (4, 1, 8, 8) and res["labels"].tolist() == [0, 1, 2, 3]
    with Image.open(out / "cfg.png") as im:
        assert len(np.unique(np.asarray(im))) > 2


def test_inpainting_keeps_the_known_pixels_exactly(controls):
    out = controls / "1"
    m = metrics_of(out)
    res = torch.load(out / "results.pt", weights_only=True)
    mask, truth, x = res["mask"], res["truth"], res["x"]
    assert m["control"] == "inpaint" and m["known_fraction"] == 0.5 and m["consistency_max_error"] == 0.0
    assert mask[..., :4].eq(1).all() and mask[..., 4:].eq(0).all()  # left_half preset: left half known
    assert torch.equal(x * mask, truth * mask)  # known pixels exactly the input
    assert not torch.equal(x, truth)  # the unknown half was sampled, not copied
    with Image.open(out / "inpaint.png") as im:  # rows: truth, observed, mask, result; 4 columns of 9 px, x8
        assert im.size == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8)


def test_super_resolution_downsamples_back(controls):
    out = controls / "2"
    m = metrics_of(out)
    res = torch.load(out / "results.pt", weights_only=True)
    assert m["control"] == "super_resolve" and m["factor"] == 2
    assert torch.allclose(F.avg_pool2d(res["x"], 2), res["observed"], atol=1e-5)
    assert torch.allclose(res["observed"], F.avg_pool2d(res["truth"], 2))
    assert m["downsample_max_error"] < 1e-5


def test_interpolation_rows_start_and_end_near_the_pair(controls):
    out = controls / "3"
    m = metrics_of(out)
    res = torch.load(out / "results.pt", weights_only=True)
    path = res["x"]
    assert m["control"] == "interpolate" and m["pairs"] == 2 and path.shape == (8, 2, 1, 8, 8)
    err = max((path[0] - res["x0"]).abs().max().item(), (path[-1] - res["x1"]).abs().max().item())
    assert m["endpoint_max_error"] == pytest.approx(err)
    assert torch.isfinite(path).all()
    assert (controls / "results.md").is_file()  # the sweep's results table


def test_classifier_training_and_guidance(conditional, tmp_path):
    clf_dir, out = tmp_path / "clf", tmp_path / "cg"
    run_app("train_classifier.py", [*FAST, "sde=vp", "train.steps=200", "classifier.hidden=64", "eval.noise_draws=1",
                                    f"hydra.run.dir={clf_dir}"], tmp_path)
    m = metrics_of(clf_dir)
    assert m["acc_t0.01"] > 0.5 and m["acc_t0.01"] > m["acc_t1"]  # learns; pure noise is near chance
    ckpt = torch.load(clf_dir / "classifier.pt", weights_only=True)
    assert set(ckpt) == {"classifier", "metrics", "config"} and ckpt["config"]["classifier"]["hidden"] == 64
    run_app("controllable.py", [*TINY_CONTROL, f"score.path={conditional / 'checkpoint.pt'}",
                                "control=classifier_guidance", "control.classes=[7]",
                                f"classifier_path={clf_dir / 'classifier.pt'}", f"hydra.run.dir={out}"], tmp_path)
    m = metrics_of(out)
    assert m["control"] == "classifier_guidance" and 0.0 <= m["class_accuracy"] <= 1.0
    assert torch.load(out / "results.pt", weights_only=True)["labels"].tolist() == [7] * 4
    proc = run_app("controllable.py", [*FAST, f"score.path={conditional / 'checkpoint.pt'}", "sde=ve",
                                       "control=classifier_guidance", f"classifier_path={clf_dir / 'classifier.pt'}",
                                       f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, check=False)
    assert proc.returncode != 0 and "sde._target_" in proc.stderr  # a VE request against a VP checkpoint


# -- bad inputs, in-process ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(ROOT / "experiments"))
    import controllable

    yield controllable
    sys.path.remove(str(ROOT / "experiments"))


def _job(app, num_classes: int = 0, images=None, data: str = "digits"):
    """A controllable.Job around a small untrained model (no checkpoint file needed for argument checks)."""
    from _common.models import ScoreSource

    from sde.checkpoint import Flatten
    from sde.models import ScoreModel
    from sde.nets import MLP
    from sde.sdes import VPSDE

    model = ScoreModel(Flatten(MLP(dim=64, hidden=8, depth=1, num_classes=num_classes)), VPSDE())
    source = ScoreSource(kind="checkpoint", score_fn=model, sde=model.sde, sde_config={},
                         data=OmegaConf.create({"name": data, "shape": [1, 8, 8], "image": True}), model=model,
                         checkpoint_path=Path("x.pt"))
    return app.Job(source, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0), images)


def test_guidance_needs_a_class_embedding(app):
    cfg = OmegaConf.create({"control": {"name": "cfg", "classes": None, "scale": 2.0}, "num_images": 2})
    with pytest.raises(ValueError, match="num_classes=0"):
        app.run_cfg(cfg, _job(app, 0))


def test_class_ids_out_of_range(app):
    for classes in ([3, 10], [-1], 2.5):
        cfg = OmegaConf.create({"control": {"classes": classes}, "num_images": 2})
        with pytest.raises(ValueError, match=r"control.classes=.*\[0, 9\]"):
            app._class_ids(cfg, 10, torch.device("cpu"))


def test_mask_presets_and_bad_mask_files(app, tmp_path):
    control = OmegaConf.create({"mask": "centre_box", "box_fraction": 0.5, "keep_fraction": 0.3})
    g = torch.Generator().manual_seed(0)
    mask = app.make_mask(control, (2, 1, 8, 8), g, torch.device("cpu"), torch.float64)
    assert mask.shape == (2, 1, 8, 8) and mask.sum().item() == 2 * (64 - 16) and mask[..., 2:6, 2:6].eq(0).all()
    np.save(tmp_path / "ok.npy", np.ones((8, 8)))
    control.mask = str(tmp_path / "ok.npy")
    assert app.make_mask(control, (2, 1, 8, 8), g, torch.device("cpu"), torch.float64).shape == (2, 1, 8, 8)
    np.save(tmp_path / "wrong.npy", np.ones((7, 8)))
    control.mask = str(tmp_path / "wrong.npy")
    with pytest.raises(ValueError, match=r"has shape \(7, 8\)"):
        app.make_mask(control, (2, 1, 8, 8), g, torch.device("cpu"), torch.float64)
    np.save(tmp_path / "half.npy", np.full((8, 8), 0.5))
    control.mask = str(tmp_path / "half.npy")
    with pytest.raises(ValueError, match="only 0 and 1"):
        app.make_mask(control, (2, 1, 8, 8), g, torch.device("cpu"), torch.float64)
    control.mask = "triangle"
    with pytest.raises(ValueError, match="neither a preset"):
        app.make_mask(control, (2, 1, 8, 8), g, torch.device("cpu"), torch.float64)


def test_colorize_needs_three_channels_and_sr_a_dividing_factor(app):
    cfg = OmegaConf.create({"control": {"name": "colorize", "factor": 3}})
    job = _job(app, images=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="3-channel"):
        app.run_colorize(cfg, job)
    with pytest.raises(ValueError, match="control.factor=3"):
        app.run_super_resolve(cfg, job)


def test_summary_written_as_json(controls):
    rows = [json.loads((controls / str(i) / "metrics.json").read_text())["control"] for i in range(4)]
    assert rows == ["cfg", "inpaint", "super_resolve", "interpolate"]


def test_train_loss_drops_labels_to_the_null_class_and_dequantizes(monkeypatch):
    sys.path.insert(0, str(ROOT / "experiments"))
    import train

    import sde.losses
    from sde.data import ArrayDataset
    from sde.sdes import VPSDE

    seen = {}
    real = sde.losses.dequantize

    def recording_dequantize(x, levels, *, generator=None):
        seen["levels"] = levels
        return real(x, levels, generator=generator)

    monkeypatch.setattr(sde.losses, "dequantize", recording_dequantize)

    def model(x, t, y=None):  # records what the loss hands the network; score 0
        seen["y"], seen["x"] = y, x
        return torch.zeros_like(x)

    grid = torch.linspace(-1, 1, 17, dtype=torch.float64)[torch.randint(17, (4000, 2))]
    ds = ArrayDataset(grid, torch.zeros(4000, dtype=torch.long), levels=17, num_classes=3)
    cfg = OmegaConf.create({"loss": {"weighting": "sigma2", "eps": 1e-5, "label_dropout": 0.25}})
    loss = train._loss_function(cfg, ds, num_classes=3)
    x0 = ds.data
    torch.manual_seed(0)
    loss(model, VPSDE(), x0, generator=torch.Generator().manual_seed(1), y=ds.labels)
    assert seen["levels"] == 17  # trained on dequantized data, the density bits/dim scores
    assert set(seen["y"].tolist()) == {0, 3} and abs(seen["y"].eq(3).double().mean().item() - 0.25) < 0.03
    cfg.loss.label_dropout = 1.5
    with pytest.raises(ValueError, match="loss.label_dropout=1.5"):
        train._label_dropout(cfg)
    bad = OmegaConf.create({"data": {"name": "moons"}})
    with pytest.raises(ValueError, match="model.net.num_classes=3"):
        train._labels(bad, ArrayDataset(grid), 3, "cpu")


def test_colorize_end_to_end_on_an_rgb_image_folder(tmp_path):
    """data=image_folder with RGB files the test writes: train.py, then controllable.py control=colorize."""
    g = np.random.default_rng(0)
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(12):  # smooth colour gradients, so the colour is not a function of the grey level alone
        ramp = np.linspace(0, 255, 8)[None, :] * np.ones((8, 1))
        rgb = np.stack([ramp, ramp.T, np.full((8, 8), 40.0 * (i % 6))], -1) + g.normal(0, 8, (8, 8, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").save(folder / f"{i:02d}.png")
    data = ["data=image_folder", f"data.loader.root={folder}", "data.resolution=8", "data.dim=192"]
    run_app("train.py", [*FAST, *TINY_TRAIN, *data, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    out = tmp_path / "color"
    run_app("controllable.py", [*TINY_CONTROL, *data, f"score.path={tmp_path / 'run' / 'checkpoint.pt'}",
                                "control=colorize", f"hydra.run.dir={out}"], tmp_path)
    m = metrics_of(out)
    assert m["control"] == "colorize" and m["nfe"] > 0
    # The grey image (channel mean) is reproduced up to float32 rounding. The colours themselves are
    # not judged: a 20-step model's samples are far out of range (its score at t = 1 is not yet -x).
    assert m["consistency_max_error"] < 1e-3
    assert np.isfinite(m["mse_to_truth"]) and m["mse_to_truth"] > 0
    assert list(out.glob("*.png"))


def test_train_loss_time_sampling_reaches_dsm_loss():
    """loss.time_sampling=low_discrepancy trains with dsm_loss(time_sampling="low_discrepancy"): the app's loss
    equals the library call with the same generator, and differs from the iid draw."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import train

    from sde.losses import dsm_loss
    from sde.sdes import VPSDE

    def model(x, t):
        return 0.3 * x * t[:, None]

    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = {}
    for mode in ("iid", "low_discrepancy"):
        cfg = OmegaConf.create({"loss": {"weighting": "sigma2", "eps": 1e-5, "time_sampling": mode}})
        app = train._loss_function(cfg, object(), num_classes=0)(model, VPSDE(), x0,
                                                                 generator=torch.Generator().manual_seed(3))
        lib = dsm_loss(model, VPSDE(), x0, weighting="sigma2", eps=1e-5, time_sampling=mode,
                       generator=torch.Generator().manual_seed(3))
        assert app.item() == lib.item()
        values[mode] = app.item()
    assert values["iid"] != values["low_discrepancy"]

"""Every config group composes, and the objects it names build and fit together.

Composition uses Hydra's compose API on conf/ (no subprocess); objects are built through the library's
registries (sde.checkpoint), exactly as the apps and the checkpoint loader build them, and the tests
check the built objects' types and values, so a renamed class, argument or default fails here.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "experiments"))

from _common.models import build_model, build_sde, config_diff, overridden_groups  # noqa: E402
from _common.plots import image_grid  # noqa: E402
from _common.results import aggregate, write_row  # noqa: E402

SDES = sorted(p.stem for p in (CONF / "sde").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
ON_DISK = {"image_folder", "cifar10", "mnist"}  # need files the test machine does not have


def _compose(name: str, overrides: list[str], hydra_node: bool = True):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra_node)


def test_issue_minimum_groups_exist():
    assert {"vp", "subvp", "ve"} <= set(SDES)
    assert {"em", "pc", "ode", "ddim", "heun", "dpm"} <= set(SAMPLERS)
    assert {"digits", "moons", "swiss_roll", "checkerboard", "gmm", "image_folder", "cifar10", "mnist"} <= set(DATA)
    assert {"mlp", "unet"} <= set(MODELS)
    for group, options in {"logger": {"wandb", "none"}, "score": {"oracle", "checkpoint"}}.items():
        assert options <= {p.stem for p in (CONF / group).glob("*.yaml")}


@pytest.mark.parametrize("primary", ["train", "sample", "likelihood", "evaluate"])
def test_primary_configs_compose_with_defaults(primary):
    cfg = _compose(primary, [] if primary == "train" else ["score.path=ckpt.pt"])
    assert cfg.task == primary
    assert cfg.hydra.runtime.choices["sde"] == "vp"
    assert cfg.hydra.runtime.choices["logger"] == "wandb" and cfg.logger.mode == "offline"
    assert "results_table" in cfg.hydra.callbacks
    # Every interpolation of the job config resolves (what train.py writes into checkpoints and W&B).
    job_cfg = _compose(primary, [] if primary == "train" else ["score.path=x"], hydra_node=False)
    plain = OmegaConf.to_container(job_cfg, resolve=True)
    assert plain["name"] == "digits"
    from sde.nets import MLP, UNet
    from sde.sdes import VPSDE

    sde = build_sde(job_cfg)
    assert type(sde) is VPSDE and (sde.beta_min, sde.beta_max) == (0.1, 20.0)
    if primary == "train":  # the main job: eps-MSE, cosine density shifted by 1 (docs/recipes.md)
        assert (job_cfg.loss.weighting, job_cfg.loss.shift) == ("eps", 1.0)
    model = build_model(job_cfg, sde)
    if primary == "train":  # the main job's default: a U-Net (32 base channels, x1 and x2) on the 1x8x8 digits
        assert type(model.net) is UNet and model.parametrization == "eps" and model.sde is sde
        assert plain["model"]["net"]["in_channels"] == 1 and plain["model"]["net"]["image_size"] == 8
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].in_channels == 1 and convs[0].out_channels == 32
        widths = {m.out_channels for m in convs}
        assert {32, 64} <= widths and 128 not in widths  # channel_mults [1, 2]
    else:  # the other apps take the model from the checkpoint; their default only fills the tree
        assert type(model.net.net) is MLP and plain["model"]["net"]["dim"] == 64  # flattened 1x8x8 images


@pytest.mark.parametrize("sde_name", SDES)
def test_sde_configs_build(sde_name):
    from sde.checkpoint import SDES
    from sde.sdes import SDE

    cfg = _compose("sample", [f"sde={sde_name}", "score.path=x"])
    sde = build_sde(cfg)
    assert isinstance(sde, SDE) and type(sde) is SDES[sde_name]  # the registry name is the file name
    values = {k: v for k, v in cfg.sde.items() if k != "_target_"}
    assert values, "the config sets no argument"
    for key, value in values.items():  # every YAML value reached the object
        assert hasattr(sde, key), f"sde={sde_name}: {key} does not reach the object"
        assert getattr(sde, key) == pytest.approx(value) if isinstance(value, float) else getattr(sde, key) == value
    changed = _compose("sample", [f"sde={sde_name}", "score.path=x", f"sde.{next(iter(values))}=0.5"])
    assert getattr(build_sde(changed), next(iter(values))) == 0.5  # an override reaches it too


@pytest.mark.parametrize("sde_name,sampler_name,data_name", list(itertools.product(SDES, SAMPLERS, DATA)))
def test_sde_sampler_data_combinations_compose(sde_name, sampler_name, data_name):
    overrides = [f"sde={sde_name}", f"sampler={sampler_name}", f"data={data_name}", "score.path=x"]
    cfg = _compose("sample", overrides)
    choices = cfg.hydra.runtime.choices
    assert (choices["sde"], choices["sampler"], choices["data"]) == (sde_name, sampler_name, data_name)
    assert cfg.data.dim == int(torch.tensor(list(cfg.data.shape)).prod()) or data_name == "image_folder"
    assert cfg.sde._target_.startswith("sde.sdes.")
    assert cfg.data.loader._target_ == "sde.data.load_dataset"


def test_sampler_configs_name_registered_samplers():
    samplers = pytest.importorskip("sde.samplers")
    for name in SAMPLERS:
        cfg = _compose("sample", [f"sampler={name}", "score.path=x"])
        assert cfg.sampler.name in samplers.SAMPLERS, f"sampler={name} names unknown {cfg.sampler.name!r}"


@pytest.mark.parametrize("sampler_name", SAMPLERS)
@pytest.mark.parametrize("sde_name", SDES)
def test_every_sampler_runs_on_every_sde_with_the_oracle(sde_name, sampler_name):
    """A few oracle samples per combination: the YAML options are accepted by the sampler."""
    pytest.importorskip("sde.samplers")
    from sde.oracle import GaussianMixture
    from sde.samplers import sample

    cfg = _compose("sample", [f"sde={sde_name}", f"sampler={sampler_name}", "score.path=x"])
    sde = build_sde(cfg)
    gm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64), stds=torch.tensor([0.3, 0.2]))
    options = OmegaConf.to_container(cfg.sampler.options)
    if "steps" in options:  # the adaptive samplers take none
        options["steps"] = 25  # small; VP reverse diffusion needs beta_max / steps < 1
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sampling((8, 2), generator=g, dtype=torch.float64)
    res = sample(gm.score_fn(sde), sde, x_T, sampler=cfg.sampler.name, generator=g, **options)
    assert res.x.shape == (8, 2) and torch.isfinite(res.x).all() and res.nfe > 0


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("data_name", ["digits", "moons", "gmm", "cifar10", "mnist", "image_folder"])
def test_models_build_for_each_data_shape(model_name, data_name):
    from sde.checkpoint import Flatten
    from sde.nets import MLP, UNet

    cfg = _compose("train", [f"model={model_name}", f"data={data_name}"])
    if model_name == "unet" and data_name in ("moons", "gmm", "mnist"):
        pytest.skip("the U-Net is for images; mnist has the same channels as digits")
    model = build_model(cfg, build_sde(cfg))
    shape = tuple(int(s) for s in cfg.data.shape)
    net = model.net
    if model_name == "mlp":  # vectors: the MLP itself; images: flattened around it, D = prod(shape)
        inner = net.net if len(shape) > 1 else net
        assert type(inner) is MLP and isinstance(net, Flatten) == (len(shape) > 1)
        assert inner.dim == cfg.data.dim and inner.inp.in_features == cfg.data.dim
        assert inner.inp.out_features == cfg.model.net.hidden and len(inner.blocks) == cfg.model.net.depth
    else:
        assert type(net) is UNet
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.in_channels == shape[0] and conv.out_channels == cfg.model.net.base_channels
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model(x, torch.full((2,), 0.5))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("data_name", sorted(set(DATA) - ON_DISK))
def test_embedded_datasets_load_with_the_configured_shape(data_name):
    pytest.importorskip("sde.data")
    from _common import load_data

    cfg = _compose("train", [f"data={data_name}"])
    ds = load_data(cfg.data, split="train")
    assert tuple(ds.shape) == tuple(cfg.data.shape)
    if ds.levels:  # quantized data sets are scaled to [-1, 1]; the GMM has Gaussian tails
        assert ds.data.min() >= -1 and ds.data.max() <= 1
    assert (getattr(ds, "oracle", None) is not None) == (data_name == "gmm")


def test_train_node_is_the_trainer_config_field_for_field():
    import dataclasses

    from sde.training import TrainConfig

    cfg = _compose("train", [], hydra_node=False)
    plain = OmegaConf.to_container(cfg.train, resolve=True)
    assert list(plain) == [f.name for f in dataclasses.fields(TrainConfig)] or set(plain) == {
        f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**plain)
    assert (tc.total_steps, tc.lr, tc.betas, tc.warmup_steps, tc.log_every) == (2800, 4e-3, (0.9, 0.999), 50, 50)
    assert (tc.batch_size, tc.lr_decay, tc.ema_decay) == (64, "cosine", 0.99)  # the recipe bench's optimisation
    assert tc.best_metric == "val_loss" and tc.time_budget_s == 420 and tc.seed == cfg.seed


@pytest.mark.parametrize("name", sorted(q.stem for q in (CONF / "optimizer").glob("*.yaml")))
def test_optimizer_configs_fill_the_trainer_config(name):
    from sde.training import TrainConfig

    raw = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    cfg = _compose("train", [f"optimizer={name}"], hydra_node=False)
    tc = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    assert tc.weight_decay == raw.weight_decay and tc.adam_eps == raw.adam_eps and tc.betas == tuple(raw.betas)
    assert tc.lr == 4e-3  # train.yaml's U-Net default overrides the group's peak LR


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_presets_are_global_and_override(preset):
    primary = "sample" if preset == "gmm_oracle" else "train"
    cfg = _compose(primary, [f"experiment={preset}"])
    assert cfg.name == preset  # a global-package preset sets top-level keys
    if preset == "toy_moons":
        assert cfg.data.name == "moons" and cfg.model.net.hidden == 128
    if preset == "digits_mlp":  # the MLP's own recipe and schedule, not the U-Net main job's
        assert cfg.model.net._target_.endswith("MLP") and cfg.loss.weighting == "sigma2"
        assert (cfg.train.lr, cfg.train.lr_decay, cfg.train.ema_decay) == (1e-3, "constant", 0.999)
    if preset == "gmm_oracle":
        assert cfg.data.name == "gmm" and cfg.score.kind == "oracle"


@pytest.mark.parametrize("option,plugin,target", [
    ("launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    ("launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "OptunaSweeper"),
])
def test_launcher_and_sweeper_presets_compose_when_plugin_installed(option, plugin, target):
    pytest.importorskip(plugin)
    cfg = _compose("train", [option])
    node = cfg.hydra.sweeper if option.startswith("hparams") else cfg.hydra.launcher
    assert node._target_.endswith(target)
    module, cls = node._target_.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), cls)


def test_configs_build_only_registered_classes():
    from sde.checkpoint import CheckpointSpecError

    cfg = _compose("sample", ["score.path=x", "sde._target_=os.system"], hydra_node=False)
    with pytest.raises(CheckpointSpecError, match=r"sde._target_='os.system' is not a registered SDE"):
        build_sde(cfg)
    with pytest.raises(CheckpointSpecError, match="sde.beta_max._target_"):
        build_sde(OmegaConf.create({"sde": {"_target_": "sde.sdes.VPSDE", "beta_max": {"_target_": "os.getcwd"}}}))


def test_config_diff_names_every_differing_key():
    saved = {"sde": {"_target_": "sde.sdes.VPSDE", "beta_max": 20.0, "schedule": "linear"}}
    asked = {"sde": {"_target_": "sde.sdes.VESDE", "beta_max": 20.0, "sigma_max": 50.0}}
    diffs = config_diff(saved, asked)
    assert [d.split(":")[0] for d in diffs] == ["sde._target_", "sde.schedule", "sde.sigma_max"]
    assert "checkpoint='sde.sdes.VPSDE' requested='sde.sdes.VESDE'" in diffs[0]
    assert config_diff(saved, saved) == []


def test_overridden_groups_reads_hydra_overrides():
    assert overridden_groups(["sde=ve", "sampler=pc", "+data.loader.root=/x", "seed=3"]) == {"sde", "data"}
    assert overridden_groups(["sampler.options.steps=5", "score.path=a"]) == set()


def test_results_table_has_one_row_per_job(tmp_path):
    write_row(tmp_path, "1", {"sde": "ve", "nfe": 10, "mmd": 0.5})
    write_row(tmp_path, "0", {"sde": "vp", "nfe": 20, "mmd": 0.25, "extra": "x"})
    write_row(tmp_path, "10", {"sde": "subvp", "nfe": 5, "mmd": 0.125})
    rows = aggregate(tmp_path)
    assert [r["sde"] for r in rows] == ["vp", "ve", "subvp"]  # job order 0, 1, 10
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "sde,nfe,mmd,extra" and csv_lines[1] == "vp,20,0.25,x" and len(csv_lines) == 4
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| sde | nfe | mmd | extra |" and md[2] == "| vp | 20 | 0.25 | x |" and len(md) == 5
    assert json.loads((tmp_path / "rows" / "1.json").read_text())["nfe"] == 10


def test_image_grid_places_each_image_in_its_tile():
    x = -torch.ones(5, 1, 2, 3)
    x[3] = 1.0  # the 4th image (row 1, column 1 in a 3-wide grid) is white
    grid = image_grid(x, nrow=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert (grid[4:6, 1:4] == 255).all()  # tile (1, 0) holds image 3
    assert (grid[1:3, 1:4] == 0).all() and (grid[4:6, 5:8] == 0).all()  # images 0 and 4 are black
    assert (grid[4:6, 9:12] == 255).all()  # the missing 6th tile is background


def test_score_kinds_are_a_registry_and_oracle_gives_a_typed_source():
    from _common.models import SCORE_KINDS, ScoreSource, score_source

    from sde.oracle import GaussianMixture
    from sde.sdes import SubVPSDE

    assert {"checkpoint", "oracle"} <= set(SCORE_KINDS)
    cfg = _compose("sample", ["data=gmm", "score=oracle", "sde=subvp"], hydra_node=False)
    source = score_source(cfg, [], torch.device("cpu"), torch.float64)
    assert isinstance(source, ScoreSource) and source.kind == "oracle" and source.model is None
    assert isinstance(source.oracle, GaussianMixture) and type(source.sde) is SubVPSDE and source.shape == (2,)
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert torch.equal(source.score_fn(x, torch.full((3,), 0.5)), source.oracle.score_fn(source.sde)(x, 0.5))
    cfg.score.kind = "nope"
    allowed = r"\['checkpoint', 'diffusers', 'oracle'\]"
    with pytest.raises(ValueError, match=r"score.kind='nope' is not supported; choose one of " + allowed):
        score_source(cfg, [], torch.device("cpu"), torch.float64)


def test_diffusers_score_refuses_sde_and_model_overrides_it_would_ignore():
    from _common.models import score_source

    cfg = _compose("sample", ["score=diffusers", "score.path=/nonexistent"], hydra_node=False)
    with pytest.raises(ValueError, match=r"score=diffusers .*\['sde'\] would be ignored"):
        score_source(cfg, ["score=diffusers", "sde=ve"], torch.device("cpu"), torch.float32)


def test_study_and_mlp_preset_keep_the_mlp_schedule():
    """The MLP runs (study.py, experiment=digits_mlp) keep plain DSM at a constant rate: the U-Net main job's
    recipe and schedule cost the MLP 0.5 bits/dim (docs/benchmarks.md, "Training")."""
    for cfg in (_compose("study", []), _compose("train", ["experiment=digits_mlp"])):
        tc = cfg.train
        assert (tc.lr, tc.lr_decay, tc.ema_decay, tc.batch_size, tc.warmup_steps) == (1e-3, "constant", 0.999, 128, 100)
        assert (cfg.loss.weighting, cfg.loss.time_sampling) == ("sigma2", "iid") and "MLP" in cfg.model.net._target_

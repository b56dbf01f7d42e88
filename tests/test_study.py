"""The SDE x sampler study (experiments/study.py): end to end on a tiny configuration, resume, budgets, bad values.

The end-to-end test runs the app as a user does (a subprocess) and reads back what it wrote: results.csv,
results.md, the plots and the W&B table in the offline run's files; it recomputes one cell from the checkpoint
its row names with the library alone, and proves by file modification times that a re-run trains and samples
nothing that is done.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "experiments"))

from _common import format_value  # noqa: E402
from _common.quality import quality  # noqa: E402
from _common.study import STUDY_PLOTS, plan, run_study, steps_for_nfe  # noqa: E402
from test_experiments import run_app  # noqa: E402

from sde import VESDE, VPSDE, SubVPSDE  # noqa: E402
from sde.checkpoint import load_score_model  # noqa: E402
from sde.data import load_dataset  # noqa: E402
from sde.samplers import sample  # noqa: E402

SDE_OPTIONS = sorted(p.stem for p in (CONF / "sde").glob("*.yaml"))  # what Hydra lists as the sde group's options
TINY = [
    "threads=1", "study.sdes=[vp,ve]", "study.samplers=[ddim,pc]", "study.nfe=[5,10]", "study.num_samples=24",
    "model.net.hidden=32", "model.net.depth=1", "train.total_steps=20", "train.batch_size=32", "train.eval_every=10",
    "train.ckpt_every=10", "train.warmup_steps=5", "eval.num_samples=4", "eval.bpd_samples=4",
    "eval.likelihood.rtol=1e-3", "eval.likelihood.atol=1e-3",
]


def _mtimes(folder: Path) -> dict[str, int]:
    """Modification times of every model and cell file of a study folder."""
    files = [*folder.glob("models/*/checkpoint.pt"), *folder.glob("models/*/checkpoints/*.pt"),
             *folder.glob("models/*/metrics.json"), *folder.glob("cells/*.json")]
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files}


def _wandb_table(folder: Path) -> tuple[list[str], list[list]]:
    """The W&B table of the newest study run, as wandb wrote it into the offline run's files."""
    run = sorted(folder.glob("wandb/offline-run-*"))[-1]
    (table,) = run.glob("files/media/table/study_*.table.json")
    data = json.loads(table.read_text())
    return data["columns"], data["data"]


def _check_outputs_agree(folder: Path) -> list[dict]:
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {(r["sde"], r["sampler"], r["nfe_budget"]) for r in rows} == {
        (s, m, b) for s in ("vp", "ve") for m in ("ddim", "pc") for b in ("5", "10")}
    columns = list(rows[0])
    for key in ("nfe", "fd_digits", "kid", "energy_distance", "seconds", "test_bpd", "checkpoint"):
        assert key in columns
    md = (folder / "results.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(columns) + " |" and len(md) == 2 + len(rows)
    w_columns, w_data = _wandb_table(folder)
    assert w_columns == columns and len(w_data) == len(rows)
    for row, line, w_row in zip(rows, md[2:], w_data):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for key, md_cell, w_value in zip(columns, cells, w_row):
            value = json.loads(row[key]) if key not in ("sde", "sampler", "model", "checkpoint") else row[key]
            assert w_value == value, (key, w_value, value)  # W&B holds the CSV's values exactly
            assert md_cell == format_value(value), (key, md_cell, value)
        assert Path(row["checkpoint"]) == folder / "models" / row["sde"] / "checkpoint.pt"
        assert 0 < int(row["nfe"]) <= int(row["nfe_budget"])
    for name in STUDY_PLOTS:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.width > 200
    run = sorted(folder.glob("wandb/offline-run-*"))[-1]
    for name in STUDY_PLOTS:  # the same plots as images of the W&B run
        assert len(list(run.glob(f"files/media/images/{Path(name).stem}_*.png"))) == 1
    return rows


def _recompute(folder: Path, row: dict) -> tuple[int, dict]:
    """The cell of ``row`` recomputed from its checkpoint with the library alone (same seed, same options)."""
    options = json.loads((folder / "cells" / f"{row['sde']}__{row['sampler']}__nfe{row['nfe_budget']}.json")
                         .read_text())["settings"]["options"]
    loaded = load_score_model(row["checkpoint"])
    g = torch.Generator().manual_seed(0)
    x_T = loaded.sde.prior_sampling((int(row["num_samples"]), 1, 8, 8), generator=g)
    with torch.no_grad():
        res = sample(loaded.model, loaded.sde, x_T, row["sampler"], generator=g, **options)
    test = load_dataset("digits", split="test").data
    return res.nfe, quality(res.x, test, True, torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_study_end_to_end_agrees_with_itself_and_resumes(tmp_path):
    folder = tmp_path / "study"
    args = [*TINY, "logger=wandb", f"study.dir={folder}"]
    first = run_app("study.py", args, tmp_path, WANDB_MODE="offline")
    assert "trained 2 model(s) (0 skipped), evaluated 8 cell(s) (0 skipped)" in first.stdout
    rows = _check_outputs_agree(folder)
    for m in (json.loads((folder / "models" / s / "metrics.json").read_text()) for s in ("vp", "ve")):
        assert m["steps"] == 20 and m["bpd_points"] == 4  # train.py's run: trained, then test bits/dim
    nfe, scores = _recompute(folder, rows[3])
    assert nfe == int(rows[3]["nfe"])  # the NFE column is what the sampler reported
    assert scores["fd_digits"] == pytest.approx(float(rows[3]["fd_digits"]), rel=1e-6)

    # Interrupted after all but one cell: the re-run trains nothing and computes only the missing cell.
    before = _mtimes(folder)
    (folder / "cells" / "ve__pc__nfe5.json").unlink()
    again = run_app("study.py", [*TINY, "logger=none", f"study.dir={folder}"], tmp_path)
    assert "trained 0 model(s) (2 skipped), evaluated 1 cell(s) (7 skipped)" in again.stdout
    after = _mtimes(folder)
    assert {k for k in after if before.get(k) != after[k]} == {"cells/ve__pc__nfe5.json"}
    redone = next(r for r in csv.DictReader(open(folder / "results.csv")) if r["sde"] == "ve" and r["sampler"] == "pc"
                  and r["nfe_budget"] == "5")
    old = next(r for r in rows if r["sde"] == "ve" and r["sampler"] == "pc" and r["nfe_budget"] == "5")
    assert redone["fd_digits"] == old["fd_digits"] and redone["nfe"] == old["nfe"]  # the same cell again

    # The same study once more (in-process): nothing left to do, nothing touched.
    lines = []
    summary = _run_in_process([*TINY, "logger=none", f"study.dir={folder}"], folder, lines.append)
    counts = (summary["trained"], summary["evaluated"], summary["models_skipped"], summary["cells_skipped"])
    assert counts == (0, 0, 2, 8)
    assert "vp: model already trained, skipped" in "\n".join(lines)
    assert _mtimes(folder) == after

    # A changed setting of done cells is refused with the key named, before any work.
    with pytest.raises(ValueError, match="num_samples: done=24 requested=30"):
        _run_in_process([*TINY, "logger=none", "study.num_samples=30", f"study.dir={folder}"], folder)
    assert _mtimes(folder) == after


def _composer(overrides: list[str]):
    """(the study config, compose(extra overrides)) as experiments/study.py composes them (call inside
    initialize_config_dir)."""
    def compose_with(extra):
        return compose("study", overrides=[*overrides, *extra], return_hydra_config=True)

    return compose("study", overrides=overrides), compose_with


def _run_in_process(overrides: list[str], folder: Path, log=lambda line: None) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg, compose_with = _composer(overrides)
        return run_study(cfg, compose_with, SDE_OPTIONS, overrides, folder, log=log)


def _plan(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg, compose_with = _composer(overrides)
        return plan(cfg, compose_with, SDE_OPTIONS, overrides)


@pytest.mark.parametrize("override, message", [
    ("study.samplers=[ddim,foo]", "study.samplers has unknown name(s) ['foo']"),
    ("study.samplers=[em]", "study.samplers has unknown name(s) ['em']"),  # a conf/sampler file, not a SAMPLERS key
    ("study.sdes=[vp,vq]", "study.sdes has unknown name(s) ['vq']"),
    ("study.sdes=[vp,vp]", "study.sdes=['vp', 'vp'] must be a non-empty list without repeats"),
    ("study.nfe=[10,0]", "study.nfe=[10, 0] must be a non-empty list of distinct positive ints"),
    ("study.nfe=[-5]", "study.nfe=[-5] must be"),
    ("study.nfe=[2.5]", "study.nfe=[2.5] must be"),
    ("study.num_samples=0", "study.num_samples=0 must be a positive int"),
    ("+study.sampler_options.dpm={order:3}", "study.sampler_options has options for unknown sampler(s) ['dpm']"),
    ("study.nfe=[2]", "study.nfe: the budget 2 is below the smallest NFE of 'pc' (3 for one step)"),
    ("study.sampler_options.ode.method=dopri5", "study.sampler_options.ode={'method': 'dopri5'}: an adaptive"),
    ("study.sampler_options.ddim.eta=2", "study.sampler_options.ddim={'eta': 2}: the sampler refuses"),
    ("sde=ve", "set study.sdes=[...] instead"),
])
def test_bad_study_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        _plan([override])
    assert message in str(err.value)


def test_bad_value_fails_before_any_work(tmp_path):
    folder = tmp_path / "study"
    with pytest.raises(ValueError, match=r"study.nfe=\[10, -5\] must be"):
        _run_in_process([*TINY, "logger=wandb", "study.nfe=[10,-5]", f"study.dir={folder}"], folder)
    assert not folder.exists()  # no model, no cell, no W&B run


@pytest.mark.slow  # 18 cells x 5 sampler runs each
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_default_study_cells_spend_the_most_steps_their_budget_allows(sde):
    """Each default sampler at each default budget: the chosen steps fit the budget, one more step would not
    (checked by running the sampler with an exact score, not by the affine rule the search uses)."""
    from sde.oracle import GaussianMixture

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("study")
    gm = GaussianMixture(torch.zeros(1, 4), stds=torch.full((1,), 0.5))
    for sampler in cfg.study.samplers:
        options = dict(cfg.study.sampler_options.get(sampler) or {})
        for budget in cfg.study.nfe:
            steps = steps_for_nfe(sampler, sde, (1, 4), options, budget)

            nfe = [sample(gm.score_fn(sde), sde, (3, 4), sampler, generator=torch.Generator().manual_seed(0),
                          **options, steps=k).nfe for k in (steps, steps + 1)]
            assert nfe[0] <= budget < nfe[1], (sampler, budget, steps, nfe)

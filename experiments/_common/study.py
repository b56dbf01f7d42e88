"""The SDE x sampler study (experiments/study.py, conf/study.yaml) in one process, resumable.

One model per SDE is trained by train.py's own ``train`` (the Trainer, its checkpoint format, the test bits/dim
of the dataset's convention) in ``<study.dir>/models/<sde>/``, a train.py run folder (metrics.json marks it
finished). Each cell (sde, sampler, NFE budget) samples that checkpoint with ``_common.sampling.draw`` and
scores the samples with ``_common.quality.quality`` against the test split; it is saved atomically as
``cells/<sde>__<sampler>__nfe<budget>.json`` as soon as it is done. Models and cells already on disk are
skipped (their settings must be the requested ones: a difference is an error naming every key). The tables
(``_common.results.write_tables``), the plots and the W&B run are rebuilt from all cells at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from . import load_data, setup, to_plain, write_json
from .plots import _pyplot, _savefig

__all__ = ["Cell", "check_study", "steps_for_nfe", "run_study", "STUDY_PLOTS"]

STUDY_PLOTS = ("quality_vs_nfe.png", "bpd.png")  # in the study folder and, as images, in the W&B run


@dataclass(frozen=True)
class Cell:
    """One (SDE, sampler, NFE budget) of the study and the sampler options that meet the budget."""

    sde: str
    sampler: str
    budget: int
    options: dict = field(hash=False)  # the sampler's options, steps included

    @property
    def key(self) -> str:
        return f"{self.sde}__{self.sampler}__nfe{self.budget}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_study(study: DictConfig, sde_options: list[str], overrides: list[str]) -> None:
    """Check the ``study`` node before any work.

    Args:
        study: the ``study`` config node.
        sde_options: the conf/sde options (the allowed study.sdes).
        overrides: the command-line overrides.

    Raises:
        ValueError: an unknown SDE (not a conf/sde option) or sampler (not in sde.samplers.SAMPLERS), options for
            an unknown sampler, a budget or sample count that is not a positive int, an empty or repeated list,
            or an ``sde=`` override (the study trains every SDE of study.sdes); the message names the key.
    """
    from sde.samplers import SAMPLERS

    if any(o.split("=", 1)[0].lstrip("+~") == "sde" for o in overrides):
        raise ValueError("sde=... does not apply to the study: it trains one model per SDE of study.sdes; "
                         "set study.sdes=[...] instead")
    for key, allowed in (("sdes", sde_options), ("samplers", sorted(SAMPLERS))):
        names = list(study[key] or [])
        if not names or len(set(names)) != len(names):
            raise ValueError(f"study.{key}={names!r} must be a non-empty list without repeats; choose from {allowed}")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"study.{key} has unknown name(s) {bad}; choose from {allowed}")
    unknown = sorted(set(study.get("sampler_options") or {}) - set(SAMPLERS))
    if unknown:
        raise ValueError(f"study.sampler_options has options for unknown sampler(s) {unknown}; "
                         f"choose from {sorted(SAMPLERS)}")
    budgets = list(study.nfe or [])
    if not budgets or not all(_is_int(b) and b > 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"study.nfe={budgets!r} must be a non-empty list of distinct positive ints (NFE budgets)")
    if not (_is_int(study.num_samples) and study.num_samples > 0):
        raise ValueError(f"study.num_samples={study.num_samples!r} must be a positive int")


def _probe_nfe(sampler: str, sde, shape: tuple[int, ...], options: dict, steps: int) -> int:
    """The NFE ``sampler`` reports for ``steps`` steps, on one sample of a cheap score (-x): fixed-step samplers
    spend the same number of score calls whatever the score."""
    from sde.samplers import sample

    x_T = sde.prior_sampling((1, *shape[1:]), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return int(sample(lambda x, t: -x, sde, x_T, sampler, generator=torch.Generator().manual_seed(0),
                      **{**options, "steps": steps}).nfe)


def steps_for_nfe(sampler: str, sde, shape: tuple[int, ...], options: dict, budget: int) -> int:
    """The largest number of steps whose NFE (as the sampler reports it) is at most ``budget``.

    The NFE of a fixed-step sampler is affine in its steps (calls per step, plus warm-up or final-denoise
    calls): it is measured at three step counts, solved for the budget and checked at the answer.

    Args:
        sampler: a name in sde.samplers.SAMPLERS.
        sde: the SDE it samples.
        shape: a sample batch's shape (only its trailing dimensions are used: the probes draw one sample).
        options: the sampler's other options (``steps`` is set here).
        budget: the NFE budget (score calls per sample).

    Returns:
        The number of steps.

    Raises:
        ValueError: the sampler cannot meet the budget (names the key study.nfe and the smallest NFE), or its
            options are bad (the sampler's own message, with the key study.sampler_options.<sampler>).
    """
    from sde.flow import ADAPTIVE_METHODS

    key = f"study.sampler_options.{sampler}"
    if sampler == "ode" and options.get("method", "dopri5") in ADAPTIVE_METHODS:
        raise ValueError(f"{key}={options!r}: an adaptive ODE method chooses its own NFE; the study gives each "
                         "sampler a budget of steps: use a fixed-grid method (e.g. method: midpoint)")
    try:
        n8, n9, n10 = (_probe_nfe(sampler, sde, shape, options, k) for k in (8, 9, 10))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}={options!r}: the sampler refuses these options ({err})") from err
    per_step, extra = n9 - n8, n8 - 8 * (n9 - n8)
    if per_step <= 0 or n10 - n9 != per_step:
        raise ValueError(f"{key}={options!r}: the NFE of {sampler!r} ({n8}, {n9}, {n10} for 8, 9, 10 steps) is "
                         "not a fixed number of score calls per step; the study needs a fixed-step sampler")
    steps = (budget - extra) // per_step
    if steps < 1:
        raise ValueError(f"study.nfe: the budget {budget} is below the smallest NFE of {sampler!r} "
                         f"({per_step + extra} for one step)")
    try:
        nfe = _probe_nfe(sampler, sde, shape, options, steps)
    except ValueError as err:
        raise ValueError(f"study.nfe: {sampler!r} cannot run the {steps} steps of the budget {budget} ({err})") from err
    if nfe > budget:
        raise ValueError(f"study.nfe: {sampler!r} with {steps} steps spends {nfe} > {budget} score calls")
    return steps


@dataclass
class _Plan:
    """The composed per-SDE training configs and the cells, in table order."""

    configs: dict[str, DictConfig]
    choices: dict[str, dict]
    cells: list[Cell]


def _model_config(compose, name: str) -> tuple[DictConfig, dict]:
    """The train.py config of the model for SDE ``name`` (task train, no study node) and its group choices."""
    cfg = compose([f"sde={name}"])
    choices = to_plain(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        del cfg["study"]
        cfg.task = "train"
    return cfg, choices


def plan(cfg: DictConfig, compose, sde_options: list[str], overrides: list[str]) -> _Plan:
    """Check the study node, compose each model's config and find every cell's steps (no training, no sampling)."""
    from .models import build_sde

    check_study(cfg.study, sde_options, overrides)
    configs, choices, cells = {}, {}, []
    shape = (1, *(int(s) for s in cfg.data.shape))
    options = to_plain(cfg.study.get("sampler_options") or {})
    for name in cfg.study.sdes:
        configs[name], choices[name] = _model_config(compose, name)
        sde = build_sde(configs[name])
        for sampler in cfg.study.samplers:
            opts = dict(options.get(sampler) or {})
            for budget in cfg.study.nfe:
                steps = steps_for_nfe(sampler, sde, shape, opts, int(budget))
                cells.append(Cell(name, sampler, int(budget), {**opts, "steps": steps}))
    return _Plan(configs, choices, cells)


def _mismatch(what: str, diffs: list[str]) -> ValueError:
    """The error for a done model or cell whose settings differ from the request, every differing key named."""
    return ValueError(f"{what}; differing keys:\n  " + "\n  ".join(diffs)
                      + "\nUse the same settings or another study.dir")


def _check_done_model(folder: Path, cfg: DictConfig) -> None:
    from .resume import RUN_CONFIG, config_diffs

    diffs = config_diffs(json.loads((folder / RUN_CONFIG).read_text()), to_plain(cfg))
    if diffs:
        raise _mismatch(f"the study's model {str(folder)!r} was trained with a different config", diffs)


def _train_model(cfg: DictConfig, choices: dict, folder: Path, group: str) -> dict:
    """train.py's training and evaluation of one model in its run folder ``folder`` (resumed when unfinished)."""
    from train import train  # experiments/train.py: the app's own training function

    from .app import tracked
    from .resume import RUN_CONFIG

    with open_dict(cfg):  # continue an interrupted model from its checkpoints/latest.pt (config checked)
        cfg.train.resume = str(folder) if (folder / RUN_CONFIG).is_file() else False
    device, dtype, generator = setup(cfg)

    def compute(tracker) -> dict:
        metrics = train(cfg, tracker, folder, device, dtype, generator)
        metrics.update({"task": "train", "name": cfg.name, "sde": choices["sde"], "model": choices["model"]})
        return metrics

    return tracked(cfg, "train", folder, group, None, compute)  # metrics.json marks the model finished


def _model(cfg: DictConfig, choices: dict, folder: Path, group: str, log) -> tuple[dict, bool]:
    """(metrics, trained now?) of the model in ``folder``: trained, resumed, or read back when finished (its
    config was checked by :func:`_done`)."""
    if (folder / "metrics.json").is_file():
        log(f"{choices['sde']}: model already trained, skipped ({folder / 'checkpoint.pt'})")
        return json.loads((folder / "metrics.json").read_text()), False
    t0 = time.perf_counter()
    metrics = _train_model(cfg, choices, folder, group)
    log(f"{choices['sde']}: trained {metrics['steps']} steps in {time.perf_counter() - t0:.0f} s, "
        f"test bpd {metrics.get('test_bpd', math.nan):.3f} ({folder / 'checkpoint.pt'})")
    return metrics, True


def _settings(cell: Cell, cfg: DictConfig, checkpoint: Path) -> dict:
    """What a cell's result depends on besides the model: compared when a done cell is reused."""
    return {"options": cell.options, "num_samples": int(cfg.study.num_samples), "seed": int(cfg.seed),
            "dtype": str(cfg.dtype), "checkpoint": str(checkpoint)}


def _done_cell(path: Path, settings: dict) -> dict | None:
    """The row of a cell already on disk (None when there is none)."""
    from sde.checkpoint import diff_dicts

    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    diffs = diff_dicts(saved["settings"], settings, labels=("done", "requested"))
    if diffs:
        raise _mismatch(f"the study cell {str(path)!r} was computed with other settings", diffs)
    return saved["row"]


def _run_cell(cell: Cell, loaded, model_metrics: dict, test: torch.Tensor, cfg: DictConfig, digits: bool) -> dict:
    """Sample the cell's model with its sampler and score the samples against the test split."""
    from .quality import quality
    from .sampling import draw

    device, dtype = test.device, test.dtype
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))  # the same x_T for every sampler
    sampler_cfg = OmegaConf.create({"name": cell.sampler, "options": cell.options})
    shape = (int(cfg.study.num_samples), *test.shape[1:])
    t0 = time.perf_counter()
    x, nfe, _, _ = draw(loaded.model, loaded.sde, sampler_cfg, shape, generator=generator, device=device, dtype=dtype)
    seconds = time.perf_counter() - t0
    scores = quality(x, test, digits, torch.Generator(device=device).manual_seed(int(cfg.seed) + 1))
    first = _quality_keys(scores)  # the headline metrics first, then the others
    row = {"sde": cell.sde, "sampler": cell.sampler, "nfe_budget": cell.budget, "steps": cell.options["steps"],
           "nfe": nfe, **{k: scores[k] for k in first}, **{k: v for k, v in scores.items() if k not in first},
           "seconds": seconds, "num_samples": shape[0]}
    for key in ("test_bpd", "test_bpd_se"):
        if key in model_metrics:
            row[key] = model_metrics[key]
    row.update({"model": model_metrics.get("model"), "train_steps": model_metrics.get("steps"),
                "checkpoint": str(loaded.path)})
    return row


@dataclass
class _Counts:
    trained: int = 0
    models_skipped: int = 0
    evaluated: int = 0
    cells_skipped: int = 0


def _done(p: _Plan, cfg: DictConfig, out: Path) -> dict[str, dict]:
    """The rows of the cells already done, every done model's and cell's settings checked (before any work)."""
    for name, model_cfg in p.configs.items():
        if (out / "models" / name / "metrics.json").is_file():
            _check_done_model(out / "models" / name, model_cfg)
    done = {}
    for cell in p.cells:
        row = _done_cell(out / "cells" / f"{cell.key}.json", _settings(cell, cfg, _checkpoint(out, cell.sde)))
        if row is not None:
            done[cell.key] = row
    return done


def _checkpoint(out: Path, name: str) -> Path:
    return out / "models" / name / "checkpoint.pt"


def _sde_cells(name: str, cells: list[Cell], done: dict[str, dict], cfg: DictConfig, model_metrics: dict, out: Path,
               counts: _Counts, log) -> list[dict]:
    """The rows of one model's cells: those done as they are, the others computed and saved at once."""
    from sde.checkpoint import load_score_model

    device, dtype, _ = setup(cfg)
    checkpoint = _checkpoint(out, name)
    rows = {c.key: done[c.key] for c in cells if c.key in done}
    todo = [c for c in cells if c.key not in done]
    counts.cells_skipped += len(rows)
    if rows:
        log(f"{name}: {len(rows)} cell(s) already done, skipped")
    if todo:
        loaded = load_score_model(checkpoint, device=device, dtype=dtype)
        test_set = load_data(cfg.data, split="test")
        test = test_set.data.to(device=device, dtype=dtype)
        for cell in todo:
            row = _run_cell(cell, loaded, model_metrics, test, cfg, cfg.data.name == "digits")
            write_json(out / "cells" / f"{cell.key}.json", {"settings": _settings(cell, cfg, checkpoint), "row": row})
            rows[cell.key] = row
            counts.evaluated += 1
            log(f"{name} / {cell.sampler} / NFE {cell.budget}: nfe {row['nfe']}, {row['seconds']:.1f} s, "
                + ", ".join(f"{k} {row[k]:.4g}" for k in _quality_keys(row)))
    return [rows[c.key] for c in cells]


def _quality_keys(row: dict) -> list[str]:
    """The metrics the plots and the log lines show: FD-digits and KID on digits, else energy distance."""
    return ["fd_digits", "kid"] if "fd_digits" in row else ["energy_distance"]


def save_plots(rows: list[dict], out: Path) -> list[Path]:
    """quality_vs_nfe.png (a panel per SDE and metric, a line per sampler) and bpd.png (test bits/dim per SDE,
    when the data is quantized)."""
    plt = _pyplot()
    from matplotlib import ticker

    sdes = list(dict.fromkeys(r["sde"] for r in rows))
    keys = _quality_keys(rows[0])
    fig, axes = plt.subplots(len(keys), len(sdes), figsize=(4 * len(sdes), 3.2 * len(keys)), squeeze=False)
    for j, name in enumerate(sdes):
        mine = [r for r in rows if r["sde"] == name]
        for i, key in enumerate(keys):
            ax = axes[i][j]
            for sampler in dict.fromkeys(r["sampler"] for r in mine):
                pts = sorted((r["nfe"], r[key]) for r in mine if r["sampler"] == sampler)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
            budgets = sorted({r["nfe_budget"] for r in mine})  # points sit at the NFE spent, ticks at the budgets
            ax.set_xscale("log")
            ax.set_xticks(budgets, [str(n) for n in budgets])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            if all(r[key] > 0 for r in mine):  # KID is an unbiased estimate: it can be negative
                ax.set_yscale("log")
            ax.set_title(f"{name}: {key} (lower is better)")
            ax.set_xlabel("NFE spent (score calls per sample)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / STUDY_PLOTS[0]]
    try:
        _savefig(fig, paths[0])
    finally:
        plt.close(fig)
    bpd = {r["sde"]: (r["test_bpd"], r.get("test_bpd_se", 0.0)) for r in rows if "test_bpd" in r}
    if bpd:
        fig, ax = plt.subplots(figsize=(1.2 * len(bpd) + 2.5, 3.2))
        ax.bar(list(bpd), [v[0] for v in bpd.values()], yerr=[v[1] for v in bpd.values()], capsize=4)
        ax.set_ylabel("test bits/dim (PF-ODE)")
        ax.set_title("test bits/dim per SDE (lower is better)")
        for k, (v, _) in bpd.items():
            ax.annotate(f"{v:.3f}", (k, v), ha="center", va="bottom", fontsize=8)
        try:
            paths.append(_savefig(fig, out / STUDY_PLOTS[1]))
        finally:
            plt.close(fig)
    return paths


def _publish(cfg: DictConfig, rows: list[dict], out: Path, summary: dict) -> None:
    """results.csv / results.md, the plots, summary metrics.json and the study's W&B run (table + plots)."""
    from .app import tracked
    from .results import write_tables

    write_tables(out, rows)
    paths = save_plots(rows, out)

    def publish(tracker, _summary: dict) -> None:
        tracker.table("study", rows)
        for path in paths:
            tracker.image(path.stem, path)

    tracked(cfg, "study", out, cfg.name, None, lambda _tracker: summary, publish)


def run_study(cfg: DictConfig, compose, sde_options: list[str], overrides: list[str], out: Path, log=print) -> dict:
    """Run (or resume) the study of ``cfg`` in the folder ``out``.

    Args:
        cfg: the composed conf/study.yaml.
        compose: compose(extra_overrides) -> the study config with the command line's overrides plus these,
            with its hydra node (a model's config is ``compose(["sde=<name>"])``).
        sde_options: the conf/sde options (the allowed study.sdes).
        overrides: the command-line overrides (to refuse ``sde=``).
        out: the study folder.
        log: where progress lines go.

    Returns:
        The summary: counts of models trained and skipped, cells evaluated and skipped, wall and CPU seconds.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    p = plan(cfg, compose, sde_options, overrides)  # every check before any work
    done = _done(p, cfg, out)
    log(f"study: {len(p.configs)} model(s) x {len(cfg.study.samplers)} sampler(s) x {len(cfg.study.nfe)} "
        f"budget(s) = {len(p.cells)} cells in {out}")
    counts, rows = _Counts(), []
    for name, model_cfg in p.configs.items():
        folder = out / "models" / name
        metrics, trained = _model(model_cfg, p.choices[name], folder, cfg.name, log)
        counts.trained += trained
        counts.models_skipped += not trained
        cells = [c for c in p.cells if c.sde == name]
        rows += _sde_cells(name, cells, done, cfg, metrics, out, counts, log)
    summary = {"task": "study", "name": cfg.name, "models": len(p.configs), "cells": len(p.cells),
               **vars(counts), "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    _publish(cfg, rows, out, summary)
    log(f"study: trained {counts.trained} model(s) ({counts.models_skipped} skipped), evaluated {counts.evaluated} "
        f"cell(s) ({counts.cells_skipped} skipped) in {summary['wall_seconds']:.0f} s wall, "
        f"{summary['cpu_seconds']:.0f} s CPU -> {out / 'results.md'}")
    return summary

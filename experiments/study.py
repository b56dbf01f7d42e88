"""The SDE x sampler study in one command: a model per SDE, every sampler at every NFE budget, test bits/dim.

    python experiments/study.py                                   # digits: vp, subvp, ve x 6 samplers x NFE 10, 20, 50
    python experiments/study.py study.sdes=[vp,ve] study.samplers=[ddim,unipc] study.nfe=[10,20]
    python experiments/study.py data=moons study.dir=outputs/study/moons   # any model / data through the groups
    python experiments/study.py                                   # again: skips the models and cells already done

Each model is a train.py run (the same ``train`` function, Trainer and checkpoint format) in
``<study.dir>/models/<sde>/``; each (sde, sampler, budget) cell samples that checkpoint with the sampler's most
steps whose NFE fits the budget and scores the samples against the test split (FD-digits, KID, energy
distance, ...), saved at once in ``cells/``. ``study.dir`` (default ``outputs/study/<name>``) is the study
folder: re-running the same command on it skips what is done. At the end it writes results.csv, results.md
(one row per cell, with the checkpoint it used), quality_vs_nfe.png, bpd.png, metrics.json (counts, wall
and CPU time) and a W&B run (offline by default) with the same table and plots. See docs/experiments.md.
"""

from __future__ import annotations

import hydra
from _common import run_dir
from _common.study import run_study
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    sde_options = GlobalHydra.instance().config_loader().get_group_options("sde")

    def compose_with(extra: list[str]) -> DictConfig:
        return compose(hc.job.config_name, overrides=[*overrides, *extra], return_hydra_config=True)

    run_study(cfg, compose_with, sde_options, overrides, run_dir())


if __name__ == "__main__":
    main()

"""Train one run, or a sweep with -m:  python train.py +experiment=dln_bn [overrides]  (see README.md)."""

import hydra
from omegaconf import DictConfig

from bnopt.cli import main, sweep_stopped_by_ctrl_c


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def entry(cfg: DictConfig) -> dict | None:
    return main(cfg)  # a sweep's callbacks read it (UnfinishedJobs)


if __name__ == "__main__":
    try:
        entry()
    except KeyboardInterrupt:
        sweep_stopped_by_ctrl_c()  # a sweep's last words, and status 130
        raise

"""Train one run, or a sweep with -m:  python train.py +experiment=dln_bn [overrides]  (see README.md)."""

import hydra
from omegaconf import DictConfig

from bnopt.cli import main


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def entry(cfg: DictConfig) -> dict | None:
    return main(cfg)  # a sweep's callbacks read it (UnfinishedJobs)


if __name__ == "__main__":
    entry()

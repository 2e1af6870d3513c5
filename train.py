"""Train one run, or a sweep with -m:  python train.py +experiment=dln_bn [overrides]  (see README.md)."""

import hydra
from omegaconf import DictConfig

from bnopt.cli import main


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def entry(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    entry()

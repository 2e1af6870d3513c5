from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bnopt.synthetic import write_cifar10, write_mnist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python train.py <overrides>`` would get."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess, from the repository root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def train_run(run_dir: Path, *overrides: str) -> dict:
    """Train in-process, as ``python train.py <overrides> hydra.run.dir=<run_dir>`` would."""
    from bnopt.train import train

    return train(compose_config(*overrides), run_dir)


def read_rows(run_dir: Path, prefixes: tuple[str, ...] = ("train/", "test/")) -> list[str]:
    """The metrics.csv rows whose name starts with one of ``prefixes``, as text."""
    lines = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    return [line for line in lines if line.split(",")[1].startswith(prefixes)]

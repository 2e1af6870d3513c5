from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bnopt.config import check_added_keys
from bnopt.synthetic import write_cifar10, write_mnist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python train.py <overrides>`` would get."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def check_added_keys_as_train_does(*overrides: str) -> None:
    """``check_added_keys`` on the config of ``python train.py <overrides>``, with the config groups Hydra
    reports for that command, as the entry point passes them."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        groups = list(compose("train", overrides=list(overrides), return_hydra_config=True).hydra.runtime.choices)
    check_added_keys(compose_config(*overrides), overrides, groups,
                     compose=lambda others: compose_config(*others))


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess, from the repository root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def ascii_locale_env() -> dict:
    """The environment of a process whose locale encoding, and so its default for files and stdout, is ASCII
    (C locale, not coerced to UTF-8): what Latin-1 or a Windows code page does to a non-ASCII character, in
    any machine's C locale."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONIOENCODING"}
    return {**env, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def assert_every_figure_drawn(figures: Path) -> None:
    """Every figure of the paper is in ``figures`` (one of two panels is drawn as fig<key>_a and fig<key>_b)."""
    from bnopt.figures import FIGURES

    for key in FIGURES:
        assert any((figures / f"fig{key}{suffix}.png").is_file() for suffix in ("", "_a")), key


def train_run(run_dir: Path, *overrides: str) -> dict:
    """Train in-process, as ``python train.py <overrides> hydra.run.dir=<run_dir>`` would."""
    from bnopt.train import train

    return train(compose_config(*overrides), run_dir)


def read_rows(run_dir: Path, prefixes: tuple[str, ...] = ("train/", "test/")) -> list[str]:
    """The metrics.csv rows whose name starts with one of ``prefixes``, as text."""
    lines = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    return [line for line in lines if line.split(",")[1].startswith(prefixes)]


def snapshot(model, optimizer) -> dict:
    """Everything a pure observation must leave as it found it."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                  for i, p in enumerate(model.parameters())},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "modes": [m.training for m in model.modules()],
        "tracking": [m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")],
        "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()[1].copy(), "python_rng": random.getstate(),
    }


def assert_same(before, after):
    for key in ("params", "buffers"):
        assert all(torch.equal(x, y) for x, y in zip(before[key], after[key], strict=True)), key
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(before["grads"], after["grads"], strict=True))
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        assert before["state"][i].keys() == after["state"][i].keys()
        for k in before["state"][i]:
            assert torch.equal(torch.as_tensor(before["state"][i][k]), torch.as_tensor(after["state"][i][k]))
    assert before["groups"] == after["groups"] and before["modes"] == after["modes"]
    assert before["tracking"] == after["tracking"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]) and before["python_rng"] == after["python_rng"]

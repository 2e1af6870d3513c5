"""The figure recipes (`experiments/*.sh`) as a user runs them: each trains its runs at their fixed places
and draws its figures, and a run that several recipes share is trained once (a recipe run after all.sh
finds every run it needs finished and trains nothing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnopt.synthetic import write_cifar10, write_mnist
from conftest import REPO, assert_every_figure_drawn

RECIPES = sorted(p.name for p in (REPO / "experiments").glob("*.sh") if p.name not in ("common.sh", "all.sh"))


@pytest.fixture
def workspace(tmp_path):
    """Synthetic CIFAR-10 and MNIST in the real formats under one data root, and an empty results tree."""
    data = tmp_path / "data"
    write_cifar10(data)
    write_mnist(data / "MNIST" / "raw")
    return data, tmp_path / "results"


def run_recipe(name: str, data: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNOPT_DATA": str(data), "RESULTS": str(results), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the recipes call `python`
    result = subprocess.run(["bash", str(REPO / "experiments" / name), "smoke"], capture_output=True, text=True,
                            env=env, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # make_figures names what it could not draw; a recipe's own sweeps leave nothing out
    assert "missing" not in output and "skipp" not in output, output[-6000:]
    return result


def trained_runs(results: Path) -> dict[Path, int]:
    """Every run under ``results``, with when its metrics were last written."""
    return {p.parent: p.stat().st_mtime_ns for p in results.glob("*/*/*/metrics.csv")}


def assert_finished(runs) -> None:
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] in ("completed", "diverged"), run


def test_a_recipe_trains_its_runs_at_their_fixed_places_and_draws_its_figures(workspace):
    data, results = workspace
    run_recipe("fig3_ics.sh", data, results)
    runs = trained_runs(results)
    # Fig. 3: VGG none/BN at lr 0.1, 0.01 (one seed); the DLN none/BN at lr 1e-6, 1e-7, three seeds
    expected = {results / "smoke-cifar10" / "vgg" / f"{norm}_lr{lr}_seed0" for norm in ("none", "batchnorm")
                for lr in ("0.1", "0.01")}
    expected |= {results / "smoke-gaussian_regression" / "dln" / f"{norm}_lr{lr}_seed{seed}"
                 for norm in ("none", "batchnorm") for lr in ("1e-06", "1e-07") for seed in range(3)}
    assert set(runs) == expected
    assert_finished(runs)
    assert (results / "figures" / "fig3_a.png").stat().st_size > 0
    assert (results / "figures" / "fig3_b.png").stat().st_size > 0


@pytest.mark.slow
def test_all_sh_draws_every_figure_and_covers_every_recipes_runs(workspace):
    """all.sh trains each run once for all figures; afterwards every single-figure recipe finds its runs
    finished (same place, same config: another config would stop the run) and trains nothing."""
    data, results = workspace
    run_recipe("all.sh", data, results)
    runs = trained_runs(results)
    assert_finished(runs)
    assert_every_figure_drawn(results / "figures")
    for recipe in RECIPES:
        run_recipe(recipe, data, results)
        assert trained_runs(results) == runs, f"{recipe} trained runs that all.sh did not"

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


def start_recipe(name: str, data: Path, results: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``experiments/<name> smoke <overrides>``, whatever its exit status."""
    env = {**os.environ, "BNOPT_DATA": str(data), "RESULTS": str(results), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the recipes call `python`
    return subprocess.run(["bash", str(REPO / "experiments" / name), "smoke", *overrides], capture_output=True,
                          text=True, env=env, timeout=1800)


def run_recipe(name: str, data: Path, results: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = start_recipe(name, data, results, *overrides)
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


def test_a_recipe_whose_runs_were_made_with_other_overrides_stops_before_drawing(workspace):
    """The run places name only norm, lr and seed: given an override that changes its runs, the recipe finds
    every place taken by a run of the first command. Its jobs are refused, so it must not draw the old runs as
    if they were the new ones. Overrides outside a run's identity find the runs finished."""
    data, results = workspace
    run_recipe("fig9_dln_landscape.sh", data, results, "threads=1")
    runs, figure = trained_runs(results), results / "figures" / "fig9.png"
    run_recipe("fig9_dln_landscape.sh", data, results, "threads=2", "name=renamed", "device=cpu")
    assert trained_runs(results) == runs
    drawn = figure.stat().st_mtime_ns
    other = start_recipe("fig9_dln_landscape.sh", data, results, "threads=1", "optim.momentum=0.9")
    assert other.returncode == 2, other.stdout[-3000:] + other.stderr[-3000:]
    refused = [line for line in other.stderr.splitlines() if "holds a run of another config" in line]
    assert len(refused) == len(runs) and all("(optim.momentum: 0.0 -> 0.9)" in line for line in refused)
    assert "RESULTS=<another dir>" in other.stderr and "wrote" not in other.stdout
    assert figure.stat().st_mtime_ns == drawn and trained_runs(results) == runs
    assert not list(results.glob(".refused-jobs.*"))  # the recipe's list of refused jobs goes with it


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

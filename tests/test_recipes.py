"""The figure recipes (`experiments/*.sh`) as a user runs them: each trains its runs at their fixed places
and draws its figures, and a run that several recipes share is trained once (a recipe run after all.sh
finds every run it needs finished and trains nothing)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnopt.cli import hydra_override
from bnopt.synthetic import write_cifar10, write_mnist
from conftest import REPO, assert_every_figure_drawn
from test_cli import ODD_PATHS, hydra_reads

RECIPES = sorted(p.name for p in (REPO / "experiments").glob("*.sh") if p.name not in ("common.sh", "all.sh"))


@pytest.fixture
def workspace(tmp_path):
    """Synthetic CIFAR-10 and MNIST in the real formats under one data root, and an empty results tree, in a
    clone named as a second download is (Hydra refused such a directory given to it unquoted)."""
    data = tmp_path / "data"
    write_cifar10(data)
    write_mnist(data / "MNIST" / "raw")
    return data, tmp_path / "bnopt (1)" / "José's results"


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


@pytest.mark.slow  # half a minute or more each: trains a recipe's runs
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


@pytest.mark.slow  # half a minute or more each: trains a recipe's runs
def test_a_recipe_whose_runs_were_made_with_other_overrides_stops_before_drawing(workspace):
    """The run places name only norm, lr and seed: given an override that changes its runs, the recipe finds
    every place taken by a run of the first command. Its jobs are refused, so it must not draw the old runs as
    if they were the new ones. Overrides outside a run's identity find the runs finished."""
    data, results = workspace
    other_set = results / "paper-gaussian_regression" / "dln"  # another result set in the tree: not drawn
    shutil.copytree(next((REPO / "results" / "paper-gaussian_regression" / "dln").glob("batchnorm_lr1e-06_seed*")),
                    other_set / "batchnorm_lr1e-06_seed0")
    run_recipe("fig9_dln_landscape.sh", data, results, "threads=1")
    assert [p.name for p in (results / "figures").glob("*.png")] == ["fig9.png"]  # not one per combination
    shutil.rmtree(other_set.parent)
    runs, figure = trained_runs(results), results / "figures" / "fig9.png"
    run_recipe("fig9_dln_landscape.sh", data, results, "threads=2", "name=renamed", "device=cpu")
    assert trained_runs(results) == runs
    drawn = figure.stat().st_mtime_ns
    overrides = ("threads=1", "optim.momentum=0.9", "optim.schedule=multistep", "optim.milestones=[100, 200]")
    other = start_recipe("fig9_dln_landscape.sh", data, results, *overrides)
    assert other.returncode == 2, other.stdout[-3000:] + other.stderr[-3000:]
    refused = [line for line in other.stderr.splitlines() if "holds a run of another config" in line]
    assert len(refused) == len(runs) and all(
        "(optim.milestones: [] -> [100, 200], optim.momentum: 0.0 -> 0.9, optim.schedule: 'constant' -> 'multistep')"
        in line for line in refused)
    [suggestion] = [line for line in other.stderr.splitlines() if "RESULTS=<another dir>" in line]
    assert shlex.split(suggestion.split("RESULTS=<another dir>")[1]) == [  # a command to paste, spaces and all
        str(REPO / "experiments" / "fig9_dln_landscape.sh"), "smoke", *overrides]
    assert "wrote" not in other.stdout
    assert figure.stat().st_mtime_ns == drawn and trained_runs(results) == runs
    assert not list(results.glob(".unfinished-jobs.*"))  # the recipe's list of such jobs goes with it


def test_a_recipe_whose_jobs_failed_names_them_and_draws_nothing(workspace, tmp_path):
    """Without its data set every job fails; the recipe used to exit 0 and draw the figure from whatever else
    lay in the results tree (the committed runs)."""
    _, results = workspace
    failed = start_recipe("fig1.sh", tmp_path / "no-data", results, "data.download=false")
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    listed = [line for line in failed.stderr.splitlines() if ": ended failed (DatasetNotFoundError: CIFAR-10 not found" in line]
    assert len(listed) == 4 and "run the recipe again" in failed.stderr
    assert "wrote" not in failed.stdout and not (results / "figures").exists()


FAKE_PYTHON = """\
import json, os, sys
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

with open(os.environ["FAKE_CALLS"], "a") as calls:
    print(json.dumps(sys.argv[1:]), file=calls)
for argument in sys.argv[1:]:
    if argument.startswith("+hydra.callbacks.unfinished_jobs.record=") and os.environ["FAKE_UNFINISHED"]:
        value = OverridesParser.create().parse_override(argument).value()  # the file as Hydra, then OmegaConf, read it
        with open(OmegaConf.create({"record": value}).record, "a") as record:
            print(os.environ["FAKE_UNFINISHED"], file=record)
"""


def fake_python(tmp_path: Path, unfinished: str = "", results: Path | None = None) -> dict:
    """An environment whose `python` records its arguments (one call per line in ``tmp_path/calls``, a JSON
    list) and trains nothing; given ``unfinished``, each sweep job reports that line to the recipe's record, as
    UnfinishedJobs does. The recipe's own logic (where each run goes, what it says) runs for real, at any scale,
    in no time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "fake_python.py").write_text(FAKE_PYTHON)
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / "fake_python.py"))} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_CALLS": str(tmp_path / "calls"),
            "FAKE_UNFINISHED": unfinished, "RESULTS": str(results or tmp_path / "results")}


def run_faked(recipe: str, env: dict) -> subprocess.CompletedProcess:
    """``experiments/<recipe> cpu`` under a ``fake_python`` environment, whatever its exit status."""
    return subprocess.run(["bash", str(REPO / "experiments" / recipe), "cpu"], capture_output=True, text=True, env=env)


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]


def sweep_dir(call: list[str]) -> str:
    """The directory Hydra, then OmegaConf, make of the sweep's ``hydra.sweep.dir`` override."""
    [override] = [argument for argument in call if argument.startswith("hydra.sweep.dir=")]
    return hydra_reads(override)


@pytest.mark.parametrize("recipe, sweeps, sets", [
    ("fig3_ics.sh", [("fig3_vgg", "cpu", "cifar10", "vgg"), ("fig3_dln", "paper", "gaussian_regression", "dln")],
     ["cpu-cifar10", "paper-gaussian_regression"]),
    ("is_fig1_mlp.sh", [("is_fig1", "paper", "mnist", "mlp")], ["paper-mnist"]),
])
def test_at_cpu_scale_a_recipe_shrinks_vgg_alone(tmp_path, recipe, sweeps, sets):
    """scale=cpu shrinks VGG only: the MLP and DLN runs are made, and stored, as the paper's runs."""
    result = run_faked(recipe, fake_python(tmp_path))
    assert result.returncode == 0, result.stderr
    *calls, figures = recorded_calls(tmp_path)
    r = tmp_path / "results"
    assert len(calls) == len(sweeps)
    for (experiment, scale, data, model), call in zip(sweeps, calls):
        assert call[1:5] == ["-m", f"+experiment={experiment}", f"scale={scale}", f"data={data}"]
        assert f"hydra.sweep.dir={r}/{scale}-{data}/{model}" in call  # as typed, where nothing needs quoting
    assert figures[figures.index("--runs"):] == ["--runs", *(f"{r}/{s}/" for s in sets), "--out", f"{r}/figures"]


@pytest.mark.parametrize("name", ["bnopt (1)/José's, results", 'q"uote\\/\\${x}\\'])
def test_a_recipe_gives_hydra_its_directories_whatever_their_names(tmp_path, name):
    """RESULTS (by default results/ in the clone) went to Hydra unquoted: a clone in "bnopt (1)" or under a home
    directory named José stopped every recipe with a Hydra parse error, and a comma made a sweep over two
    directories. Hydra, then OmegaConf, must read each directory back as it is named."""
    results = tmp_path / "tree" / name
    result = run_faked("fig3_ics.sh", fake_python(tmp_path, results=results))
    assert result.returncode == 0, result.stderr
    *calls, figures = recorded_calls(tmp_path)
    assert [sweep_dir(call) for call in calls] == [f"{results}/cpu-cifar10/vgg",
                                                   f"{results}/paper-gaussian_regression/dln"]
    assert figures[-4:] == [f"{results}/cpu-cifar10/", f"{results}/paper-gaussian_regression/", "--out",
                            f"{results}/figures"]
    result = run_faked("fig3_ics.sh", fake_python(tmp_path, unfinished="/runs/x: ended failed", results=results))
    assert result.returncode == 2 and "  /runs/x: ended failed\n" in result.stderr  # its jobs' record was read


def test_the_recipes_quote_a_directory_for_hydra_as_the_python_side_does(tmp_path):
    """experiments/common.sh's hydra_override is bnopt.cli.hydra_override in bash: the same word for every odd
    path (the Python one is checked against what Hydra and OmegaConf read back)."""
    paths = [*ODD_PATHS, *(f"runs/{path.lstrip('/')}" for path in ODD_PATHS), "/runs/\\\\${a}\\\"b\\"]
    script = f'source {shlex.quote(str(REPO / "experiments" / "common.sh"))} smoke; ' \
             'for path; do hydra_override hydra.sweep.dir "$path"; printf "\\0"; done'
    result = subprocess.run(["bash", "-c", script, "bash", *paths], capture_output=True, text=True,
                            env={**os.environ, "RESULTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\0")[:-1] == [hydra_override("hydra.sweep.dir", Path(path)) for path in paths]


@pytest.mark.parametrize("why, advice", [
    ("another process is training it", "Run the recipe again when the other process has ended"),
    ("holds a run of another config (optim.lr: 0.1 != 0.2)", "give runs of other overrides their own tree"),
    ("ended interrupted", "Mend what stopped them"),
])
def test_a_recipe_with_unfinished_jobs_says_what_to_do_about_them(tmp_path, why, advice):
    result = run_faked("fig12_lp_dln.sh", fake_python(tmp_path, unfinished=f"/runs/none_lr0.1_seed0: {why}"))
    assert result.returncode == 2 and f"  /runs/none_lr0.1_seed0: {why}" in result.stderr and advice in result.stderr
    assert len(recorded_calls(tmp_path)) == 1  # no figure drawn


@pytest.mark.parametrize("arguments, message", [
    (["smoke", "data=mnist"], "error: data=mnist: a recipe sets the experiments, models, data sets and scale itself"),
    (["smoke", "+experiment=fig2"], "error: +experiment=fig2: a recipe sets"),
    (["tiny"], "error: scale 'tiny' is none of cpu, paper, smoke"),
    (["smoke", "model=mlp"], "error: model=mlp: a recipe sets"),
    (["smoke", "scale=paper"], "error: scale=paper: a recipe sets"),
    (["smoke", "-m"], "error: -m: a recipe takes [scale] [overrides...] and --help, no other options"),
])
def test_a_recipe_refuses_arguments_that_would_place_runs_under_other_settings(tmp_path, arguments, message):
    result = subprocess.run(["bash", str(REPO / "experiments" / "fig1.sh"), *arguments], capture_output=True,
                            text=True, env={**os.environ, "RESULTS": str(tmp_path)})
    assert result.returncode == 2 and message in result.stderr and not list(tmp_path.glob("*-*"))


@pytest.mark.parametrize("recipe", ["all.sh", *RECIPES])
def test_a_recipe_says_how_to_use_it(recipe):
    arguments = ["--help"] if recipe != "fig9_dln_landscape.sh" else ["smoke", "threads=1", "-h"]  # anywhere
    result = subprocess.run(["bash", str(REPO / "experiments" / recipe), *arguments], capture_output=True, text=True)
    assert result.returncode == 0 and f"usage: experiments/{recipe} [scale" in result.stdout
    assert "Environment: VGG_DATA" in result.stdout


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

"""The README's Python examples run as printed: the library on a model this repo has never seen, and the
reading of runs on the committed results."""

import ast
import csv
import json
import re
import subprocess
import sys

import torch

from conftest import REPO


def readme_example(section: str = "## The measurements, as a library") -> str:
    """The first Python block of the README's ``section``."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(section):], re.S).group(1)


def test_readme_library_example_runs_on_a_foreign_model(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    rows = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{'layer'")]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[0]["l2"] == 0.0 and abs(rows[0]["cos"] - 1) < 1e-12  # no layer before the first: no shift
    assert rows[2]["l2"] > 0
    land = namespace["land"]
    assert len(land["loss"]) == len(land["grad_diff"]) == 4 and land["beta"] > 0
    assert isinstance(namespace["model"], torch.nn.Sequential)  # not one of bnopt's models


# What a training run needs and the measurements do not: the config system, data sets, tables and plots
# (not tqdm: torch itself imports it where it is installed).
NOT_FOR_THE_LIBRARY = ("hydra", "omegaconf", "torchvision", "pandas", "matplotlib")


def test_readme_library_example_imports_nothing_of_the_training_stack(tmp_path):
    """``bnopt.probes`` is a library for anyone's model: the README's example, run in a fresh interpreter,
    imports none of the training run's packages, so it runs where they are not installed."""
    script = tmp_path / "example.py"
    script.write_text(readme_example() + "import sys\nimport bnopt.probes.loop\n"
                      f"print(sorted({{m.partition('.')[0] for m in sys.modules}} & {set(NOT_FOR_THE_LIBRARY)!r}))\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{'layer': 2" in result.stdout and result.stdout.splitlines()[-1] == "[]"


def test_readme_results_example_prints_the_committed_runs_mean_losses(capsys, monkeypatch):
    """Its numbers against the committed runs' files read with the standard library alone: per
    normalisation, the mean over the seeds of lr 1e-6 of the first and the last logged training loss."""
    monkeypatch.chdir(REPO)
    exec(compile(readme_example("## Results: what every run writes"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = []
    for norm in ("batchnorm", "lp1", "lp2", "lpinf", "none"):
        firsts, lasts = [], []
        for run in sorted((REPO / "results/paper-gaussian_regression/dln").glob(f"{norm}_lr1e-06_seed*")):
            assert json.loads((run / "summary.json").read_text())["status"] == "completed"
            with open(run / "metrics.csv", newline="") as f:
                losses = [float(row["value"]) for row in csv.DictReader(f) if row["name"] == "train/loss"]
            firsts.append(losses[0])
            lasts.append(losses[-1])
        mean_first, mean_last = sum(firsts) / len(firsts), sum(lasts) / len(lasts)
        expected.append(f"{norm:9} {len(firsts)} seeds, training loss {mean_first:.4g} -> {mean_last:.4g}")
    assert printed == expected and "3 seeds" in expected[0]

"""Figures from a small synthetic results directory, the grouping logic, and runs that cannot be parsed."""

import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from bnopt.figures import (
    FIGURES, LABELS, Missing, curve, density_image, draw, fig_lr_sweep, measurement_spacing, result_sets,
    setting_note,
)
from bnopt.results import (Run, RunReadError, aggregate, completed, group_runs, load_runs, mixed_settings, read_metrics,
                           select, varying_keys)
from bnopt.rundir import METRICS_HEADER
from conftest import REPO, ascii_locale_env, assert_every_figure_drawn, compose_config

DATA = {"vgg": "fashion_mnist", "mlp": "fashion_mnist", "dln": "gaussian_regression"}


def fake_run(root: Path, model: str, norm: str, lr: float, seed: int = 0, steps: int = 300, diverge_at: int | None = None,
             experiment: str = "fig", probes: bool = True, scale: str = "cpu") -> Path:
    """A run directory in the results contract, with plausible values for every metric the figures read."""
    overrides = [f"model={model}", f"data={DATA[model]}", f"norm={norm}", f"optim.lr={lr}", f"seed={seed}",
                 f"scale={scale}", f"name={experiment}", f"train.steps={steps}"]
    overrides.append("probes=[ics,landscape,activations]" if probes else "probes=none")
    cfg = compose_config(*overrides)
    run_dir = root / f"{model}-{norm}-{lr}-{seed}-{experiment}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    rng = np.random.default_rng(seed)
    end = steps if diverge_at is None else diverge_at
    rows, histograms = [], []
    classification = model != "dln"
    for step in range(0, end, 10):
        progress = step / steps
        rows.append((step, "train/loss", 2.3 * (1 - 0.8 * progress) + 0.05 * rng.random(), "", ""))
        if classification:
            rows.append((step, "train/acc", 0.1 + 0.8 * progress + 0.02 * rng.random(), "", ""))
        if step % 50 == 0 and classification:
            rows += [(step, "test/loss", 2.0 - progress, "", ""), (step, "test/acc", 0.1 + 0.7 * progress, "", "")]
        if probes and step % 50 == 0:
            for layer in cfg.probes.ics.layers:
                rows += [(step, "ics/l2", rng.random() + 0.1, layer, ""), (step, "ics/cos", rng.random(), layer, "")]
            for eta in cfg.probes.landscape.etas:
                rows += [(step, "landscape/loss", 2.0 + eta * rng.random(), "", eta),
                         (step, "landscape/grad_diff", eta * (1 + rng.random()), "", eta)]
            rows += [(step, "landscape/beta", 1 + rng.random(), "", ""), (step, "landscape/grad_norm", 3.0, "", "")]
            for layer in cfg.probes.activations.layers:
                values = rng.normal(progress, 1 + progress, 400)
                for q in (15, 50, 85):
                    rows.append((step, f"act/q{q}", float(np.percentile(values, q)), layer, ""))
                rows += [(step, "act/mean", values.mean(), layer, ""), (step, "act/var", values.var(), layer, "")]
                counts, edges = np.histogram(values, bins=50)
                histograms.append((step, layer, counts, edges))
    text = METRICS_HEADER + "\n" + "".join(f"{s},{n},{float(v)!r},{lay},{e}\n" for s, n, v, lay, e in rows)
    (run_dir / "metrics.csv").write_text(text, encoding="utf-8")
    if histograms:
        np.savez_compressed(run_dir / "activations.npz", step=np.array([h[0] for h in histograms]),
                            layer=np.array([h[1] for h in histograms]), unit=np.zeros(len(histograms), int),
                            counts=np.array([h[2] for h in histograms]), edges=np.array([h[3] for h in histograms]))
    final = {name: value for _, name, value, layer, eta in rows if layer == "" and name.startswith(("train/", "test/"))}
    status = "completed" if diverge_at is None else "diverged"
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "steps": end, "final": final,
                                                      "metrics_rows": len(rows)}))
    return run_dir


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for norm, lr in [("none", 0.1), ("batchnorm", 0.1), ("none", 0.5), ("batchnorm", 0.5), ("none", 0.01),
                     ("batchnorm", 0.01), ("noisy_batchnorm", 0.1), ("lp1", 0.1), ("lp2", 0.1), ("lpinf", 0.1)]:
        fake_run(root / "cpu-fashion_mnist" / "vgg", "vgg", norm, lr, diverge_at=120 if lr == 0.5 and norm == "none" else None)
    for seed in (0, 1):
        for norm, lr in [("none", 1e-6), ("batchnorm", 1e-6), ("none", 1e-7), ("batchnorm", 1e-7), ("lp1", 1e-6),
                         ("lp2", 1e-6), ("lpinf", 1e-6)]:
            fake_run(root / "paper-gaussian_regression" / "dln", "dln", norm, lr, seed=seed)
    for norm in ("none", "batchnorm"):
        fake_run(root / "paper-fashion_mnist" / "mlp", "mlp", norm, 0.5)
        for lr, model in [(0.1, "vgg"), (1.0, "vgg"), (1e-6, "dln"), (1e-5, "dln"), (0.5, "mlp"), (5.0, "mlp")]:
            for seed in (0, 1):
                fake_run(root / "sweeps" / model, model, norm, lr, seed=seed, steps=100, experiment=f"lr_sweep_{model}",
                         probes=False, diverge_at=30 if (lr in (1.0, 1e-5, 5.0) and norm == "none") else None)
    return root


@pytest.fixture(scope="module")
def all_runs(results) -> list[Run]:
    """Every run of the results directory, read once for the tests that only read them."""
    return load_runs([results])


@pytest.mark.parametrize("key", list(FIGURES))
def test_every_figure_draws_from_a_results_directory(all_runs, tmp_path, key):
    messages = []
    written = draw(key, all_runs, tmp_path, warn=messages.append)
    assert written, messages
    for png in written:
        assert png.stat().st_size > 10_000 and png.with_suffix(".pdf").exists()
    assert not [m for m in messages if "missing" in m], messages


def test_a_redrawn_figure_is_the_same_file(all_runs, tmp_path):
    """A recipe that finds its runs finished redraws the committed figures: byte for byte the same, so git
    shows no change (a PDF would otherwise carry the time it was drawn)."""
    (first,) = draw("2", all_runs, tmp_path / "a")
    (second,) = draw("2", all_runs, tmp_path / "b")
    for suffix in (".png", ".pdf"):
        assert first.with_suffix(suffix).read_bytes() == second.with_suffix(suffix).read_bytes()
    assert b"/CreationDate" not in first.with_suffix(".pdf").read_bytes()


def test_a_figures_title_names_every_protocol_setting_its_runs_leave(tmp_path):
    """Runs at the protocol's settings get the data set, scale and size alone; each setting a run leaves by a
    config value is named with the values the runs take, and with how many of them take one where not all
    do, so a figure cannot pass for the paper's setting, nor its runs for runs of one setting."""
    def run_of(*overrides):
        config = compose_config("scale=cpu", "probes=none", *overrides)
        return Run(tmp_path, OmegaConf.to_container(config, resolve=True), pd.DataFrame(), {})

    vgg = ("model=vgg", "data=fashion_mnist")
    assert setting_note([run_of(*vgg), run_of(*vgg, "seed=1")]) == ("fashion_mnist; scale=cpu; VGG-16 width 0.125, "
                                                                    "3000 steps; paper: CIFAR-10")
    assert setting_note([run_of("+experiment=dln_bn"), run_of("+experiment=dln_bn", "norm=lp2")]) == (
        "gaussian_regression; scale=cpu")
    left = [run_of(*vgg, "data.normalise=none", "norm=noisy_batchnorm", "norm.noise.train_only=false"),
            run_of(*vgg, "optim.momentum=0.9"), run_of(*vgg, "optim.momentum=0.5", "norm=lp1", "norm.norm_of=centred")]
    assert setting_note(left).endswith("paper: CIFAR-10; data.normalise=none (1 of 3 runs); norm.norm_of=centred "
                                       "(1 of 3 runs); norm.noise.train_only=False (1 of 3 runs); "
                                       "optim.momentum=0.5/0.9 (2 of 3 runs)")
    assert setting_note([run_of("+experiment=dln_bn", "data.x_std=2.0", "model.norm_after_last=true")]) == (
        "gaussian_regression; scale=cpu; data.x_std=2.0; model.norm_after_last=True")


def test_missing_runs_are_named_and_the_rest_is_drawn(all_runs, tmp_path):
    runs = [r for r in all_runs if not (r.get("model.name") == "vgg" and r.get("norm.name") == "none")]
    messages = []
    written = draw("1", runs, tmp_path, warn=messages.append)
    assert written and written[0].name == "fig1.png"
    assert any("missing" in m and "VGG" in m and "norm.name=none" in m for m in messages), messages
    assert draw("8", [r for r in runs if r.get("model.name") != "dln"], tmp_path, warn=messages.append) == []
    assert any("no runs of dln" in m for m in messages)


def test_a_figure_that_found_none_of_its_runs_is_not_written(results, tmp_path):
    """Fig. 8 needs the DLN with BN: from unnormalised DLN runs alone it is not drawn, a figure drawn before
    stays as it was, and make_figures.py exits 1 (a recipe must not go on); Fig. 9, which found some of its
    runs, is drawn and names the others."""
    unnormalised = str(results / "paper-gaussian_regression" / "dln" / "dln-none-*")
    messages = []
    assert draw("9", load_runs([unnormalised]), tmp_path, warn=messages.append) == [tmp_path / "fig9.png"]
    assert messages == ["fig 9 [cpu-gaussian_regression]: missing DLN (norm.name=batchnorm, optim.lr=1e-06)"]
    drawn_before = tmp_path / "fig8.png"
    drawn_before.write_bytes(b"a good figure")
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "8", "--runs", unnormalised,
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fig 8 [cpu-gaussian_regression]: none of the runs it needs" in result.stderr
    assert "wrote" not in result.stdout
    assert drawn_before.read_bytes() == b"a good figure" and not (tmp_path / "fig8.pdf").exists()


def test_an_image_of_a_two_image_figure_that_found_none_of_its_runs_is_not_written(results, tmp_path):
    """Fig. 3 draws the VGG and the DLN as two images from one lookup: with its VGG runs and only DLN runs it
    does not use (Lp norms), the VGG image is drawn and the DLN image, which would be empty, is not."""
    runs = load_runs([results / "cpu-fashion_mnist", str(results / "paper-gaussian_regression" / "dln" / "dln-lp*")])
    messages = []
    assert draw("3", runs, tmp_path, warn=messages.append) == [tmp_path / "fig3_a.png"]
    assert messages[-1] == "fig 3_b [cpu-fashion_mnist+cpu-gaussian_regression]: no panel has data; not drawn"
    assert not (tmp_path / "fig3_b.pdf").exists()


@pytest.mark.parametrize("key", ["3", "10", "13"])
@pytest.mark.parametrize("present, absent", [("vgg", "dln"), ("dln", "vgg")])
def test_a_figure_of_two_models_draws_the_one_it_has(all_runs, tmp_path, key, present, absent):
    """Figs. 3, 10 and 13 show the VGG and the DLN: with the runs of one (``make_figures.py 3 --runs
    results/runs/fig3_vgg``), its panels are drawn and the other's are named as missing."""
    messages = []
    written = draw(key, select(all_runs, model__name=present), tmp_path, warn=messages.append)
    assert written and all(path.stat().st_size for path in written)
    assert messages and all("missing" in m or "no panel has data" in m for m in messages), messages
    missing = "; ".join(m for m in messages if "missing" in m)
    assert f"{absent.upper()} (norm.name=" in missing and f"{present.upper()} (" not in missing, messages
    plt.close("all")


def test_a_measurement_without_finite_values_is_left_out_of_the_density_image(tmp_path):
    run_dir = fake_run(tmp_path, "dln", "batchnorm", 1e-6)
    clean_ax, with_nan_ax = plt.figure().gca(), plt.figure().gca()
    assert density_image(clean_ax, load_runs([run_dir]), 1, "clean")
    path = run_dir / "activations.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    # what the probe writes when every value of the unit was NaN or inf (a diverging run's last step)
    arrays["step"], arrays["layer"] = np.append(arrays["step"], 10_000), np.append(arrays["layer"], 1)
    arrays["unit"] = np.append(arrays["unit"], 0)
    arrays["counts"] = np.vstack([arrays["counts"], np.zeros((1, arrays["counts"].shape[1]), dtype=int)])
    arrays["edges"] = np.vstack([arrays["edges"], np.full((1, arrays["edges"].shape[1]), np.nan)])
    np.savez_compressed(path, **arrays)
    assert density_image(with_nan_ax, load_runs([run_dir]), 1, "with a NaN row")
    clean, with_nan = clean_ax.get_images()[0], with_nan_ax.get_images()[0]
    assert np.array_equal(clean.get_array(), with_nan.get_array()) and clean.get_extent() == with_nan.get_extent()
    plt.close("all")


def test_a_distribution_narrower_than_one_cell_of_the_density_image_still_shows(tmp_path):
    """The image's cells span the spread of all measurements; one measurement much narrower than a cell (an
    unnormalised layer at step 0: 0.01 wide, against cells of 0.06 in our Fig. 14) used to fall between the
    cells' centres and show as an empty column. Its mass now fills the cell that holds it."""
    run_dir = fake_run(tmp_path, "dln", "batchnorm", 1e-6)
    path = run_dir / "activations.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    first = np.flatnonzero(arrays["layer"] == 1)[0]
    arrays["edges"][first] = np.linspace(-0.005, 0.005, arrays["edges"].shape[1])
    np.savez_compressed(path, **arrays)
    ax = plt.figure().gca()
    assert density_image(ax, load_runs([run_dir]), 1, "narrow first")
    image = np.asarray(ax.get_images()[0].get_array())
    _, _, low, high = ax.get_images()[0].get_extent()
    grid = np.linspace(low, high, image.shape[0] + 1)
    assert (image.max(axis=0) == 1).all()  # every measurement shows, each scaled to its own peak
    assert image[np.searchsorted(grid, 0.0) - 1, 0] == 1  # the narrow one, in the cell holding its values
    plt.close("all")


def test_one_figure_per_result_set(all_runs, tmp_path):
    extra = fake_run(tmp_path / "smoke", "vgg", "batchnorm", 0.1)
    more = load_runs([extra])
    assert more[0].get("scale.name") == "cpu"  # same set as the others: one figure
    paper = tmp_path / "paper"
    fake_run(paper, "vgg", "none", 0.1)
    (paper / "vgg-none-0.1-0-fig" / "config.yaml").write_text(
        (paper / "vgg-none-0.1-0-fig" / "config.yaml").read_text().replace("name: cpu", "name: paper"))
    written = draw("4", all_runs + load_runs([paper]), tmp_path / "out", warn=lambda m: None)
    assert sorted(p.name for p in written) == ["fig4_cpu-fashion_mnist.png", "fig4_paper-fashion_mnist.png"]


def test_every_result_set_gets_its_learning_rate_figure_and_report_tables(results, tmp_path, monkeypatch):
    """A second VGG set (paper scale) next to the fixture's: the learning-rate figure is drawn once per
    combination of sets, each from its own runs, and the report has a table for each set."""
    paper = tmp_path / "paper"
    for norm in ("none", "batchnorm"):
        fake_run(paper, "vgg", norm, 0.3, steps=100, experiment="lr_sweep_vgg", probes=False, scale="paper")
    fake_run(paper, "vgg", "batchnorm", 0.1, scale="paper")
    runs = load_runs([results, paper])
    drawn_from = []

    def recording(sets, missing):
        drawn_from.append({model: sorted(r.path.name for r in chosen) for model, chosen in sets.items()})
        return fig_lr_sweep(sets, missing)

    monkeypatch.setitem(FIGURES, "lr_sweep", dataclasses.replace(FIGURES["lr_sweep"], draw=recording))
    written = draw("lr_sweep", runs, tmp_path / "out", warn=lambda m: None)
    # the label names each set once, the unlabelled models' sets in order (DLN, then MLP)
    assert [p.name for p in written] == [
        "figlr_sweep_cpu-fashion_mnist+cpu-gaussian_regression.png",
        "figlr_sweep_paper-fashion_mnist+cpu-gaussian_regression+cpu-fashion_mnist.png"]
    sets = {m: {name: sorted(r.path.name for r in chosen) for name, chosen in result_sets(runs, m, True).items()}
            for m in ("vgg", "dln", "mlp")}
    assert drawn_from == [{"vgg": sets["vgg"][vgg], "dln": sets["dln"]["cpu-gaussian_regression"],
                           "mlp": sets["mlp"]["cpu-fashion_mnist"]}
                          for vgg in ("cpu-fashion_mnist", "paper-fashion_mnist")]

    report = report_module()
    sweep, training = report.lr_sweep(runs), report.vgg_training(runs)
    for name in ("cpu-fashion_mnist", "paper-fashion_mnist"):
        assert f"**Learning-rate sweep, VGG** ({name})" in sweep and f"**VGG training** ({name})" in training
    assert "| BatchNorm | 0.3 | 0/1 |" in sweep.split("(paper-fashion_mnist)")[1]


def test_final_values_come_from_completed_runs_alone(tmp_path):
    """An interrupted, failed or still running run's last values are from partway through training: they
    were averaged into the report's final values and the learning-rate figure as if trained."""
    for seed in (0, 1, 2):
        fake_run(tmp_path, "dln", "batchnorm", 1e-6, seed=seed, steps=100, experiment="lr_sweep_dln", probes=False)
        fake_run(tmp_path, "dln", "batchnorm", 1e-6, seed=seed, steps=100)
        fake_run(tmp_path, "vgg", "batchnorm", 0.1, seed=seed, steps=100)
    fake_run(tmp_path, "vgg", "batchnorm", 0.05, steps=100)  # an lr no table shows: no note names it
    for partway in [*tmp_path.glob("*-2-*"), *tmp_path.glob("*-0.05-*")]:  # stopped at step 40, loss 50, acc 0.01
        summary = json.loads((partway / "summary.json").read_text())
        final = {"train/loss": 50.0, **({"train/acc": 0.01, "test/acc": 0.01} if "vgg" in partway.name else {})}
        (partway / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "steps": 40,
                                                          "final": final}))
        metrics = read_metrics(partway / "metrics.csv")
        metrics.loc[metrics.name.isin(list(final)), "value"] = metrics.name.map(final)
        metrics.to_csv(partway / "metrics.csv", index=False)
    runs = load_runs([tmp_path])
    report = report_module()
    trained = [r for r in runs if r.status == "completed"]

    def mean_of(metric, **conditions):
        values = [r.summary["final"][metric] for r in select(trained, **conditions)]
        return f"{np.mean(values):.3g} ({min(values):.3g}–{max(values):.3g})"

    assert f"| BatchNorm | 1e-06 | 0/3 | {mean_of('train/loss', name='lr_sweep_dln')} |" in report.lr_sweep(runs)
    assert f"| BatchNorm | {mean_of('train/loss', name='fig', model__name='dln')} |" in report.dln_losses(runs)
    assert f"| {mean_of('test/acc', model__name='vgg')} | completed, interrupted |" in report.vgg_training(runs)
    for section in (report.lr_sweep, report.dln_losses, report.vgg_training):
        assert "1 run(s) not finished (interrupted 1) are left out of the final values" in section(runs)

    missing = Missing()
    sweep = select(runs, name="lr_sweep_dln")
    (points,) = [c.lines[0] for c in fig_lr_sweep({"dln": sweep}, missing).axes[0].containers]
    assert list(points.get_ydata()) == [np.mean([r.summary["final"]["train/loss"] for r in select(trained, name="lr_sweep_dln")])]
    assert missing.items == ["DLN lr sweep no norm (norm.name=none)", f"DLN lr sweep BatchNorm: 1 run(s) not finished (interrupted 1) are left out of the final "
                             f"values: {select(sweep, seed=2)[0].path}"]
    plt.close("all")


def test_runs_of_mixed_settings_are_named_where_they_are_averaged_as_seeds(all_runs, tmp_path, monkeypatch):
    """A curve or a table cell averages runs as seeds of one setting. A run of another setting among them
    (momentum, here) or one counted twice (a copy) was averaged in without a word, and the figure's title
    named the odd run's setting as if every run had it."""
    dln = [r for r in all_runs if r.get("model.name") == "dln" and r.get("name") == "fig"]
    bn = select(dln, norm__name="batchnorm", optim__lr=1e-6)  # seeds 0 and 1
    assert mixed_settings(bn) == ""

    def variant(path: str, **changes) -> Run:
        config = copy.deepcopy(bn[0].config)
        for key, value in changes.items():
            *parents, last = key.split("__")
            node = config
            for parent in parents:
                node = node[parent]
            node[last] = value
        return dataclasses.replace(bn[0], path=tmp_path / path, config=config)

    # what does not change the training (the probes observe; logging decides which steps have values)
    observed = variant("observed", seed=3, probes=None, train__log_every=7)
    momentum = variant("momentum", seed=2, optim__momentum=0.9)
    copied = variant("copied")
    assert mixed_settings([*bn, observed]) == ""
    assert mixed_settings([*bn, momentum]) == "its 3 runs differ in optim.momentum"
    assert mixed_settings([*bn, copied]) == "its 3 runs hold seed 0 more than once"
    sweep = select(all_runs, name="lr_sweep_dln", norm__name="batchnorm")  # two lrs, two seeds each
    assert mixed_settings(sweep, over=("seed", "optim.lr")) == "" != mixed_settings(sweep)

    texts, messages = [], []
    real_text = plt.Figure.text
    monkeypatch.setattr(plt.Figure, "text", lambda fig, x, y, s, **kw: texts.append(s) or real_text(fig, x, y, s, **kw))
    assert draw("12", [*all_runs, momentum], tmp_path / "figs", warn=messages.append)
    mixed = "averaged as seeds, although DLN (norm.name=batchnorm, optim.lr=1e-06): its 3 runs differ in optim.momentum"
    assert [m for m in messages if "averaged" in m] == [f"fig 12 [cpu-gaussian_regression]: {mixed}"]
    title, note = texts  # the suptitle is a figure text as well
    assert note == mixed and "optim.momentum=0.9 (1 of 15 runs)" in title  # on the image too
    report = report_module()
    assert ("BatchNorm: summarised over seed, although its 3 runs differ in optim.momentum."
            in report.dln_losses([*all_runs, momentum]))
    assert "summarised over" not in "".join(section(all_runs) for section in report.SECTIONS)
    plt.close("all")


def test_the_report_reads_runs_just_started_or_stopped_partway(tmp_path):
    """A run killed as it started has no rows yet (report.py failed on it with an IndexError); a median over
    training from a run stopped partway is over another span (it went into the ICS and landscape tables
    unnamed); a seed that never reached 90% dropped out of "steps to 90%" without a word, and one still
    training is not yet one that never reaches it. A set without the DLN's lr 1e-6 says so in its table."""
    for seed in (0, 1, 2):
        fake_run(tmp_path, "dln", "batchnorm", 1e-6, seed=seed, steps=100)
        fake_run(tmp_path, "vgg", "batchnorm", 0.1, seed=seed, steps=100)
    started = next(tmp_path.glob("dln-batchnorm-*-1-fig"))
    (started / "metrics.csv").write_text(METRICS_HEADER + "\n")
    (started / "summary.json").write_text(json.dumps({"status": "running", "steps": 0}))
    stopped = next(tmp_path.glob("dln-batchnorm-*-2-fig"))
    (stopped / "summary.json").write_text(json.dumps({"status": "interrupted", "steps": 40}))
    for seed, accuracy in ((0, 0.95), (1, 0.5), (2, 0.5)):  # seed 0 reaches 90% at step 40, the others never
        run_dir = next(tmp_path.glob(f"vgg-batchnorm-*-{seed}-fig"))
        metrics = read_metrics(run_dir / "metrics.csv")
        metrics.loc[metrics.name == "train/acc", "value"] = accuracy
        metrics.to_csv(run_dir / "metrics.csv", index=False)
    still_training = next(tmp_path.glob("vgg-batchnorm-*-2-fig"))
    (still_training / "summary.json").write_text(json.dumps({"status": "running", "steps": 100}))
    runs = load_runs([tmp_path])
    report = report_module()
    dln = report.dln_losses(runs)
    assert "(cpu-gaussian_regression, lr 1e-6, 100 steps;" in dln and "| completed, interrupted, running |" in dln
    (complete,) = completed(select(runs, model__name="dln"))
    ics = report.ics(runs)
    median = complete.series("ics/l2", 9).median()
    assert f"| BatchNorm | 1e-06 | #9 | {median:.3g} |" in ics  # seed 0's alone
    assert ("2 run(s) not finished (interrupted 1, running 1) are left out of BatchNorm, lr 1e-06's medians"
            in ics)
    assert "are left out of BatchNorm's medians" in report.landscape(runs)
    assert "| BatchNorm | 0.1 | 40 (not reached by 1 of 2 finished runs) |" in report.vgg_training(runs)
    only_still_training = [r for r in runs if r.path == still_training]
    assert "| BatchNorm | 0.1 | not reached yet |" in report.vgg_training(only_still_training)
    other_lr = fake_run(tmp_path / "other", "dln", "batchnorm", 1e-7, seed=0, steps=100)
    assert report.dln_losses(load_runs([other_lr.parent])) == (
        "**DLN final training loss** (cpu-gaussian_regression): no runs at lr 1e-6.")


def test_the_learning_rate_figure_of_one_model_has_its_column_alone(results):
    sweep = load_runs([results / "sweeps" / "dln"])
    missing = Missing()
    fig = fig_lr_sweep({"vgg": [], "dln": sweep, "mlp": []}, missing)
    assert missing.items == ["VGG lr sweep (no runs)", "MLP lr sweep (no runs)"]  # named in the warning
    assert [ax.get_title() for ax in fig.axes] == ["DLN: final training loss (mean, min-max over seeds)",
                                                   "DLN: final training accuracy"]  # empty VGG and MLP columns
    assert " | " not in fig._suptitle.get_text()
    plt.close(fig)


def test_a_runs_path_is_taken_as_written_where_it_exists(results, tmp_path):
    """"[v2]" in a directory's name is a glob character class: the directory read as missing."""
    import shutil

    shutil.copytree(results / "sweeps" / "dln", tmp_path / "sweep [v2]")
    messages = []
    assert len(load_runs([tmp_path / "sweep [v2]"], warn=messages.append)) == 8 and not messages


def test_lr_sweep_draws_accuracy_only_for_classification(results):
    runs = load_runs([results / "sweeps"])
    fig = fig_lr_sweep({m: select(runs, model__name=m) for m in ("vgg", "dln", "mlp")}, Missing())
    (vgg_loss, dln_loss, _), (vgg_acc, dln_acc, mlp_acc) = fig.axes[:3], fig.axes[3:6]
    assert vgg_acc.has_data() and mlp_acc.has_data() and dln_loss.has_data()
    assert not dln_acc.has_data() and not dln_acc.axison  # the regression has no accuracy to draw
    diverged = [line for line in vgg_loss.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in diverged] == [[1.0]]  # only the unnormalised net at lr 1
    plt.close(fig)


# --- grouping ------------------------------------------------------------------------------------------


def test_grouping_finds_what_varies_and_aggregates_seeds(results):
    dln = select(load_runs([results / "paper-gaussian_regression"]), norm__name=["none", "batchnorm"], optim__lr=1e-6)
    assert len(dln) == 4
    # the norm and its own fields (none has no eps or momentum), and the seed
    assert varying_keys(dln) == ["norm.eps", "norm.kind", "norm.momentum", "norm.name", "seed"]
    placed = [Run(Path(str(k)), {"data": {"root": root, "download": k == 0, "search_paths": [root]}, "seed": k},
                  pd.DataFrame()) for k, root in enumerate(("data", "/scratch"))]
    assert varying_keys(placed) == ["seed"]  # where the data lives is no setting of a run
    groups = group_runs(dln, ["norm.name"])
    assert list(groups) == [("batchnorm",), ("none",)] and all(len(g) == 2 for g in groups.values())
    stats = aggregate([r.series("train/loss") for r in groups[("none",)]])
    both = pd.concat([r.series("train/loss") for r in groups[("none",)]], axis=1)
    assert np.allclose(stats["mean"], both.mean(axis=1)) and (stats["min"] <= stats["max"]).all()
    assert select(dln, optim__lr=1.0000000001e-6) == dln  # floats match to rounding
    assert select(dln, optim__lr=1e-7) == []


def test_aggregate_averages_the_shared_steps_and_diverged_runs_up_to_where_they_stopped():
    a = pd.Series([1.0, 2.0, 3.0], index=[0, 10, 20])
    b = pd.Series([3.0, 5.0], index=[0, 10])
    # b interrupted (or still training) after step 10: the mean ends there instead of going on over a alone
    shared = aggregate([a, b])
    assert shared.index.tolist() == [0, 10] and shared["n"].tolist() == [2, 2]
    assert shared["mean"].tolist() == [2.0, 3.5]
    # b diverged after step 10: it has ended for good, and a goes on alone
    stats = aggregate([a, b], diverged=[False, True])
    assert stats["n"].tolist() == [2, 2, 1] and stats["mean"].tolist() == [2.0, 3.5, 3.0]
    skewed = aggregate([a, b, pd.Series([8.0], index=[0])], diverged=[False, True, True])  # the mean, not the median
    assert skewed.loc[0].tolist() == [4.0, 1.0, 8.0, 3]


def test_a_diverged_runs_mark_is_where_it_stopped_when_another_run_logged_nothing():
    def run(status: str, last_step: int | None, offset: float) -> Run:
        steps = [] if last_step is None else range(0, last_step + 1, 100)
        rows = [(s, "train/loss", offset + s / 100, "", "") for s in steps]
        return Run(Path("."), {}, pd.DataFrame(rows, columns=METRICS_HEADER.split(",")), {"status": status})

    failed, diverged, completed = run("failed", None, 0.0), run("diverged", 200, 50.0), run("completed", 1000, 0.0)
    ax = plt.figure().gca()
    curve(ax, [failed, diverged, completed], "train/loss", "C0", "BN")
    (mark,) = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert mark.get_xdata().tolist() == [200] and mark.get_ydata().tolist() == [52.0]
    # the diverged run counts up to step 200, the completed one alone after it
    assert lines_of(ax)["BN"].get_ydata().tolist() == [25.0, 26.0, 27.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    # a probe's last values before a divergence are often inf or NaN, which draw no mark: at the step where
    # the run stopped, at its last finite value
    for last in (float("nan"), float("inf")):
        overflowed = run("diverged", 200, 50.0)
        overflowed.metrics.loc[overflowed.metrics.step >= 100, "value"] = last
        ax = plt.figure().gca()
        curve(ax, [overflowed], "train/loss", "C0", "BN")
        (mark,) = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert mark.get_xdata().tolist() == [200] and mark.get_ydata().tolist() == [50.0]
    plt.close("all")


# --- files that cannot be parsed -----------------------------------------------------------------------


def test_metrics_reader_drops_an_unfinished_last_line_and_refuses_garbage(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_HEADER + "\n0,train/loss,2.3,,\n10,train/loss,2.1,,\n20,train/lo")
    assert read_metrics(path).step.tolist() == [0, 10]
    path.write_text("step,name,value\n0,train/loss,2.3\n")
    with pytest.raises(RunReadError, match="metrics.csv: not a metrics file"):
        read_metrics(path)
    path.write_text(METRICS_HEADER + "\n0,train/loss,abc,,\n")
    with pytest.raises(RunReadError, match="metrics.csv: malformed rows"):
        read_metrics(path)


def test_make_figures_names_and_skips_runs_it_cannot_parse(results, tmp_path):
    broken = tmp_path / "broken"
    good = fake_run(broken, "vgg", "batchnorm", 0.1)
    truncated = fake_run(broken, "vgg", "none", 0.1)
    (truncated / "metrics.csv").write_text(METRICS_HEADER + "\n0,train/acc,oops,,\n")
    no_config = fake_run(broken, "vgg", "none", 0.5)
    (no_config / "config.yaml").unlink()
    bad_yaml = fake_run(broken, "vgg", "lp1", 0.1)
    (bad_yaml / "config.yaml").write_text("model: [unclosed\n")
    cut = fake_run(broken, "vgg", "lp2", 0.1)  # copied short at a line's end: every row left is well-formed
    lines = (cut / "metrics.csv").read_text().splitlines(keepends=True)
    (cut / "metrics.csv").write_text("".join(lines[:-7]))
    older = fake_run(broken, "vgg", "lpinf", 0.1)  # a summary from before the count was kept: read as it is
    summary = json.loads((older / "summary.json").read_text())
    (older / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "metrics_rows"}))
    not_an_object = fake_run(broken, "vgg", "noisy_batchnorm", 0.1)
    (not_an_object / "summary.json").write_text("[]")  # read as no summary, as a missing one is
    latin1 = fake_run(broken, "vgg", "batchnorm", 0.1, seed=1)  # by a bnopt that wrote in a Latin-1 locale's encoding
    utf8 = (latin1 / "config.yaml").read_bytes()
    (latin1 / "config.yaml").write_bytes(utf8.replace(b"\nname: fig\n", "\nname: réseau\n".encode("latin-1")))
    assert (latin1 / "config.yaml").read_bytes() != utf8
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "1", "--runs", str(broken),
                             "--out", str(tmp_path / "figs")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"skipping {truncated / 'metrics.csv'}: malformed rows" in result.stderr
    assert f"skipping {no_config / 'config.yaml'}: missing" in result.stderr
    assert f"skipping {bad_yaml / 'config.yaml'}: not valid YAML" in result.stderr
    assert f"skipping {latin1 / 'config.yaml'}: not UTF-8 text (byte " in result.stderr  # it stopped the script
    assert f"skipping {cut / 'metrics.csv'}: {len(lines) - 8} rows where the run, completed, wrote {len(lines) - 1}: " \
           f"part of its record is lost (a copy cut short?); move the run away and run its command again" \
           in result.stderr
    assert "3 runs read" in result.stdout and (tmp_path / "figs" / "fig1.png").exists()
    assert good.exists()


def test_a_runs_path_without_runs_is_named(results, tmp_path):
    (tmp_path / "empty").mkdir()
    messages = []
    runs = load_runs([results / "sweeps", tmp_path / "empty", tmp_path / "mistyped", str(tmp_path / "nothing*")],
                     warn=messages.append)
    assert runs and [r.path for r in runs] == [r.path for r in load_runs([results / "sweeps"], warn=messages.append)]
    assert messages == [f"{tmp_path / 'empty'}: no runs at or below it",
                        f"{tmp_path / 'mistyped'}: no such file or directory",
                        f"{tmp_path / 'nothing*'}: no such file or directory"]
    drawn = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "1", "--runs", str(tmp_path / "empty"),
                            "--out", str(tmp_path / "figs")], capture_output=True, text=True)
    assert drawn.returncode == 1 and f"{tmp_path / 'empty'}: no runs at or below it" in drawn.stderr
    assert not (tmp_path / "figs" / "fig1.png").exists()


def test_the_report_names_the_code_and_machines_behind_each_result_set(tmp_path):
    """Counted from each run's summary: its history where it keeps one (a run resumed with other code or on
    another machine counts under each, once per commit however often it returned to it), the single
    commit and machine of an older summary, "unknown" without one; a GPU by its kind, not its index."""
    epyc = {"device": "cpu", "device_name": "AMD EPYC (AVX2)", "threads": 2, "torch": "2.14.1"}
    h200 = {"device": "cuda:1", "device_name": "NVIDIA H200", "threads": 1, "torch": "2.15.0"}
    a, b = "a" * 40, "b" * 40
    summaries = {
        ("dln", 0): {"git_commits": [[0, a], [10, b + "-dirty"], [20, a]], "machines": [[0, epyc], [10, h200]]},
        ("dln", 1): {"git_commit": a, **epyc},  # written before the summaries kept histories
        ("dln", 2): None,  # killed before its first summary
        ("vgg", 0): {"git_commits": [[0, b]], "machines": [[0, {**h200, "device": "cuda:0"}]]},
    }
    for (model, seed), summary in summaries.items():
        run_dir = fake_run(tmp_path, model, "batchnorm", 1e-6 if model == "dln" else 0.1, seed=seed, steps=100)
        if summary is None:
            (run_dir / "summary.json").unlink()
        else:
            stored = json.loads((run_dir / "summary.json").read_text())
            (run_dir / "summary.json").write_text(json.dumps({**stored, **summary}))
    runs = load_runs([tmp_path])
    (resumed,) = [r for r in runs if r.get("seed") == 0 and r.get("model.name") == "dln"]
    assert resumed.commits == [(0, a), (10, b + "-dirty"), (20, a)]
    assert resumed.machines == [(0, "cpu (AMD EPYC (AVX2)), 2 threads, torch 2.14.1"),
                                (10, "cuda (NVIDIA H200), 1 thread, torch 2.15.0")]
    provenance = report_module().provenance(runs)
    assert ("| cpu-gaussian_regression | 3 | aaaaaaa (2); bbbbbbb-dirty (1); unknown (1) | "
            "cpu (AMD EPYC (AVX2)), 2 threads, torch 2.14.1 (2); cuda (NVIDIA H200), 1 thread, torch 2.15.0 (1); "
            "unknown (1) |") in provenance
    assert "| cpu-fashion_mnist | 1 | bbbbbbb (1) | cuda (NVIDIA H200), 1 thread, torch 2.15.0 (1) |" in provenance
    assert "A commit marked -dirty ran with uncommitted changes" in provenance
    assert f"1 run(s) resumed with other code or on another machine count under each: {resumed.path}" in provenance
    clean = [r for r in runs if r is not resumed]
    assert "-dirty" not in report_module().provenance(clean) and "resumed" not in report_module().provenance(clean)


def test_report_without_runs_says_so_and_fails(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/report.py"), "--runs", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "error: no runs read" in result.stderr and result.stdout == ""


def test_runs_are_read_and_the_report_printed_in_utf8_under_an_ascii_locale(tmp_path):
    """A run's files are UTF-8 (as Hydra writes ``.hydra/``) and the report is printed in UTF-8, whatever the
    locale: under one whose encoding is ASCII, report.py stopped with a UnicodeDecodeError on a run whose config
    holds a non-ASCII value, and with a UnicodeEncodeError on its own "‖" and "β"."""
    run = fake_run(tmp_path / "cpu-fashion_mnist" / "vgg", "vgg", "batchnorm", 0.1, experiment='"réseau"')
    assert "name: réseau" in (run / "config.yaml").read_text(encoding="utf-8")
    report = subprocess.run([sys.executable, str(REPO / "scripts/report.py"), "--runs", str(tmp_path)],
                            capture_output=True, env=ascii_locale_env())
    assert report.returncode == 0 and not report.stderr, report.stderr.decode(errors="replace")
    assert "| variant | lr | layer | ‖G − G'‖₂ | cos(G, G') |" in report.stdout.decode("utf-8")


def test_make_figures_lists_figures_and_refuses_unknown_ones():
    listing = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "--list"], capture_output=True,
                             text=True)
    assert listing.returncode == 0 and "lr_sweep" in listing.stdout and "is1" in listing.stdout
    unknown = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "99"], capture_output=True,
                             text=True)
    assert unknown.returncode == 2 and "unknown figure '99'" in unknown.stderr


def test_report_prints_a_table_per_claim(results):
    result = subprocess.run([sys.executable, str(REPO / "scripts/report.py"), "--runs", str(results)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for heading in ("**VGG training**", "**Activation moments**", "**ICS, VGG**", "**ICS, DLN**",
                    "**Landscape along the gradient, VGG**", "**DLN final training loss**", "**MLP**",
                    "**Learning-rate sweep, VGG**", "**Provenance**"):
        assert heading in result.stdout, heading
    assert "| BatchNorm | 0.1 |" in result.stdout and "Effective β without BN / with BN" in result.stdout
    vgg_sweep, dln_sweep = (result.stdout.split(f"**Learning-rate sweep, {m}**")[1].split("\n\n")[1]
                            for m in ("VGG", "DLN"))
    assert "final test acc" in vgg_sweep and "final test acc" not in dln_sweep  # regression has no accuracy
    assert "| no norm | 1 | 2/2 | – | – |" in vgg_sweep  # both seeds diverged: no final values


@pytest.mark.slow
def test_the_committed_results_still_draw_every_figure_and_the_report(tmp_path):
    """The runs behind REPRODUCTION.md stay readable by the code that reads them: every one is read, every
    figure is drawn from them with nothing missing, and the report prints."""
    stored = len(list((REPO / "results").glob("*-*/*/*/summary.json")))
    assert stored > 100
    figures = subprocess.run([sys.executable, str(REPO / "scripts/make_figures.py"), "all", "--out", str(tmp_path)],
                             capture_output=True, text=True)
    output = figures.stdout + figures.stderr
    assert figures.returncode == 0, output
    assert f"{stored} runs read" in output and "missing" not in output and "skipp" not in output, output
    assert "averaged as seeds, although" not in output, output  # each curve's runs differ in their seeds alone
    assert_every_figure_drawn(tmp_path)
    report = subprocess.run([sys.executable, str(REPO / "scripts/report.py")], capture_output=True, text=True)
    assert report.returncode == 0 and not report.stderr, report.stderr
    assert "| BatchNorm | 0.1 | 1200 |" in report.stdout  # REPRODUCTION.md, claim 1: 1,200 steps to 90%


def mean_over_seeds(runs, name: str, layer=None, per_step=None) -> pd.Series:
    """Written out with pandas from the metrics rows: each run's series (or its per-step ``min``/``max``
    over step sizes), then the mean over runs at every step."""
    columns = []
    for run in runs:
        rows = run.metrics[(run.metrics.name == name) & ((run.metrics.layer == layer) if layer else True)]
        by_step = rows.groupby("step")["value"]
        columns.append(getattr(by_step, per_step)() if per_step else by_step.first())
    return pd.concat(columns, axis=1).mean(axis=1)


def lines_of(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def assert_plots(line, series: pd.Series) -> None:
    """``line`` draws ``series``: its steps across, its values (to float rounding) up."""
    np.testing.assert_array_equal(line.get_xdata(), series.index)
    np.testing.assert_allclose(line.get_ydata(), series.values, rtol=1e-12)


def test_the_ics_and_landscape_panels_plot_the_runs_values(all_runs):
    """Read back from the axes of Fig. 3 (DLN) and Fig. 9: each variant's line is the mean over its seeds at
    that learning rate and layer, and the landscape bands' edges are the mean over seeds of each step's
    minimum and maximum over the step sizes. Drawing alone would not show a wrong layer, run or statistic."""
    dln = result_sets(all_runs, "dln", False)["cpu-gaussian_regression"]
    sets = {"vgg": result_sets(all_runs, "vgg", False)["cpu-fashion_mnist"], "dln": dln}
    _, ics_figure = FIGURES["3"].draw(sets, Missing())
    axes = np.array(ics_figure.axes).reshape(5, 2)
    for j, lr in enumerate((1e-6, 1e-7)):
        for k, layer in enumerate((9, 17)):
            for row, name in ((1 + 2 * k, "ics/l2"), (2 + 2 * k, "ics/cos")):
                for norm in ("none", "batchnorm"):
                    expected = mean_over_seeds(select(dln, norm__name=norm, optim__lr=lr), name, layer)
                    assert_plots(lines_of(axes[row, j])[LABELS[norm]], expected)
    landscape = FIGURES["9"].draw(sets, Missing())
    loss_ax, diff_ax, beta_ax = landscape.axes
    for i, norm in enumerate(("none", "batchnorm")):
        chosen = select(dln, norm__name=norm, optim__lr=1e-6)
        for ax, name in ((loss_ax, "landscape/loss"), (diff_ax, "landscape/grad_diff")):
            low, high = [line.get_ydata() for line in ax.get_lines()[2 * i : 2 * i + 2]]
            np.testing.assert_allclose(low, mean_over_seeds(chosen, name, per_step="min").values, rtol=1e-12)
            np.testing.assert_allclose(high, mean_over_seeds(chosen, name, per_step="max").values, rtol=1e-12)
        beta = lines_of(beta_ax)[LABELS[norm]].get_ydata()
        np.testing.assert_allclose(beta, mean_over_seeds(chosen, "landscape/beta").values, rtol=1e-12)
    plt.close("all")


def test_the_moment_quantile_and_learning_rate_panels_plot_the_runs_values(all_runs):
    """Read back from the axes: Fig. 7's four moment panels, Fig. 2's median lines (the quantile band of
    Figs. 1, 2, 8, 14) and the learning-rate figure's points, against the runs' rows."""
    vgg = result_sets(all_runs, "vgg", False)["cpu-fashion_mnist"]
    norms = ("none", "batchnorm", "noisy_batchnorm")
    first = {norm: select(vgg, norm__name=norm, optim__lr=0.1)[0] for norm in norms}
    moments = np.array(FIGURES["7"].draw({"vgg": vgg}, Missing()).axes).reshape(3, 4)
    quantiles = FIGURES["2"].draw({"vgg": vgg}, Missing()).axes
    for i, layer in enumerate((2, 9, 13)):
        for n, norm in enumerate(norms):
            mean, var = (first[norm].series(name, layer) for name in ("act/mean", "act/var"))
            expected = (mean.diff().abs(), var.diff().abs(), mean - mean.iloc[0], var - var.iloc[0])
            for ax, values in zip(moments[i], expected):
                assert_plots(lines_of(ax)[LABELS[norm]], values)
            median = quantiles[1 + i].get_lines()[n]
            np.testing.assert_array_equal(median.get_ydata(), first[norm].series("act/q50", layer).values)

    sweeps = {model: next(iter(result_sets(all_runs, model, True).values())) for model in ("vgg", "dln", "mlp")}
    loss_axes = FIGURES["lr_sweep"].draw(sweeps, Missing()).axes[:3]
    for ax, model in zip(loss_axes, ("vgg", "dln", "mlp")):
        for norm in ("none", "batchnorm"):
            finished = [r for r in select(sweeps[model], norm__name=norm) if r.status != "diverged"]
            by_lr = pd.DataFrame([(r.get("optim.lr"), r.summary["final"]["train/loss"]) for r in finished],
                                 columns=["lr", "loss"]).groupby("lr").loss.mean()
            (points,) = [c.lines[0] for c in ax.containers if c.get_label() == LABELS[norm]]
            np.testing.assert_allclose(np.asarray(points.get_xdata(), dtype=float), by_lr.index)
            np.testing.assert_allclose(np.asarray(points.get_ydata(), dtype=float), by_lr.values, rtol=1e-12)
    plt.close("all")


def panel_data(ax) -> list[np.ndarray]:
    """What a panel shows: its lines' points and its images' pixels."""
    return ([np.asarray(line.get_xydata(), dtype=float) for line in ax.get_lines()]
            + [np.asarray(image.get_array()) for image in ax.get_images()])


def test_single_run_panels_take_the_first_run_with_the_probe(all_runs, tmp_path):
    """A setting's runs may include some made without probes (``+experiment=vgg_bn norm=batchnorm`` beside a
    figure's runs). One of those sorting first used to blank Fig. 2's BatchNorm band and crash Fig. 7
    (IndexError), which stopped ``make_figures.py all`` there. With such runs first, every panel drawn from
    one run's probe rows shows what it shows without them."""
    vgg = result_sets(all_runs, "vgg", False)["cpu-fashion_mnist"]
    mlp = result_sets(all_runs, "mlp", False)["cpu-fashion_mnist"]
    bare = load_runs([fake_run(tmp_path, "vgg", norm, 0.1, experiment="vgg_bn", probes=False)
                      for norm in ("none", "batchnorm", "noisy_batchnorm", "lp1", "lp2", "lpinf")]
                     + [fake_run(tmp_path, "mlp", norm, 0.5, experiment="mnist_bn", probes=False)
                        for norm in ("none", "batchnorm")])
    dln = result_sets(all_runs, "dln", False)["cpu-gaussian_regression"]
    plain = {"vgg": vgg, "mlp": mlp, "dln": dln}
    mixed = {"vgg": select(bare, model__name="vgg") + vgg, "mlp": select(bare, model__name="mlp") + mlp, "dln": dln}
    panels = {"1": lambda axes: axes[2:], "2": lambda axes: axes[1:], "7": lambda axes: axes,
              "10": lambda axes: axes[:2], "14": lambda axes: axes, "is1": lambda axes: axes[1:]}
    for key, chosen in panels.items():
        expected = [panel_data(ax) for ax in chosen(FIGURES[key].draw(plain, Missing()).axes)]
        drawn = [panel_data(ax) for ax in chosen(FIGURES[key].draw(mixed, Missing()).axes)]
        assert any(len(panel) for panel in expected), key
        for want, got in zip(expected, drawn, strict=True):
            assert len(want) == len(got), key
            for a, b in zip(want, got):
                np.testing.assert_array_equal(a, b)
    report = report_module()
    for table in (report.activation_stability, report.mlp):  # the report's tables of one run's probe rows
        assert table(all_runs) == table(bare + all_runs), table.__name__
    plt.close("all")


def test_the_moments_spacing_is_read_from_the_runs(all_runs):
    """Fig. 7's title and the report's moments table say how far apart the measurements are, from the rows:
    the fixture's probes record every 50 steps (the paper's 100 would be wrong here)."""
    vgg = result_sets(all_runs, "vgg", False)["cpu-fashion_mnist"]
    assert "(50 steps apart)" in FIGURES["7"].draw({"vgg": vgg}, Missing())._suptitle.get_text()
    moments = report_module().activation_stability(all_runs)
    assert "| noisy BN | #13 | 50 steps apart |" in moments and "100" not in moments
    assert measurement_spacing([0, 100, 200]) == "100 steps apart"
    assert measurement_spacing([0, 4, 8, 9]) == "unevenly spaced" and measurement_spacing([5]) == "one measurement"


def test_the_remaining_panels_plot_the_chosen_runs_metric_and_layer(all_runs):
    """Read back from the axes of the figures the two tests above leave out: each panel shows its own metric,
    layer, learning rate and normalisation (Figs. 1, 3 (VGG), 8, 10, 11-14, Ioffe & Szegedy's Fig. 1)."""
    vgg = result_sets(all_runs, "vgg", False)["cpu-fashion_mnist"]
    dln = result_sets(all_runs, "dln", False)["cpu-gaussian_regression"]
    mlp = result_sets(all_runs, "mlp", False)["cpu-fashion_mnist"]
    sets = {"vgg": vgg, "dln": dln, "mlp": mlp}

    def first(chosen, norm, lr=None):
        return select(chosen, norm__name=norm, **({} if lr is None else {"optim__lr": lr}))[0]

    fig1 = np.array(FIGURES["1"].draw(sets, Missing()).axes).reshape(2, 2)
    for lr, style in ((0.1, "-"), (0.5, "--")):
        for norm in ("none", "batchnorm"):
            for ax, name in ((fig1[0, 0], "train/acc"), (fig1[0, 1], "test/acc")):
                line = lines_of(ax)[f"{LABELS[norm]}, lr {lr:g}"]
                assert line.get_linestyle() == style
                assert_plots(line, first(vgg, norm, lr).series(name))
    for ax, layer in zip(fig1[1], (3, 11)):
        for n, norm in enumerate(("none", "batchnorm")):
            assert_plots(ax.get_lines()[n], first(vgg, norm, 0.1).series("act/q50", layer))

    fig3_vgg, _ = FIGURES["3"].draw(sets, Missing())
    fig3 = np.array(fig3_vgg.axes).reshape(5, 2)
    for j, lr in enumerate((0.1, 0.01)):
        for norm in ("none", "batchnorm"):
            run = first(vgg, norm, lr)
            assert_plots(lines_of(fig3[0, j])[LABELS[norm]], run.series("train/acc"))
            for row, name, layer in ((1, "ics/l2", 5), (2, "ics/cos", 5), (3, "ics/l2", 10), (4, "ics/cos", 10)):
                assert_plots(lines_of(fig3[row, j])[LABELS[norm]], run.series(name, layer))

    fig8 = np.array(FIGURES["8"].draw(sets, Missing()).axes).reshape(2, 3)
    for ax, layer in zip(fig8[1], (1, 11, 24)):
        assert_plots(ax.get_lines()[0], first(dln, "batchnorm", 1e-6).series("act/q50", layer))

    fig10 = FIGURES["10"].draw(sets, Missing()).axes[:4]  # then the colour bars
    for ax, (chosen, norm, lr) in zip(fig10, [(vgg, "none", 0.1), (vgg, "batchnorm", 0.1), (dln, "none", 1e-6),
                                              (dln, "batchnorm", 1e-6)]):
        rows = first(chosen, norm, lr).metrics.query("name == 'landscape/grad_diff'")
        assert len(ax.get_lines()) == rows.step.nunique()  # fewer than 50 measurements: one curve each
        for line, (_, at) in zip(ax.get_lines(), rows.groupby("step")):
            at = at.sort_values("eta")
            np.testing.assert_array_equal(line.get_xdata(), at.eta)
            np.testing.assert_array_equal(line.get_ydata(), at.value)

    fig11, fig12 = FIGURES["11"].draw(sets, Missing()).axes, FIGURES["12"].draw(sets, Missing()).axes
    fig13 = FIGURES["13"].draw(sets, Missing()).axes
    fig14 = np.array(FIGURES["14"].draw(sets, Missing()).axes).reshape(2, 5)
    for j, norm in enumerate(("none", "batchnorm", "lp1", "lp2", "lpinf")):
        vgg_acc = first(vgg, norm, 0.1).series("train/acc")
        dln_loss = mean_over_seeds(select(dln, norm__name=norm, optim__lr=1e-6), "train/loss")
        assert_plots(lines_of(fig11[0])[LABELS[norm]], vgg_acc)
        assert_plots(lines_of(fig13[0])[LABELS[norm]], vgg_acc)
        assert_plots(lines_of(fig12[0])[LABELS[norm]], dln_loss)
        assert_plots(lines_of(fig13[1])[LABELS[norm]], dln_loss)
        assert_plots(fig14[1, j].get_lines()[0], first(vgg, norm, 0.1).series("act/q50", 11))

    is1 = FIGURES["is1"].draw(sets, Missing()).axes
    for ax, norm in ((is1[1], "none"), (is1[2], "batchnorm")):
        run = first(mlp, norm)
        assert_plots(lines_of(is1[0])[LABELS[norm]], run.series("test/acc"))
        for q in (15, 50, 85):  # of the last hidden layer, the one the MLP's probe records
            assert_plots(lines_of(ax)[f"{q}th percentile"], run.series(f"act/q{q}", 3))
    plt.close("all")


def report_module():
    spec = importlib.util.spec_from_file_location("report", REPO / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_of(rows) -> Run:
    return Run(Path("."), {}, pd.DataFrame(rows, columns=METRICS_HEADER.split(",")))


def test_the_reports_numbers_are_the_statistics_it_names(all_runs):
    """REPRODUCTION.md's numbers: each statistic of scripts/report.py against its answer worked out by hand,
    and one table row against the fixture's runs."""
    report = report_module()
    accuracy = run_of([(10 * k, "train/acc", a, "", "") for k, a in enumerate([1.0] + [0.5] * 4 + [1.0] * 4 + [0.9])])
    # rolling means over 5 logs, from the 5th log (step 40): 0.6, 0.6, 0.7, 0.8, 0.9, 0.98
    assert report.steps_to(accuracy, "train/acc", 0.85) == 80 and report.steps_to(accuracy, "train/acc", 1.5) is None
    assert report.final(accuracy, "train/acc") == 0.9 and report.final(accuracy, "test/acc") is None
    # per step, the range over the eta grid; steps 0..100, so the first fifth is steps 0 to 20
    ranges = {0: 4.0, 10: 6.0, 20: 1.0, 30: 2.0, 40: 3.0, 50: 1.0, 60: 1.0, 70: 1.0, 80: 1.0, 90: 1.0, 100: 1.0}
    landscape = run_of([(step, "landscape/loss", value, "", eta) for step, r in ranges.items()
                        for eta, value in ((0.1, 5.0 + r / 2), (0.2, 5.0 + r), (0.4, 5.0))])
    assert report.spread(landscape, "landscape/loss") == 1.0 and report.spread(landscape, "landscape/loss", True) == 4.0
    assert report.seeds([1.0, 2.0, 6.0]) == "3 (1–6)" and report.seeds([0.25]) == "0.25" and report.seeds([None]) == "–"
    # a seed that overflowed is counted, not dropped: one seed's value is not the setting's
    assert report.seeds([1.0, 2.0, 6.0, float("nan")]) == "3 (1–6); 1 of 4 seeds nan"
    assert report.seeds([None, float("inf"), 5.0, float("inf")]) == "5; 2 of 3 seeds inf"
    assert report.seeds([float("-inf"), float("nan")]) == "1 of 2 seeds -inf, 1 of 2 seeds nan"
    assert report.first_to_last_tenth(pd.Series(np.arange(20.0))) == "0.5 → 18.5"  # two points each

    # the fixture's one unnormalised run at lr 0.5 diverged at step 120: its last values are not final ones
    training = report.vgg_training(all_runs)
    row = next(line for line in training.splitlines() if line.startswith(f"| {LABELS['none']} | 0.5 |"))
    assert row.endswith("| – | – | diverged |"), row

    dln = result_sets(all_runs, "dln", False)["cpu-gaussian_regression"]
    medians = [r.series("ics/l2", 9).median() for r in select(dln, norm__name="batchnorm", optim__lr=1e-6)]
    row = f"| BatchNorm | 1e-06 | #9 | {np.mean(medians):.3g} ({min(medians):.3g}–{max(medians):.3g}) |"
    assert row in report.ics(all_runs)

"""The paper's figures, drawn from runs on disk (protocol section 6).

Each figure is a function of the runs it is given: it picks the runs it needs by their config (model,
normalisation, learning rate), aggregates seeds (mean line, min-max band) at the steps they all reached,
marks diverged runs where they stopped, and says what is missing instead of failing. ``draw`` turns a figure
key into image files, one per combination of result sets (a result set is one scale and data set of one
model), so that a figure is never drawn from runs of mixed settings; a figure that found none of the runs
it looks up is not drawn at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bnopt.config_history import KEYS_ADDED_LATER  # noqa: E402
from bnopt.results import Run, aggregate, select, select_repeats, unfinished_note  # noqa: E402

COLORS = {"none": "0.35", "batchnorm": "C0", "noisy_batchnorm": "C1", "lp1": "C2", "lp2": "C3", "lpinf": "C4",
          "noisy_none": "C5"}
LABELS = {"none": "no norm", "batchnorm": "BatchNorm", "noisy_batchnorm": "noisy BN", "lp1": "L1", "lp2": "L2",
          "lpinf": "L∞", "noisy_none": "noise, no norm"}
LR_STYLES = ["-", "--", ":", "-."]
LP_VARIANTS = ["none", "batchnorm", "lp1", "lp2", "lpinf"]
PAPER_LR = {"vgg": 0.1, "dln": 1e-6, "mlp": 0.5}


class Missing:
    """Collects what a figure needed and did not find, whether it found any run at all, and the runs it
    averages over seeds although they are not repeats of one setting (``mixed``)."""

    def __init__(self):
        self.items: list[str] = []
        self.mixed: list[str] = []
        self.found_any = False

    def need(self, runs: list[Run], what: str, over: tuple[str, ...] = ("seed",), **conditions) -> list[Run]:
        """The runs matching ``conditions``, which the figure aggregates over ``over``."""
        chosen, mixed = select_repeats(runs, over, **conditions)
        self.found_any = self.found_any or bool(chosen)
        keys = ", ".join(f"{key.replace('__', '.')}={value}" for key, value in conditions.items())
        if not chosen:
            self.items.append(f"{what} ({keys})")
        if mixed:
            self.mixed.append(f"{what} ({keys}): {mixed}")
        return chosen


# --- drawing helpers -----------------------------------------------------------------------------------


def variant_label(norm: str, lr: float | None = None) -> str:
    return LABELS.get(norm, norm) + ("" if lr is None else f", lr {lr:g}")


def curve(ax, runs: list[Run], metric: str, color, label: str, layer: int | None = None, style: str = "-",
          log: bool = False) -> None:
    """Mean over seeds with a min-max band; an x where a diverged run stopped."""
    # a run that logged none of ``metric`` (one that failed at once) is left out with its series, so that
    # each diverged run's x marks its own series
    logged = [(run, s) for run in runs if len(s := run.series(metric, layer))]
    if not logged:
        return
    stats = aggregate([s for _, s in logged], diverged=[run.status == "diverged" for run, _ in logged])
    ax.plot(stats.index, stats["mean"], style, color=color, label=label, lw=1.2)
    if len(logged) > 1:
        # Arrays, not Series: numpy 1.24.0 (which pyproject.toml admits) fails on a Series in fill_between.
        ax.fill_between(stats.index, stats["min"].values, stats["max"].values, color=color, alpha=0.15, lw=0)
    for run, s in logged:
        finite = s[np.isfinite(s)]
        if run.status == "diverged" and len(finite):
            # At the step where it stopped, at its last finite value: a probe's last value there is often
            # inf or NaN, which draws no mark at all.
            ax.plot(s.index[-1], finite.iloc[-1], "x", color=color, ms=8, mew=2)
    if log:
        ax.set_yscale("log")


def first_logging(runs: list[Run], prefix: str) -> Run | None:
    """The first run (the first seed) that logged a metric whose name starts with ``prefix``: a setting's runs
    may include some made without that probe (``+experiment=vgg_bn norm=none`` next to Fig. 1's runs)."""
    return next((r for r in runs if r.metrics.name.str.startswith(prefix).any()), None)


def measurement_spacing(steps) -> str:
    """How far apart a probe's measurements are, for a title: "100 steps apart", or "unevenly spaced"."""
    gaps = np.unique(np.diff(np.asarray(steps, dtype=np.int64)))
    if len(gaps) == 1:
        return f"{gaps[0]} steps apart"
    return "unevenly spaced" if len(gaps) else "one measurement"


def quantile_band(ax, runs: list[Run], layer: int, color, label: str) -> None:
    """The 15-85% band and the median of one unit's input to the non-linearity (first seed)."""
    run = first_logging(runs, "act/q")
    if run is None:
        return
    names = sorted({n for n in run.metrics.name.unique() if n.startswith("act/q")}, key=lambda n: float(n[5:]))
    if len(names) < 2:
        return
    low, high = run.series(names[0], layer), run.series(names[-1], layer)
    middle = [n for n in names if n == "act/q50"] or names[len(names) // 2 : len(names) // 2 + 1]
    ax.fill_between(low.index, low.values, high.values, color=color, alpha=0.3, lw=0,
                    label=f"{label} ({names[0][5:]}-{names[-1][5:]}%)")
    median = run.series(middle[0], layer)
    ax.plot(median.index, median.values, color=color, lw=1)


def density_image(ax, runs: list[Run], layer: int, title: str) -> bool:
    """The histograms of ``activations.npz`` as an image: step across, activation value up, density as
    colour, each step scaled to its own peak so that narrow and wide distributions both show (the first seed
    with histograms)."""
    saved = next((a for a in (r.activations() for r in runs) if a is not None), None)
    # a measurement whose values were all NaN or inf (a run diverging) has no histogram to show
    drawable = (saved["layer"] == layer) & np.isfinite(saved["edges"]).all(axis=1) if saved is not None else None
    if saved is None or not drawable.any():
        ax.set_title(f"{title}: no histograms")
        return False
    rows = np.flatnonzero(drawable)
    steps, counts, edges = saved["step"][rows], saved["counts"][rows], saved["edges"][rows]
    low, high = np.percentile(edges[:, 0], 5), np.percentile(edges[:, -1], 95)
    grid = np.linspace(low, high, 121)
    image = np.zeros((len(grid) - 1, len(rows)))
    for j, (c, e) in enumerate(zip(counts, edges)):
        # Each grid cell gets the histogram's mass inside it (uniform within a bin), not the density at
        # its centre: a distribution narrower than one cell would fall between centres and show as empty.
        column = np.diff(np.interp(grid, e, np.concatenate([[0], np.cumsum(c)])))
        image[:, j] = column / column.max() if column.max() > 0 else column
    ax.imshow(image, origin="lower", aspect="auto", cmap="magma",
              extent=(steps.min(), steps.max(), grid[0], grid[-1]))
    ax.set_title(title)
    return True


def landscape_bands(axes, runs: list[Run], color, label: str) -> None:
    """Loss range and gradient-predictiveness range over the step sizes (mean over seeds of the per-step
    minimum and maximum), and the effective beta."""
    for ax, metric in zip(axes[:2], ("landscape/loss", "landscape/grad_diff")):
        lows, highs, diverged = [], [], []
        for run in runs:
            rows = run.metrics[run.metrics.name == metric]
            if len(rows):
                by_step = rows.groupby("step")["value"]
                lows.append(by_step.min())
                highs.append(by_step.max())
                diverged.append(run.status == "diverged")
        if lows:
            low, high = aggregate(lows, diverged)["mean"], aggregate(highs, diverged)["mean"]
            ax.fill_between(low.index, low.values, high.values, color=color, alpha=0.35, lw=0, label=label)
            for edge in (low, high):  # outlines keep a band visible where it is thinner than a line
                ax.plot(edge.index, edge.values, color=color, lw=0.6)
    curve(axes[2], runs, "landscape/beta", color, label, log=True)
    axes[1].set_yscale("log")
    axes[0].set_title("loss range along −g")
    axes[1].set_title("gradient predictiveness ‖g − ∇L(w − ηg)‖")
    axes[2].set_title("effective β-smoothness")


# The protocol's settings that a run may leave by a config value, with the protocol's value (sections 1-4;
# its [default]s are the keys added later); a figure's title names each one its runs leave. Keys a model or
# data set does not have (None) are passed over.
PROTOCOL_SETTINGS = {
    "data.augment": False, "data.loss_scale": 0.5, "model.init_std": 0.1,
    **{key: value for key, (value, _) in KEYS_ADDED_LATER.items()},
    "optim.momentum": 0, "optim.weight_decay": 0, "optim.schedule": "constant",
}


def setting_note(runs: list[Run]) -> str:
    """What differs from the paper's setting, for the figure's title."""
    if not runs:
        return ""
    r = runs[0]
    model, data, scale = r.get("model.name"), r.get("data.name"), r.get("scale.name")
    parts = [f"{data}", f"scale={scale}"]
    if model == "vgg":
        width, steps = r.get("model.width"), r.get("train.steps")
        parts.append(f"VGG-{r.get('model.depth')} width {width:g}, {steps} steps")
        if data != "cifar10":
            parts.append("paper: CIFAR-10")
    if model == "mlp" and data != "mnist":
        parts.append("paper: MNIST")
    for key, paper_value in PROTOCOL_SETTINGS.items():
        leaving = [value for value in (run.get(key) for run in runs) if value not in (None, paper_value)]
        if leaving:
            some = f" ({len(leaving)} of {len(runs)} runs)" if len(leaving) < len(runs) else ""
            parts.append(f"{key}={'/'.join(sorted(set(map(str, leaving))))}{some}")
    return "; ".join(parts)


def finish(fig, axes, title: str, notes: list[str]) -> None:
    for ax in np.ravel(axes):
        if ax.has_data():
            ax.grid(alpha=0.3)
            if not ax.get_xlabel():
                ax.set_xlabel("step", fontsize=8)
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=7)
    fig.suptitle(title + "".join(f"\n{n}" for n in notes if n), fontsize=10)
    fig.tight_layout()


def by_norm(runs: list[Run], missing: Missing, what: str, norms: list[str], over: tuple[str, ...] = ("seed",),
            **conditions) -> dict[str, list[Run]]:
    return {n: missing.need(runs, f"{what} {LABELS.get(n, n)}", over, norm__name=n, **conditions) for n in norms}


# --- the figures ---------------------------------------------------------------------------------------


def fig_1(sets, missing):
    vgg = sets["vgg"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for i, lr in enumerate((0.1, 0.5)):
        for norm in ("none", "batchnorm"):
            runs = missing.need(vgg, "VGG", norm__name=norm, optim__lr=lr)
            label = variant_label(norm, lr)
            curve(axes[0, 0], runs, "train/acc", COLORS[norm], label, style=LR_STYLES[i])
            curve(axes[0, 1], runs, "test/acc", COLORS[norm], label, style=LR_STYLES[i])
    axes[0, 0].set_title("(a) training accuracy (current batch)")
    axes[0, 1].set_title("(b) test accuracy")
    for j, layer in enumerate((3, 11)):
        for norm in ("none", "batchnorm"):
            runs = select(vgg, norm__name=norm, optim__lr=0.1)
            quantile_band(axes[1, j], runs, layer, COLORS[norm], LABELS[norm])
        axes[1, j].set_title(f"(c) layer #{layer}: one unit's input to ReLU, lr 0.1")
    finish(fig, axes, "Fig. 1 — BatchNorm trains faster and tolerates lr 0.5", [setting_note(vgg)])
    return fig


def fig_2(sets, missing):
    vgg = sets["vgg"]
    norms = ["none", "batchnorm", "noisy_batchnorm"]
    runs = by_norm(vgg, missing, "VGG lr 0.1", norms, optim__lr=0.1)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for norm in norms:
        curve(axes[0], runs[norm], "train/acc", COLORS[norm], LABELS[norm])
    axes[0].set_title("training accuracy (current batch)")
    for j, layer in enumerate((2, 9, 13), start=1):
        for norm in norms:
            quantile_band(axes[j], runs[norm], layer, COLORS[norm], LABELS[norm])
        axes[j].set_title(f"layer #{layer}: one unit's input to ReLU")
    finish(fig, axes, "Fig. 2 — noisy BN trains nearly as well as BN though its distributions are unstable",
           [setting_note(vgg)])
    return fig


def _ics_columns(runs_all, missing, model, lrs, layers, loss_metric, log_loss, title, note):
    fig, axes = plt.subplots(1 + 2 * len(layers), len(lrs), figsize=(5 * len(lrs), 2.4 * (1 + 2 * len(layers))),
                             squeeze=False)
    for j, lr in enumerate(lrs):
        for norm in ("none", "batchnorm"):
            runs = missing.need(runs_all, model.upper(), norm__name=norm, optim__lr=lr)
            curve(axes[0, j], runs, loss_metric, COLORS[norm], LABELS[norm], log=log_loss)
            for k, layer in enumerate(layers):
                curve(axes[1 + 2 * k, j], runs, "ics/l2", COLORS[norm], LABELS[norm], layer=layer, log=True)
                curve(axes[2 + 2 * k, j], runs, "ics/cos", COLORS[norm], LABELS[norm], layer=layer)
                axes[1 + 2 * k, j].set_title(f"layer #{layer}: ‖G − G'‖ (lr {lr:g})", fontsize=9)
                axes[2 + 2 * k, j].set_title(f"layer #{layer}: cos(G, G') (lr {lr:g})", fontsize=9)
        axes[0, j].set_title(f"{loss_metric} (lr {lr:g})", fontsize=9)
    finish(fig, axes, title, [note])
    return fig


def fig_3(sets, missing):
    vgg = _ics_columns(sets["vgg"], missing, "vgg", (0.1, 0.01), (5, 10), "train/acc", False,
                       "Fig. 3 (VGG) — BN does not reduce internal covariate shift (Definition 2.1)",
                       setting_note(sets["vgg"]))
    dln = _ics_columns(sets["dln"], missing, "dln", (1e-6, 1e-7), (9, 17), "train/loss", True,
                       "Fig. 3 (DLN) — with BN, G and G' are far apart; without it, almost no shift",
                       setting_note(sets["dln"]) + "; mean and min-max over seeds")
    return [vgg, dln]


def _landscape(runs_all, missing, model, norms, lr, title, note, training_metric=None):
    columns = 3 + (training_metric is not None)
    fig, axes = plt.subplots(1, columns, figsize=(4.6 * columns, 3.8))
    for norm in norms:
        runs = missing.need(runs_all, model.upper(), norm__name=norm, optim__lr=lr)
        landscape_bands(axes[-3:], runs, COLORS[norm], LABELS[norm])
        if training_metric:
            curve(axes[0], runs, training_metric, COLORS[norm], LABELS[norm], log=training_metric == "train/loss")
            axes[0].set_title(training_metric)
    if model == "dln":
        axes[-3].set_yscale("log")
    finish(fig, axes, title, [note])
    return fig


def fig_4(sets, missing):
    return _landscape(sets["vgg"], missing, "vgg", ["none", "batchnorm"], 0.1,
                      "Fig. 4 — with BN the loss changes less along the gradient, and the gradient predicts better",
                      setting_note(sets["vgg"]))


def fig_7(sets, missing):
    vgg = sets["vgg"]
    norms = ["none", "batchnorm", "noisy_batchnorm"]
    runs = by_norm(vgg, missing, "VGG lr 0.1", norms, optim__lr=0.1)
    layers = (2, 9, 13)
    fig, axes = plt.subplots(len(layers), 4, figsize=(16, 3 * len(layers)))
    titles = ["|μ(t+1) − μ(t)|", "|σ²(t+1) − σ²(t)|", "μ(t) − μ(0)", "σ²(t) − σ²(0)"]
    spacings = set()
    for i, layer in enumerate(layers):
        for norm in norms:
            run = first_logging(runs[norm], "act/mean")
            if run is None:
                continue
            mean, var = run.series("act/mean", layer), run.series("act/var", layer)
            if mean.empty or var.empty:  # not this layer's: the run's probe recorded others
                continue
            spacings.add(measurement_spacing(mean.index))
            for ax, s in zip(axes[i], (mean.diff().abs(), var.diff().abs(), mean - mean.iloc[0], var - var.iloc[0])):
                ax.plot(s.index, s.values, color=COLORS[norm], lw=1, label=LABELS[norm])
        for ax, t in zip(axes[i], titles):
            ax.set_title(f"layer #{layer}: {t}", fontsize=9)
        axes[i, 0].set_yscale("log")
        axes[i, 1].set_yscale("log")
    apart = f" ({spacings.pop()})" if len(spacings) == 1 else ""
    finish(fig, axes, f"Fig. 7 — moments of one unit's activation between measurements{apart}",
           [setting_note(vgg)])
    return fig


def fig_8(sets, missing):
    dln = missing.need(sets["dln"], "DLN BN lr 1e-6", norm__name="batchnorm", optim__lr=1e-6)
    layers = (1, 11, 24)
    fig, axes = plt.subplots(2, len(layers), figsize=(14, 6.5))
    for j, layer in enumerate(layers):
        density_image(axes[0, j], dln, layer, f"layer #{layer}: histograms over training")
        quantile_band(axes[1, j], dln, layer, COLORS["batchnorm"], "BatchNorm")
        axes[1, j].set_title(f"layer #{layer}: quantiles")
    finish(fig, axes, "Fig. 8 — activation distributions of the deep linear network with BN (first seed)",
           [setting_note(sets["dln"])])
    return fig


def fig_9(sets, missing):
    return _landscape(sets["dln"], missing, "dln", ["none", "batchnorm"], 1e-6,
                      "Fig. 9 — deep linear network: BN smooths the landscape by orders of magnitude",
                      setting_note(sets["dln"]) + "; mean over seeds of each step's min and max")


def fig_10(sets, missing):
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    k = 0
    for model in ("vgg", "dln"):
        for norm in ("none", "batchnorm"):
            runs = missing.need(sets[model], model.upper(), norm__name=norm, optim__lr=PAPER_LR[model])
            ax = axes[k]
            k += 1
            ax.set_title(f"{model.upper()}, {LABELS[norm]}", fontsize=9)
            run = first_logging(runs, "landscape/grad_diff")
            if run is None:
                continue
            rows = run.metrics[run.metrics.name == "landscape/grad_diff"]
            steps = np.sort(rows.step.unique())
            snapshots = steps[np.unique(np.linspace(0, len(steps) - 1, min(50, len(steps))).round().astype(int))]
            colours = plt.cm.viridis(np.linspace(0, 1, len(snapshots)))
            for step, colour in zip(snapshots, colours):
                at = rows[rows.step == step].sort_values("eta")
                ax.plot(at.eta, at.value, color=colour, lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            etas = np.sort(rows.eta.unique())
            ax.set_xticks(etas, [f"{e:g}" for e in etas], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("η")
            sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(snapshots.min(), snapshots.max()))
            fig.colorbar(sm, ax=ax, label="step")
    finish(fig, axes, "Fig. 10 — ‖g − ∇L(w − ηg)‖ against η, one curve per training snapshot (first seed)",
           [setting_note(sets["vgg"]) + " | " + setting_note(sets["dln"])])
    return fig


def fig_11(sets, missing):
    return _landscape(sets["vgg"], missing, "vgg", LP_VARIANTS, 0.1,
                      "Fig. 11 — Lp normalisations train like BN and smooth the landscape alike (VGG)",
                      setting_note(sets["vgg"]), training_metric="train/acc")


def fig_12(sets, missing):
    return _landscape(sets["dln"], missing, "dln", LP_VARIANTS, 1e-6,
                      "Fig. 12 — Lp normalisations on the deep linear network",
                      setting_note(sets["dln"]) + "; mean and min-max over seeds", training_metric="train/loss")


def fig_13(sets, missing):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, model, metric in ((axes[0], "vgg", "train/acc"), (axes[1], "dln", "train/loss")):
        for norm in LP_VARIANTS:
            runs = missing.need(sets[model], model.upper(), norm__name=norm, optim__lr=PAPER_LR[model])
            curve(ax, runs, metric, COLORS[norm], LABELS[norm], log=metric == "train/loss")
        ax.set_title(f"{model.upper()}: {metric}")
    finish(fig, axes, "Fig. 13 — training with every normalisation",
           [setting_note(sets["vgg"]) + " | " + setting_note(sets["dln"])])
    return fig


def fig_14(sets, missing):
    runs = by_norm(sets["vgg"], missing, "VGG lr 0.1", LP_VARIANTS, optim__lr=0.1)
    fig, axes = plt.subplots(2, len(LP_VARIANTS), figsize=(4 * len(LP_VARIANTS), 6.5))
    for j, norm in enumerate(LP_VARIANTS):
        density_image(axes[0, j], runs[norm], 11, f"{LABELS[norm]}: layer #11")
        quantile_band(axes[1, j], runs[norm], 11, COLORS[norm], LABELS[norm])
    finish(fig, axes, "Fig. 14 — distributions of layer #11 under each normalisation", [setting_note(sets["vgg"])])
    return fig


def fig_is1(sets, missing):
    mlp = sets["mlp"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    runs = {norm: missing.need(mlp, "MLP", norm__name=norm) for norm in ("none", "batchnorm")}
    for norm, rs in runs.items():
        curve(axes[0], rs, "test/acc", COLORS[norm], LABELS[norm])
    axes[0].set_title("(a) test accuracy")
    for ax, norm, tag in ((axes[1], "none", "(b) without BN"), (axes[2], "batchnorm", "(c) with BN")):
        run = first_logging(runs[norm], "act/q")
        layer = run.get("probes.activations.layers", (3,))[-1] if run else 3
        for name, style in (("act/q15", ":"), ("act/q50", "-"), ("act/q85", ":")):
            if run:
                s = run.series(name, layer)
                ax.plot(s.index, s.values, style, color=COLORS[norm], label=name[5:] + "th percentile")
        ax.set_title(f"{tag}: one sigmoid input of layer #{layer}")
    finish(fig, axes, "Ioffe & Szegedy, Fig. 1 — with BN, test accuracy rises faster and the input distribution "
           "stays put", [setting_note(mlp)])
    return fig


def fig_lr_sweep(sets, missing):
    models = [m for m, runs in sets.items() if runs]  # a column for each model that has sweep runs
    missing.items += [f"{m.upper()} lr sweep (no runs)" for m in sets if m not in models]
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        classification = any("train/acc" in run.summary.get("final", {}) for run in sets[model])
        sweeps = by_norm(sets[model], missing, f"{model.upper()} lr sweep", ["batchnorm", "none"], ("seed", "optim.lr"))
        for norm, runs in sweeps.items():
            if not runs:
                continue
            rows = []
            for run in runs:
                final = run.summary.get("final", {})
                rows.append({"lr": run.get("optim.lr"), "loss": final.get("train/loss", np.nan),
                             "acc": final.get("train/acc", np.nan), "status": run.status})
            table = pd.DataFrame(rows)
            table["diverged"] = table.status == "diverged"
            if note := unfinished_note(runs):  # their final values are from partway: no point of the curve
                missing.items.append(f"{model.upper()} lr sweep {LABELS.get(norm, norm)}: {note}")
            for i, metric in enumerate(("loss", "acc") if classification else ("loss",)):
                ok = table[table.status == "completed"].groupby("lr")[metric]
                mean = ok.mean()
                axes[i, j].errorbar(mean.index, mean.values, yerr=[mean - ok.min(), ok.max() - mean], fmt="o-",
                                    color=COLORS.get(norm), label=LABELS.get(norm, norm), capsize=3)
                diverged = table[table.diverged].groupby("lr").size()
                if len(diverged):
                    top = axes[i, j].get_ylim()[1] if len(mean) else 1.0
                    axes[i, j].plot(diverged.index, [top] * len(diverged), "x", color=COLORS.get(norm), ms=10,
                                    mew=2, label=f"{LABELS.get(norm, norm)}: diverged (a seed or more)")
                axes[i, j].set_xscale("log")
                axes[i, j].set_xlabel("learning rate")
        axes[0, j].set_title(f"{model.upper()}: final training loss (mean, min-max over seeds)", fontsize=9)
        axes[0, j].set_yscale("log")
        axes[1, j].set_title(f"{model.upper()}: final training accuracy", fontsize=9)
        if not classification:
            axes[1, j].axis("off")
            axes[1, j].text(0.5, 0.5, f"{model.upper()}: regression, no accuracy", ha="center", va="center",
                            transform=axes[1, j].transAxes, color="0.4")
    notes = [setting_note(sets[m]) for m in models]
    finish(fig, axes, "BatchNorm tolerates a broader range of learning rates", [" | ".join(notes)])
    return fig


@dataclass(frozen=True)
class FigureSpec:
    draw: Callable
    models: tuple[str, ...]
    claim: str
    lr_sweep: bool = False


FIGURES: dict[str, FigureSpec] = {
    "1": FigureSpec(fig_1, ("vgg",), "BN trains much faster and tolerates lr 0.5, where the unnormalised VGG does not train."),
    "2": FigureSpec(fig_2, ("vgg",), "Noisy BN trains nearly as well as BN although its activation distributions are less stable."),
    "3": FigureSpec(fig_3, ("vgg", "dln"), "BN does not reduce internal covariate shift in the gradient sense."),
    "4": FigureSpec(fig_4, ("vgg",), "With BN the loss varies less along the gradient and the gradient is more predictive (VGG)."),
    "7": FigureSpec(fig_7, ("vgg",), "Noisy BN's activation moments change more than the unnormalised network's."),
    "8": FigureSpec(fig_8, ("dln",), "Activation distributions of the deep linear network with BN."),
    "9": FigureSpec(fig_9, ("dln",), "In the deep linear network BN smooths the landscape by orders of magnitude."),
    "10": FigureSpec(fig_10, ("vgg", "dln"), "Gradient predictiveness against the step size over training."),
    "11": FigureSpec(fig_11, ("vgg",), "Lp normalisations train like BN and smooth the landscape alike (VGG)."),
    "12": FigureSpec(fig_12, ("dln",), "Lp normalisations smooth the deep linear network's landscape too; L1 even beats BN."),
    "13": FigureSpec(fig_13, ("vgg", "dln"), "Every normalisation trains better than none."),
    "14": FigureSpec(fig_14, ("vgg",), "Activation distributions of layer #11 under each normalisation."),
    "is1": FigureSpec(fig_is1, ("mlp",), "Ioffe & Szegedy: with BN the MLP's test accuracy rises faster and its sigmoid inputs stay stable."),
    "lr_sweep": FigureSpec(fig_lr_sweep, ("vgg", "dln", "mlp"), "BN tolerates a broader range of learning rates.", lr_sweep=True),
}


def result_set_name(run: Run) -> str:
    """The result set a run belongs to, its scale and data set: ``"cpu-fashion_mnist"``."""
    return f"{run.get('scale.name')}-{run.get('data.name')}"


def result_sets(runs: list[Run], model: str, lr_sweep: bool) -> dict[str, list[Run]]:
    """Runs of one model, split by (scale, data set): ``{"cpu-fashion_mnist": [...], ...}``. Figures use
    the runs that record probes; the learning-rate figure uses the runs of the lr_sweep experiments."""
    chosen = [r for r in runs if r.get("model.name") == model
              and str(r.get("name", "")).startswith("lr_sweep") == lr_sweep]
    sets: dict[str, list[Run]] = {}
    for run in chosen:
        sets.setdefault(result_set_name(run), []).append(run)
    return sets


def draw(key: str, runs: list[Run], out_dir: Path, warn=print) -> list[Path]:
    """Draw figure ``key`` from ``runs`` into ``out_dir`` (PNG and PDF); returns the PNG paths. A figure
    that found none of the runs it looks up, or an image of it with no data in any panel, is named through
    ``warn`` and not written, so that an existing file of that name is left as it was."""
    spec = FIGURES[key]
    per_model = {m: result_sets(runs, m, spec.lr_sweep) for m in spec.models}
    absent = [m for m, s in per_model.items() if not s]
    # A figure of several models draws those it has (their panels, or their image of Fig. 3's two), naming
    # what it misses; one with none of its models is not drawn.
    if len(absent) == len(per_model):
        warn(f"fig {key}: no {'learning-rate sweep ' if spec.lr_sweep else ''}runs of {', '.join(absent)}; skipped")
        return []
    combos, labels = [{m: [] for m in absent}], [[]]
    for model, sets in per_model.items():
        if sets:
            combos = [{**c, model: rs} for c in combos for rs in sets.values()]
            labels = [[*lab, name] for lab in labels for name in sets]
    labels = ["+".join(dict.fromkeys(lab)) for lab in labels]
    written = []
    for sets, label in zip(combos, labels):
        missing = Missing()
        figures = spec.draw(sets, missing)
        figures = figures if isinstance(figures, list) else [figures]
        if not missing.found_any:
            warn(f"fig {key} [{label}]: none of the runs it needs ({'; '.join(missing.items)}); not drawn")
            for figure in figures:
                plt.close(figure)
            continue
        if missing.items:
            warn(f"fig {key} [{label}]: missing {'; '.join(missing.items)}")
        if missing.mixed:
            mixed = f"averaged as seeds, although {'; '.join(missing.mixed)}"
            warn(f"fig {key} [{label}]: {mixed}")
            for figure in figures:  # said on the image too, which travels without the warning
                figure.text(0.5, 0.002, mixed, ha="center", va="bottom", fontsize=7, color="C3", wrap=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, figure in enumerate(figures):
            suffix = "" if len(figures) == 1 else "_" + "ab"[i]
            stem = f"fig{key}{suffix}" + ("" if len(combos) == 1 else f"_{label}")
            if not any(ax.has_data() for ax in figure.axes):  # one image of several found none of its runs
                warn(f"fig {key}{suffix} [{label}]: no panel has data; not drawn")
                plt.close(figure)
                continue
            figure.savefig(out_dir / f"{stem}.png", dpi=110)
            # Without its creation date, a PDF redrawn from the same runs is the same file, as the PNG is.
            figure.savefig(out_dir / f"{stem}.pdf", dpi=110, metadata={"CreationDate": None})
            written.append(out_dir / f"{stem}.png")
            plt.close(figure)
    return written

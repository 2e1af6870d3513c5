"""The numbers behind REPRODUCTION.md, computed from runs on disk, one table per claim of protocol section 7.

    python scripts/report.py                      # from the committed results under results/
    python scripts/report.py --runs results/cpu-fashion_mnist results/paper-gaussian_regression

Prints markdown. Each number says what it is computed from; seeds are summarised as mean (min-max). A model
with runs in several result sets (scale and data set) gets a table per set, as the figures get a file each.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bnopt.figures import (LABELS, LP_VARIANTS, first_logging, measurement_spacing, result_set_name,  # noqa: E402
                           result_sets)
from bnopt.results import (Run, committed_result_dirs, completed, load_runs, select, select_repeats,  # noqa: E402
                           unfinished_note)
from bnopt.rundir import FINISHED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def seeds(values: list[float], fmt: str = "{:.3g}") -> str:
    """Mean (min–max) over the seeds' finite values; those that are inf or NaN (a run that overflowed) are
    counted after it rather than dropped, which would show one seed as the setting's value."""
    present = [v for v in values if v is not None]
    finite = [v for v in present if np.isfinite(v)]
    others = Counter(str(v) for v in present if not np.isfinite(v))
    aside = ", ".join(f"{n} of {len(present)} seeds {kind}" for kind, n in sorted(others.items()))
    if not finite:
        return aside or "–"
    if len(finite) == 1:
        cell = fmt.format(finite[0])
    else:
        cell = f"{fmt.format(np.mean(finite))} ({fmt.format(min(finite))}–{fmt.format(max(finite))})"
    return f"{cell}; {aside}" if aside else cell


def steps_to(run: Run, metric: str, threshold: float, window: int = 5) -> float | None:
    """First step at which the rolling mean (over ``window`` logs) of ``metric`` reaches ``threshold``."""
    s = run.series(metric).rolling(window, min_periods=window).mean()
    reached = s[s >= threshold]
    return float(reached.index[0]) if len(reached) else None


def final(run: Run, metric: str) -> float | None:
    s = run.series(metric)
    return float(s.iloc[-1]) if len(s) else None


def first(run: Run, metric: str) -> float | None:
    s = run.series(metric)
    return float(s.iloc[0]) if len(s) else None  # none yet: a run killed, or just started


def median_over_training(run: Run, metric: str, layer: int | None = None) -> float | None:
    s = run.series(metric, layer)
    return float(s.median()) if len(s) else None


def with_note(*notes: str) -> str:
    return "".join(f"\n\n{note}" for note in notes if note)


def pick(runs: list[Run], notes: list[str], what: str, over: tuple[str, ...] = ("seed",), **conditions) -> list[Run]:
    """``select(runs, **conditions)``, the runs a row summarises over ``over``; a note in ``notes`` where they
    are not repeats of one setting (other settings mixed in, a run counted twice)."""
    chosen, mixed = select_repeats(runs, over, **conditions)
    if mixed:
        notes.append(f"{what}: summarised over {'/'.join(over)}, although {mixed}.")
    return chosen


def finished(runs: list[Run], notes: list[str], what: str) -> list[Run]:
    """The runs that completed or diverged: a median over training from a run stopped partway is a median
    over another span. The others are named in ``notes``."""
    if note := unfinished_note(runs, of=what):
        notes.append(note)
    return [r for r in runs if r.status in FINISHED]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def each_set(runs: list[Run], model: str, lr_sweep: bool = False) -> list[tuple[str, list[Run]]]:
    """The result sets of ``model``, ``(name, runs)`` sorted by name."""
    return sorted(result_sets(runs, model, lr_sweep).items())


def vgg_training(runs: list[Run]) -> str:
    out = []
    for name, vgg in each_set(runs, "vgg"):
        rows, shown, notes = [], [], []
        for norm, lr in [("none", 0.1), ("batchnorm", 0.1), ("noisy_batchnorm", 0.1), ("lp1", 0.1), ("lp2", 0.1),
                         ("lpinf", 0.1), ("none", 0.5), ("batchnorm", 0.5), ("none", 0.01), ("batchnorm", 0.01)]:
            chosen = pick(vgg, notes, f"{LABELS[norm]}, lr {lr:g}", norm__name=norm, optim__lr=lr)
            if not chosen:
                continue
            shown += chosen
            trained = completed(chosen)
            reached = [steps_to(r, "train/acc", 0.9) for r in chosen]
            # A run still training (or stopped part-way) that has not reached 90% yet may still: not counted.
            ended = [step for r, step in zip(chosen, reached) if r.status in FINISHED]
            never = ended.count(None)
            if all(step is None for step in reached):
                steps_cell = "not reached" if never else "not reached yet"
            else:
                steps_cell = seeds(reached, "{:.0f}") + (
                    f" (not reached by {never} of {len(ended)} finished runs)" if never else "")
            rows.append([LABELS[norm], f"{lr:g}", steps_cell,
                         seeds([final(r, "train/acc") for r in trained]), seeds([final(r, "test/acc") for r in trained]),
                         ", ".join(sorted({r.status for r in chosen}))])
        out.append(f"**VGG training** ({name}):\n\n" + table(
            ["variant", "lr", "steps to 90% train acc (rolling mean of 5 logs)",
             "final train acc (batch; completed runs)", "final test acc (completed runs)", "status"], rows)
            + with_note(unfinished_note(shown), *notes))
    return "\n\n".join(out)


def activation_stability(runs: list[Run]) -> str:
    out = []
    for name, vgg in each_set(runs, "vgg"):
        rows = []
        for norm in ("none", "batchnorm", "noisy_batchnorm"):
            run = first_logging(select(vgg, norm__name=norm, optim__lr=0.1), "act/mean")
            if run is None:
                continue
            for layer in (2, 9, 13):
                mean, var = run.series("act/mean", layer), run.series("act/var", layer)
                if not len(mean):
                    continue
                rows.append([LABELS[norm], f"#{layer}", measurement_spacing(mean.index),
                             f"{mean.diff().abs().median():.3g}",
                             f"{var.diff().abs().median():.3g}", f"{(mean - mean.iloc[0]).abs().max():.3g}",
                             f"{(var - var.iloc[0]).abs().max():.3g}"])
        out.append(f"**Activation moments** (one unit, between consecutive measurements; {name}):\n\n" + table(
            ["variant", "layer", "measurements", "median |Δμ|", "median |Δσ²|", "max |μ(t) − μ(0)|", "max |σ²(t) − σ²(0)|"], rows))
    return "\n\n".join(out)


def ics(runs: list[Run]) -> str:
    out = []
    for model, lrs, layers in (("vgg", (0.1, 0.01), (5, 10)), ("dln", (1e-6, 1e-7), (9, 17))):
        for name, rs in each_set(runs, model):
            rows, notes = [], []
            for lr in lrs:
                for norm in ("none", "batchnorm"):
                    what = f"{LABELS[norm]}, lr {lr:g}"
                    chosen = finished(pick(rs, notes, what, norm__name=norm, optim__lr=lr), notes, f"{what}'s medians")
                    for layer in layers:
                        if chosen:
                            rows.append([LABELS[norm], f"{lr:g}", f"#{layer}",
                                         seeds([median_over_training(r, "ics/l2", layer) for r in chosen]),
                                         seeds([median_over_training(r, "ics/cos", layer) for r in chosen])])
            out.append(f"**ICS, {model.upper()}** ({name}; medians over training, then over seeds):\n\n" + table(
                ["variant", "lr", "layer", "‖G − G'‖₂", "cos(G, G')"], rows) + with_note(*notes))
    return "\n\n".join(out)


def early(series: pd.Series, fraction: float = 0.2) -> pd.Series:
    """The part of a series within the first ``fraction`` of its steps."""
    return series[series.index <= series.index.min() + fraction * (series.index.max() - series.index.min())]


def spread(run: Run, metric: str, first: bool = False) -> float:
    """Median over training (or its first fifth) of each step's range of ``metric`` over the η grid."""
    by_step = run.metrics[run.metrics.name == metric].groupby("step")["value"]
    ranges = by_step.max() - by_step.min()
    return float((early(ranges) if first else ranges).median())


def landscape(runs: list[Run]) -> str:
    out = []
    for model, lr in (("vgg", 0.1), ("dln", 1e-6)):
        for name, rs in each_set(runs, model):
            rows, betas, notes = [], {}, []
            for norm in LP_VARIANTS:
                what = LABELS[norm]
                chosen = finished(pick(rs, notes, what, norm__name=norm, optim__lr=lr), notes, f"{what}'s medians")
                if not chosen:
                    continue
                beta = [r.series("landscape/beta") for r in chosen]
                betas[norm] = [float(b.median()) for b in beta]
                rows.append([LABELS[norm], seeds([spread(r, "landscape/loss") for r in chosen]),
                             seeds([spread(r, "landscape/loss", first=True) for r in chosen]),
                             seeds([spread(r, "landscape/grad_diff") for r in chosen]),
                             seeds([spread(r, "landscape/grad_diff", first=True) for r in chosen]),
                             seeds(betas[norm]), seeds([float(early(b).median()) for b in beta]),
                             seeds([float(b.max()) for b in beta])])
            ratio = ""
            if betas.get("none") and betas.get("batchnorm"):
                ratio = (f"\n\nEffective β without BN / with BN (medians over training, mean over seeds): "
                         f"{np.mean(betas['none']) / np.mean(betas['batchnorm']):.3g}.")  # a seed's inf or NaN shows
            out.append(f"**Landscape along the gradient, {model.upper()}** ({name}, lr {lr:g}; per step the range "
                       f"over the η grid; medians over all of training and over its first fifth):\n\n" + table(
                           ["variant", "loss range", "loss range, first fifth", "grad-predictiveness range",
                            "grad-predictiveness range, first fifth", "effective β", "β, first fifth", "β, max"],
                           rows) + ratio + with_note(*notes))
    return "\n\n".join(out)


def dln_losses(runs: list[Run]) -> str:
    out = []
    for name, dln in each_set(runs, "dln"):
        rows, shown, notes = [], [], []
        for norm in LP_VARIANTS:
            chosen = pick(dln, notes, LABELS[norm], norm__name=norm, optim__lr=1e-6)
            shown += chosen
            if chosen:
                rows.append([LABELS[norm], seeds([final(r, "train/loss") for r in completed(chosen)]),
                             seeds([first(r, "train/loss") for r in chosen]),
                             ", ".join(sorted({r.status for r in chosen}))])
        if not shown:
            out.append(f"**DLN final training loss** ({name}): no runs at lr 1e-6.")
            continue
        steps = "/".join(f"{n:,}" for n in sorted({r.get("train.steps") for r in shown}))
        out.append(f"**DLN final training loss** ({name}, lr 1e-6, {steps} steps; mean (min–max) over seeds):\n\n"
                   + table(["variant", "final loss (completed runs)", "initial loss", "status"], rows)
                   + with_note(unfinished_note(shown), *notes))
    return "\n\n".join(out)


def first_to_last_tenth(series: pd.Series) -> str:
    """``a → b``: the mean over the first and over the last tenth of the series' points."""
    n = max(1, len(series) // 10)
    return f"{series.iloc[:n].mean():.3g} → {series.iloc[-n:].mean():.3g}"


def mlp(runs: list[Run]) -> str:
    out = []
    for name, rs in each_set(runs, "mlp"):
        rows = []
        for norm in ("none", "batchnorm"):
            chosen = select(rs, norm__name=norm)
            if not chosen:
                continue
            run = first_logging(chosen, "act/q") or chosen[0]  # the first seed that recorded the activations
            acc = run.series("test/acc")
            at = {s: (f"{acc.loc[s]:.3f}" if s in acc.index else "–") for s in (1000, 5000, 10000, 50000)}
            layer = run.get("probes.activations.layers", (3,))[-1]
            q15, q50, q85 = (run.series(f"act/q{q}", layer) for q in (15, 50, 85))
            if len(q50):
                drift, width = first_to_last_tenth(q50), first_to_last_tenth(q85 - q15)
            else:
                drift = width = "–"
            rows.append([LABELS[norm], *at.values(), drift, width])
        out.append(f"**MLP** ({name}):\n\n" + table(
            ["variant", "test acc @1k", "@5k", "@10k", "@50k", "median sigmoid input, first → last 10% of training",
             "15–85% spread, first → last 10%"], rows))
    return "\n\n".join(out)


def lr_sweep(runs: list[Run]) -> str:
    out = []
    for model in ("vgg", "dln", "mlp"):
        for name, rs in each_set(runs, model, lr_sweep=True):
            frame = pd.DataFrame([{"norm": r.get("norm.name"), "lr": r.get("optim.lr"), "status": r.status,
                                   "loss": r.summary.get("final", {}).get("train/loss", np.nan),
                                   "acc": r.summary.get("final", {}).get("test/acc", np.nan)} for r in rs])
            classification = frame.acc.notna().any()
            rows, notes = [], []
            for norm in sorted(frame.norm.unique()):
                pick(rs, notes, LABELS.get(norm, norm), ("seed", "optim.lr"), norm__name=norm)
            for (norm, lr), group in frame.groupby(["norm", "lr"]):
                trained = group[group.status == "completed"]
                row = [LABELS.get(norm, norm), f"{lr:g}", f"{(group.status == 'diverged').sum()}/{len(group)}",
                       seeds(trained.loss.tolist())]
                rows.append(row + [seeds(trained.acc.tolist())] if classification else row)
            columns = ["variant", "lr", "diverged", "final train loss (completed runs)"]
            out.append(f"**Learning-rate sweep, {model.upper()}** ({name}):\n\n" + table(
                columns + ["final test acc (completed runs)"] if classification else columns, rows)
                + with_note(unfinished_note(rs), *notes))
    return "\n\n".join(out)


def counted(values: list[str]) -> str:
    """``"a (3); b (1)"``: each distinct value with how many times it occurs, the commonest first."""
    return "; ".join(f"{value} ({n})" for value, n in sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])))


def provenance(runs: list[Run]) -> str:
    """The code and the machines behind the runs read, per result set: a table of numbers made by several
    versions of the code, or on several kinds of machine, says so."""
    sets: dict[str, list[Run]] = {}
    for run in runs:
        sets.setdefault(result_set_name(run), []).append(run)
    rows = []
    for name, rs in sorted(sets.items()):
        # A run resumed with other code, or elsewhere, counts once under each.
        code = [commit[:7] + commit[40:] if len(commit) >= 40 else commit
                for r in rs for commit in dict.fromkeys(c for _, c in r.commits)]
        machines = [m for r in rs for m in dict.fromkeys(m for _, m in r.machines)]
        rows.append([name, len(rs), counted(code), counted(machines)])
    notes = []
    if any(commit.endswith("-dirty") for r in runs for _, commit in r.commits):
        notes.append("A commit marked -dirty ran with uncommitted changes to src/, configs/ or train.py: the code "
                     "behind those runs is not all in git.")
    resumed = [r for r in runs if len({c for _, c in r.commits}) > 1 or len({m for _, m in r.machines}) > 1]
    if resumed:
        notes.append(f"{len(resumed)} run(s) resumed with other code or on another machine count under each: "
                     + ", ".join(str(r.path) for r in resumed[:5]) + (" ..." if len(resumed) > 5 else ""))
    return ("**Provenance** (the code and the machines of the runs read; runs of each in brackets):\n\n"
            + table(["result set", "runs", "code (git commit)", "machine (device, threads, torch)"], rows)
            + with_note(*notes))


SECTIONS = [vgg_training, activation_stability, ics, landscape, dln_losses, mlp, lr_sweep, provenance]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=[str(p) for p in committed_result_dirs(REPO)])
    args = parser.parse_args()
    runs = load_runs(args.runs, warn=lambda m: print(m, file=sys.stderr))
    if not runs:
        print("error: no runs read, so no tables", file=sys.stderr)
        sys.exit(1)
    # Markdown in UTF-8, whatever the locale: its "β", "‖" and "−" raised UnicodeEncodeError on a stdout in
    # ASCII, Latin-1 or a Windows code page (a redirect to a file there).
    sys.stdout.reconfigure(encoding="utf-8")
    print("\n\n".join(text for text in (section(runs) for section in SECTIONS) if text))


if __name__ == "__main__":
    main()

"""Reading runs back from disk (the results contract of ``bnopt.rundir``), for figures, sweep indexes and
reports.

A run directory that cannot be parsed — a missing or broken ``config.yaml``, a ``metrics.csv`` with the
wrong header or garbage rows, or fewer or more rows than its summary says a finished run wrote — is reported
by file name and skipped; a run killed mid-write loses only its unfinished last line.
"""

from __future__ import annotations

import glob
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import yaml

from bnopt.config_history import NOT_IDENTITY, with_keys_added_later
from bnopt.rundir import FINISHED, MACHINE_KEYS, METRICS_HEADER, describe_machine, record_lost
from bnopt.runlock import status_now

Warn = Callable[[str], None]


class RunReadError(ValueError):
    """A run directory whose files cannot be read; the message names the file."""


def _read_utf8(path: Path) -> str:
    """``path``'s text, which bnopt writes in UTF-8 whatever the locale. One in another encoding (a config.yaml
    written under a Latin-1 locale before bnopt wrote UTF-8, or a damaged file) raises RunReadError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RunReadError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8 (iconv)") from None


def read_metrics(path: Path) -> pd.DataFrame:
    """``metrics.csv`` as a DataFrame with columns step, name, value, layer, eta."""
    try:
        text = _read_utf8(path)
    except OSError as err:
        raise RunReadError(f"{path}: cannot be read ({err.strerror})") from None
    if not text.startswith(METRICS_HEADER + "\n"):
        raise RunReadError(f"{path}: not a metrics file (the header must be {METRICS_HEADER!r})")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a run killed mid-write: drop the unfinished last line
    try:
        frame = pd.read_csv(io.StringIO(text), dtype={"name": str})
        frame["step"] = pd.to_numeric(frame["step"], errors="raise").astype(np.int64)
        for column in ("value", "layer", "eta"):
            frame[column] = pd.to_numeric(frame[column], errors="raise").astype(float)
    except (ValueError, pd.errors.ParserError) as err:
        raise RunReadError(f"{path}: malformed rows ({str(err).splitlines()[0]})") from None
    return frame


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> {"optim.lr": 0.1, ...}; lists become tuples (hashable)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


@dataclass
class Run:
    path: Path
    config: dict
    metrics: pd.DataFrame
    summary: dict = field(default_factory=dict)

    @cached_property
    def flat(self) -> dict[str, object]:
        """The config as ``{"optim.lr": 0.1, ...}``; computed once, as selecting runs reads it per key."""
        return flatten(self.config)

    def get(self, key: str, default=None):
        return self.flat.get(key, default)

    @cached_property
    def status(self) -> str:
        """The summary's; ``killed`` for one that says ``running`` whose process on this machine is gone.
        Read once: the figures ask per run and per panel."""
        return status_now(self.path, self.summary.get("status", "unknown"))

    @cached_property
    def commits(self) -> list[tuple[int, str]]:
        """``[(from_step, commit), ...]``: the code each stretch of the run ran (``-dirty``: with uncommitted
        changes); one entry from a summary written before it kept the history, ``"unknown"`` without one."""
        return _history(self.summary.get("git_commits"), self.summary.get("git_commit"), str)

    @cached_property
    def machines(self) -> list[tuple[int, str]]:
        """``[(from_step, machine), ...]``, each machine as :func:`~bnopt.rundir.describe_machine` writes it,
        with the device's kind (``cuda``, not ``cuda:1``: which GPU of a node changes no number)."""
        def describe(machine) -> str:
            machine = machine if isinstance(machine, dict) else {}
            device = machine.get("device")
            return describe_machine({**machine, "device": str(device).split(":")[0] if device else None})
        only = {key: self.summary.get(key) for key in MACHINE_KEYS}
        return _history(self.summary.get("machines"), only if any(only.values()) else None, describe)

    def series(self, name: str, layer: int | None = None) -> pd.Series:
        """One metric over steps (indexed by step), optionally for one layer."""
        rows = self.metrics[self.metrics.name == name]
        if layer is not None:
            rows = rows[rows.layer == layer]
        return rows.set_index("step")["value"].sort_index()

    def activations(self) -> dict[str, np.ndarray] | None:
        path = self.path / "activations.npz"
        if not path.exists():
            return None
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}


def _history(entries, only, describe: Callable[[object], str]) -> list[tuple[int, str]]:
    """A summary's ``[[from_step, value], ...]`` with each value described; ``[(0, describe(only))]`` where it
    has none (or one not of that shape: a summary edited by hand), ``only`` being its single value."""
    if isinstance(entries, list) and entries and all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) for e in entries):
        return [(step, describe(value)) for step, value in entries]
    return [(0, describe(only) if only is not None else "unknown")]


def read_run(directory: Path) -> Run:
    config_path = directory / "config.yaml"
    try:
        config = yaml.safe_load(_read_utf8(config_path))
    except OSError:
        raise RunReadError(f"{config_path}: missing") from None
    except yaml.YAMLError as err:
        raise RunReadError(f"{config_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise RunReadError(f"{config_path}: not a bnopt run config")
    metrics = read_metrics(directory / "metrics.csv")
    try:
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}  # a run killed before its first summary: its metrics still count
    if not isinstance(summary, dict):  # JSON, but no summary: read as a missing one is
        summary = {}
    lost = record_lost(summary, len(metrics))
    if lost:
        raise RunReadError(f"{directory / 'metrics.csv'}: {lost}; move the run away and run its command again")
    return Run(directory, with_keys_added_later(config), metrics, summary)


def find_run_dirs(root: Path) -> set[Path]:
    """Every directory at or below ``root`` that holds a ``metrics.csv`` or a ``config.yaml`` (Hydra's own
    ``.hydra/`` copies excluded)."""
    found: set[Path] = set()
    if root.is_dir():
        for marker in ("metrics.csv", "config.yaml"):
            for path in [root / marker, *root.rglob(marker)]:
                if path.is_file() and ".hydra" not in path.parts:
                    found.add(path.parent)
    return found


def committed_result_dirs(repo: Path) -> list[Path]:
    """The result sets kept in the repository: ``results/<scale>-<data>/``, not the scratch ``results/runs/``
    nor the drawn ``results/figures/``."""
    return [p for p in sorted((repo / "results").glob("*")) if p.is_dir() and p.name not in ("runs", "figures")]


def load_runs(patterns: Iterable[str | Path], warn: Warn = print) -> list[Run]:
    """The runs at or below ``patterns``; each pattern that holds none and each run that cannot be read is
    named through ``warn`` (a mistyped ``--runs`` path would otherwise just draw empty figures)."""
    directories: set[Path] = set()
    for pattern in patterns:
        # a path as written where it exists ("results [v2]" is no glob pattern), else its matches
        matches = [Path(pattern)] if Path(pattern).exists() else glob.glob(str(pattern), recursive=True)
        roots = [Path(root) for root in matches]
        found = set().union(*map(find_run_dirs, roots))
        if not found:
            warn(f"{pattern}: {'no runs at or below it' if roots else 'no such file or directory'}")
        directories |= found
    runs = []
    for directory in sorted(directories):
        try:
            runs.append(read_run(directory))
        except RunReadError as err:
            warn(f"skipping {err}")
    return runs


# --- grouping ----------------------------------------------------------------------------------------

# Keys that never distinguish what a run shows: what is no part of its identity, bookkeeping, and everything
# resolved from them.
IGNORED = (*NOT_IDENTITY, "train.eval_batch_size", "train.checkpoint_every")


def varying_keys(runs: list[Run], ignore: Iterable[str] = IGNORED) -> list[str]:
    """The config keys whose values differ among ``runs`` (``seed`` included), sorted."""
    flats = [r.flat for r in runs]
    keys = set().union(*flats) if flats else set()
    ignored = tuple(ignore)
    return sorted(k for k in keys if not k.startswith(ignored) and len({_key(f.get(k)) for f in flats}) > 1)


# Keys in which the runs averaged as seeds of one setting may differ: they do not change what is trained
# (the probes are observations; logging and evaluation steps only decide which steps have values).
NOT_TRAINING = (*IGNORED, "probes", "train.log_every", "train.eval_every")


def mixed_settings(runs: list[Run], over: Iterable[str] = ("seed",)) -> str:
    """Why ``runs``, which a mean (min-max) over them takes for repeats of one setting that differ only in
    ``over`` (the seed), are not: the config keys whose values differ among them, apart from ``over`` and
    what does not change the training; and a value of ``over`` held by more than one run (a run copied, or
    one setting trained twice, counted twice). "" when there is nothing to say."""
    over = list(over)
    differ = varying_keys(runs, (*NOT_TRAINING, *over))
    counts = Counter(tuple(_key(r.get(k)) for k in over) for r in runs)
    repeated = [values for values, n in counts.items() if n > 1]
    parts = [f"differ in {', '.join(differ)}"] if differ else []
    if repeated:
        shown = ", ".join("/".join(map(str, values)) for values in repeated[:3]) + (" ..." if len(repeated) > 3 else "")
        parts.append(f"hold {'/'.join(over)} {shown} more than once")
    return f"its {len(runs)} runs {' and '.join(parts)}" if parts else ""


def select_repeats(runs: list[Run], over: Iterable[str] = ("seed",), **conditions) -> tuple[list[Run], str]:
    """``select(runs, **conditions)``, the runs that a figure or table takes for repeats of one setting
    over ``over``, and :func:`mixed_settings`' note on them ("" when they are)."""
    chosen = select(runs, **conditions)
    return chosen, mixed_settings(chosen, over)


def _key(value):
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def group_runs(runs: list[Run], by: Iterable[str]) -> dict[tuple, list[Run]]:
    """Runs grouped by their values of ``by`` (keys left out, e.g. ``seed``, are aggregated over),
    in the order of the sorted group keys."""
    by = list(by)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_key(run.get(k)) for k in by), []).append(run)
    return dict(sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))))


def select(runs: list[Run], **conditions) -> list[Run]:
    """Runs whose config matches every ``key=value`` (keys with dots written with "__": optim__lr=0.1);
    a list or tuple value matches any of its elements; floats match to a relative 1e-9."""
    def matches(run: Run, key: str, wanted) -> bool:
        value = run.get(key.replace("__", "."))
        options = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        return any(_equal(value, option) for option in options)

    return [r for r in runs if all(matches(r, k, v) for k, v in conditions.items())]


def completed(runs: list[Run]) -> list[Run]:
    """The runs that trained to their last step: final values are theirs alone. A diverged run's last values
    are those of its last finite step; an interrupted, failed or still running run's are from partway."""
    return [r for r in runs if r.status == "completed"]


def unfinished_note(runs: list[Run], of: str = "the final values") -> str:
    """A sentence naming the runs that neither completed nor diverged (left out ``of`` what is shown), or ""."""
    left_out = [r for r in runs if r.status not in FINISHED]
    if not left_out:
        return ""
    statuses = ", ".join(f"{status} {sum(r.status == status for r in left_out)}"
                         for status in sorted({r.status for r in left_out}))
    return (f"{len(left_out)} run(s) not finished ({statuses}) are left out of {of}: "
            + ", ".join(str(r.path) for r in left_out[:5]) + (" ..." if len(left_out) > 5 else ""))


def _equal(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def aggregate(series: list[pd.Series], diverged: Iterable[bool] = ()) -> pd.DataFrame:
    """Mean, min and max over seeds, and ``n``, how many runs each step's values are over.

    The steps are those all runs share, so that a run still training, interrupted or failed shortens the
    curve instead of silently dropping out of the mean part-way. The exception is a run flagged in
    ``diverged`` (one flag per series; none by default): it has ended for good, so it counts up to the step
    where it stopped and the others go on without it (``n`` falls there); the steps are then those the runs
    that did not diverge share, or, when all diverged, every step any of them reached."""
    diverged = list(diverged) or [False] * len(series)
    frame = pd.concat(series, axis=1)
    not_diverged = [s.index for s, stopped in zip(series, diverged, strict=True) if not stopped]
    if not_diverged:
        shared = not_diverged[0]
        for steps in not_diverged[1:]:
            shared = shared.intersection(steps)
        frame = frame[frame.index.isin(shared)]
    return pd.DataFrame({"mean": frame.mean(axis=1), "min": frame.min(axis=1), "max": frame.max(axis=1),
                         "n": frame.count(axis=1)})

"""The results contract: what every run writes into its output directory.

    config.yaml      the fully resolved config
    metrics.csv      tidy long format, header ``step,name,value,layer,eta``; one row per value, written line
                     by line, so a killed run keeps every row it logged
    summary.json     status (running, completed, diverged, failed, interrupted), steps, final metrics,
                     wall time, steps/s, device, torch version, git commit
    checkpoint.pt    model, optimiser, step, random states; written atomically
    activations.npz  histograms of the activation probe (when it is on)
    .lock            held by the process training the run (:meth:`RunDirectory.claimed`)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from bnopt.durable import atomic_write_text, write_durably
from bnopt.runlock import CHECKPOINT_FILE, LOCK_FILE, LockHeldError, held

METRICS_HEADER = "step,name,value,layer,eta"
FINAL_PREFIXES = ("train/", "test/")  # the metrics whose last values are a summary's ``final``
# The statuses of a run that ended by itself, at its last step or where it diverged.
FINISHED = ("completed", "diverged")


class OutputDirError(RuntimeError):
    """The run's output directory cannot be written."""


class RunBusyError(RuntimeError):
    """Another process is training the run in this output directory now. The message ends "choose another
    output directory"; the CLI adds the key that sets it."""


def _number(value: float) -> str:
    """Shortest text that reads back as the same float (so repeated runs compare bit for bit)."""
    return repr(float(value))


class MetricsWriter:
    """Appends rows to ``metrics.csv``. ``keep_before_step`` (resuming) first drops the rows of steps at
    or after the checkpoint the run resumes from, so the file ends as if the run had never stopped."""

    def __init__(self, path: Path, keep_before_step: int | None = None):
        self.path = path
        self.last: dict[str, float] = {}  # latest values of the FINAL_PREFIXES metrics, for the summary
        self.rows = 0  # rows in the file; a checkpoint records how many came before it
        if keep_before_step is not None and path.exists():
            # A resumed run's summary must end with the same values as if it had never stopped, also when
            # no train/* row falls between the checkpoint and the end.
            kept = metric_rows(path, before_step=keep_before_step)
            atomic_write_text(path, "\n".join([METRICS_HEADER, *map(",".join, kept)]) + "\n")
            self.last, self.rows = final_values(kept), len(kept)
        else:
            path.write_text(METRICS_HEADER + "\n", encoding="utf-8")
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: every row reaches the OS at once

    def log(self, step: int, name: str, value: float, layer: int | None = None, eta: float | None = None) -> None:
        layer_text = "" if layer is None else str(int(layer))
        eta_text = "" if eta is None else _number(eta)
        self._file.write(f"{int(step)},{name},{_number(value)},{layer_text},{eta_text}\n")
        self.rows += 1
        if name.startswith(FINAL_PREFIXES):
            self.last[name] = float(value)

    def sync(self) -> None:
        """Every row so far on disk: a checkpoint counts them, and a crash must not keep it and lose them."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def metric_rows(path: Path, before_step: int | None = None) -> list[list[str]]:
    """The well-formed rows of ``metrics.csv`` (of steps before ``before_step``), split into fields; none if
    there is no file. A line that is not one (the last, cut short by a kill) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split(",")
        if len(fields) == 5 and _well_formed(fields) and (before_step is None or int(fields[0]) < before_step):
            rows.append(fields)
    return rows


def _well_formed(fields: list[str]) -> bool:
    step, name, value, layer, eta = fields
    try:
        float(value), float(eta or 0)
    except ValueError:
        return False
    return step.isdigit() and bool(name) and (layer == "" or layer.isdigit())


def record_lost(summary: dict, rows: int) -> str | None:
    """Why a ``metrics.csv`` of ``rows`` rows is not the record that ``summary``'s finished run wrote (a copy
    cut short at a line's end leaves only well-formed rows), or None where it is, where the run has not
    finished (a resume may still add rows) or where the summary predates the count (2026-12-01)."""
    written = summary.get("metrics_rows")
    if summary.get("status") in FINISHED and isinstance(written, int) and rows != written:
        return (f"{rows} rows where the run, {summary['status']}, wrote {written}: part of its record is lost "
                f"(a copy cut short?)")
    return None


def final_values(rows: list[list[str]]) -> dict[str, float]:
    """The last ``train/*`` and ``test/*`` value of each metric in ``rows``: a summary's ``final``."""
    return {name: float(value) for _, name, value, _, _ in rows if name.startswith(FINAL_PREFIXES)}


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.csv"
        self.summary = self.path / "summary.json"
        self.checkpoint = self.path / CHECKPOINT_FILE
        self.lock = self.path / LOCK_FILE

    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory for the block. Two processes training one run would
        interleave their metrics rows and overwrite each other's checkpoints, which the figure recipes' fixed
        run places make easy (two recipes that share a run, started side by side). The kernel drops the lock
        when its holder ends, however it ends, so a killed run leaves nothing stale behind."""
        try:
            with held(self.lock):
                yield
        except LockHeldError as err:
            raise RunBusyError(f"{self.path} is being trained by {err} now; wait for it to end (the same "
                               "command then finds the run finished, or resumes it), or choose another "
                               "output directory") from None

    def ensure_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # A name of its own: processes that check one directory at once (two recipes sharing a sweep
            # directory) deleted each other's probe and reported the directory unwritable.
            probe = self.path / f".write-test.{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise OutputDirError(f"output directory {self.path} is not writable ({err.strerror})") from err

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def read_config(self) -> dict:
        """``config.yaml`` as a plain dict (it is written resolved)."""
        return OmegaConf.to_container(OmegaConf.load(self.config))

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary, json.dumps(_json_safe(summary), indent=2) + "\n")

    def read_summary(self) -> dict | None:
        """The summary, or None if it is missing or unreadable (cut short, or JSON that is not an object)."""
        try:
            summary = json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def save_checkpoint(self, state: dict) -> None:
        def save(tmp: Path) -> None:
            # Opened here, not by torch.save: a save that fails leaves torch's own file open, and a file that
            # is open keeps its space after it is removed.
            with open(tmp, "wb") as file:
                try:
                    torch.save(state, file)
                except RuntimeError as err:
                    if isinstance(err.__context__, OSError):  # torch reports a failed write as a RuntimeError
                        raise err.__context__ from None  # "unexpected pos 704 vs 598": the write's own error
                    raise

        write_durably(self.checkpoint, save)


RUN_SOURCES = (":/src", ":/configs", ":/train.py")  # what a run's results depend on, from the repository root


def git_commit(source: Path = Path(__file__).resolve().parent) -> str:
    """The commit of the bnopt source tree this run used, with ``-dirty`` for uncommitted changes to what
    a run depends on (the package, the configs, the entry point): not for results being written or
    regenerated elsewhere in the repository, nor for scripts that only read them."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, encoding="utf-8",
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *RUN_SOURCES],
                               cwd=source, capture_output=True, encoding="utf-8", timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


MACHINE_KEYS = ("device", "device_name", "threads", "torch")  # a summary's record of the machine it ran on


def describe_machine(machine: dict) -> str:
    """One line for a summary's ``machines`` entry: "cpu (AMD EPYC (AVX2)), 2 threads, torch 2.14.1";
    "unknown" for what a summary from before it was recorded lacks."""
    device, name, threads, version = (machine.get(key) for key in MACHINE_KEYS)
    threads = ("threads unknown" if threads in (None, "", "unknown")
               else f"{threads} thread{'' if threads == 1 else 's'}")
    return f"{device or 'unknown'} ({name or 'unknown'}), {threads}, torch {version or 'unknown'}"

"""Hydra callbacks; ``configs/train.yaml`` registers the first two for every command.

``OutputDirCheck``: Hydra creates a run's output directory before the task starts, so a directory that
cannot be written would end in Hydra's traceback; this checks it first and answers in one line.
``SweepIndex``: when a sweep ends, or a Ctrl-C stops it, ``index.csv`` in its directory lists every job with its
status and final metrics (``python scripts/sweep_index.py <dir>`` rebuilds it any time, e.g. after a sweep was
killed).
``UnfinishedJobs``: lists the jobs that end without their run finished in their directory; the figure
recipes add it on their command line and stop before drawing when it listed any.
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from bnopt.rundir import FINISHED, OutputDirError, RunDirectory
from bnopt.runlock import killed_error, status_now
from bnopt.sweeps import announce_index
from bnopt.train import identity_differences


def _require_writable(config: DictConfig, key: str) -> None:
    try:
        directory = OmegaConf.select(config, key, throw_on_missing=True)
    except OmegaConfBaseException as err:  # made of values (name=${typo}) that do not resolve
        print(f"error: {key} cannot be resolved ({type(err).__name__}: {str(err).splitlines()[0]}); check the "
              "values it is made of", file=sys.stderr)
        sys.exit(2)
    try:
        RunDirectory(Path(directory)).ensure_writable()
    except OutputDirError as err:
        print(f"error: {err}; choose another with {key}=...", file=sys.stderr)
        sys.exit(2)


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _require_writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _require_writable(config, "hydra.sweep.dir")


class SweepIndex(Callback):
    # The sweep that this process launched, and its launcher: where a Ctrl-C that stops Hydra's own process
    # (cli.sweep_stopped_by_ctrl_c) writes the index. A class attribute: Hydra builds the callback itself.
    launched: tuple[Path, str] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        SweepIndex.launched = (Path(config.hydra.sweep.dir), config.hydra.launcher._target_)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        SweepIndex.launched = None
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            announce_index(sweep_dir)


class UnfinishedJobs(Callback):
    """Appends ``<run dir>: <why>`` to the file ``record`` for each job of a sweep that ends without its run
    finished in its directory: the directory holds a run of another config, another process is training it,
    or the run ended ``failed`` (missing data, a bad value) or ``interrupted``. The CLI reports such a job with
    one line and the sweep goes on (exit status 0), which suits a sweep of one's own; a figure recipe, though,
    would then draw other runs, or none, as if they were its own.

    Runs in each job's process (a joblib worker, a submitit job), after the job; add it with
    ``+hydra.callbacks.unfinished_jobs._target_=bnopt.hydra_callbacks.UnfinishedJobs
    +hydra.callbacks.unfinished_jobs.record=<file>``, the file where every job can write (a shared file
    system on a cluster). A run that another process has claimed but not yet started (it is still loading its
    data, so its summary does not say ``running``) is taken for this job's failed one."""

    def __init__(self, record: str):
        self.record = record

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        run = RunDirectory(Path(config.hydra.runtime.output_dir))
        returned = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if isinstance(returned, dict) and returned.get("status") == "failed":  # refused before it reached the run
            why = ended("failed", returned.get("error"))
        else:
            try:
                why = why_not_this_jobs_run(run, job_config(config))
            except Exception as err:  # a config that does not resolve, a file that cannot be read: not finished
                why = ended("failed", f"{type(err).__name__}: {err}")
        if why:
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(f"{run.path}: {why}\n")


def job_config(config: DictConfig) -> dict:
    """The resolved config the job's task got: Hydra's job config without its ``hydra`` node."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return OmegaConf.to_container(task, resolve=True)


def why_not_this_jobs_run(run: RunDirectory, config: dict) -> str | None:
    """Why ``run`` does not hold the finished run of ``config`` now that its job has ended, or None when it
    does. Every command that trains a run writes its ``config.yaml`` (one that finds the run finished has its
    identity), so one of another identity means this command was refused; ``running`` in the summary of a
    run whose job has ended is another process's."""
    if run.config.is_file():
        differences = identity_differences(run.read_config(), config)
        if differences:
            return f"holds a run of another config ({', '.join(differences[:3])})"
    summary = run.read_summary()
    if summary is None:
        return "ended without a summary"
    status = status_now(run.path, summary.get("status"))
    if status == "killed":
        return f"ended killed ({killed_error(run.path)})"
    if status == "running":
        return "another process is training it"
    if status not in FINISHED:
        return ended(status, summary.get("error"))
    return None


def ended(status: str, error: str | None) -> str:
    short = textwrap.shorten(str(error or ""), 200, placeholder=" ...")
    return f"ended {status}" + (f" ({short})" if short else "")

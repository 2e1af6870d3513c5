"""Sweeps: the threads each job may use, and the index a sweep directory gets.

Jobs of a local parallel sweep share the machine's cores. Two 2-thread torch processes on 2 cores were
measured running 60-500x slower (OpenMP threads spinning against each other), while 1-thread jobs side by
side scale almost linearly; so each job takes its share of the cores unless ``threads`` says otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import IO

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the sweeper that numbers a sweep's jobs
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnopt.config_history import with_keys_added_later
from bnopt.durable import write_durably
from bnopt.runlock import killed_error, status_now

FINAL_METRICS = ("train/loss", "train/acc", "test/loss", "test/acc")
INDEX_COLUMNS = ("job", "dir", "overrides", "status", "steps", *FINAL_METRICS, "wall_time_s", "error")


def job_threads(threads: int | None, launcher: DictConfig | None, cores: int | None = None) -> int | None:
    """Threads for one job: ``threads`` if set; in a joblib sweep the job's share of the cores; in a
    submitit sweep its ``cpus_per_task``; otherwise None (torch's default)."""
    if threads:
        return threads
    if launcher is None:
        return None
    target = str(launcher.get("_target_", ""))
    cores = cores or os.cpu_count() or 1
    if target.endswith("JoblibLauncher"):
        n_jobs = int(launcher.get("n_jobs") or 1)
        parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 all cores, -2 all but one
        return max(1, cores // min(parallel, cores))
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def gpu_lock_dir() -> Path:
    """Where jobs on this machine lock the GPUs they run on: one directory per machine and user, so that
    the jobs of two sweeps started side by side see each other's locks, and jobs on other nodes (a sweep
    directory on a shared file system) do not wait for these."""
    return Path(tempfile.gettempdir()) / f"bnopt-gpu-locks-{os.getuid()}"


def visible_gpu_names(count: int) -> list[str]:
    """A name for each of the ``count`` GPUs this process sees that is the same in every process on the
    machine: its UUID. Not its number, which depends on what a process sees: CUDA_VISIBLE_DEVICES=3,5 makes
    GPU 5 cuda:1, and SLURM's device cgroups number every job's GPUs from 0."""
    import torch

    return [f"GPU-{torch.cuda.get_device_properties(k).uuid}" for k in range(count)]


@contextlib.contextmanager
def gpu_slot(lock_dir: Path, gpus: list[str], fallback: int, wait_s: float = 0.5):
    """Hold one of the GPUs named ``gpus`` (:func:`visible_gpu_names`) for the duration of a job: an
    exclusive lock on ``lock_dir/gpu<name>.lock``, the first that is free (waiting while all are taken);
    yields its index among ``gpus``. Jobs of a local parallel sweep on a multi-GPU machine thus run on
    distinct GPUs, however the worker pool schedules them. The lock goes with the process, so a killed job
    frees its GPU. Where locks cannot be taken (a file system without them), GPU ``fallback`` (the job
    number modulo the GPUs), with a warning."""
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        while (slot := _free_slot(lock_dir, gpus)) is None:
            time.sleep(wait_s)
    except OSError as err:
        slot, unlockable = None, err
    if slot is None:
        warnings.warn(f"cannot lock a GPU for this job ({unlockable}); it runs on cuda:{fallback}, which other "
                      "jobs may share")
        yield fallback
        return
    k, handle = slot
    try:
        yield k
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _free_slot(lock_dir: Path, gpus: list[str]) -> tuple[int, IO] | None:
    """The first of ``gpus`` whose lock this process takes, with the lock file's handle; None while every
    one is held. Raises OSError where locks cannot be taken."""
    for k, name in enumerate(gpus):
        handle = open(lock_dir / f"gpu{name}.lock", "wb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        except OSError:
            handle.close()
            raise
        return k, handle
    return None


def limit_threads(threads: int) -> None:
    """Limit torch's intra-op threads, and OpenMP/MKL's for anything started from this process."""
    import torch

    torch.set_num_threads(threads)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)


def _job_info(run_dir: Path, summary: dict | None) -> tuple[str, str]:
    """Job number and overrides of the command that trained the run in ``run_dir``: from its summary; else (a
    summary from before it recorded them, or a job killed before it wrote one) from Hydra's ``.hydra/``, but
    only if that command asked for the run's own config, or no config was written (a job killed while loading
    its data). Hydra rewrites ``.hydra/`` for every command started in the directory, also one refused
    (another config) or one of another experiment that found the run finished; the command that trained the
    run is then not known, and both are left empty."""
    job = (summary or {}).get("job")
    if isinstance(job, dict):
        return ("" if job.get("num") is None else str(job["num"])), " ".join(job.get("overrides") or ())
    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))["hydra"]
        # A job killed before it wrote its config.yaml (loading its data) has only Hydra's record.
        own = run_dir / "config.yaml"
        if own.exists() and _config(run_dir / ".hydra" / "config.yaml") != _config(own):
            return "", ""
        return str(hydra["job"].get("num", "")), " ".join(hydra["overrides"]["task"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, yaml.YAMLError, OmegaConfBaseException):
        return "", ""  # a config.yaml written in Latin-1 (under such a locale, before bnopt wrote UTF-8) among them


def _config(path: Path) -> dict:
    """The resolved config in ``path`` without the keys that may change between the commands of one run: the
    thread count and device (a job requeued elsewhere). Its ``name`` stays: it tells the experiment apart.
    A key added since the run was written reads as the value that computes what it computed."""
    config = with_keys_added_later(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return {key: value for key, value in config.items() if key not in ("threads", "device")}


def last_logged_step(run_dir: Path) -> int | str:
    """The step of the last complete row of ``run_dir``'s metrics.csv ("" if none): how far a run got
    whose summary, written as it starts, still gives the step it started from."""
    try:
        # a damaged byte costs its own row, not the step of the last good one
        lines = (run_dir / "metrics.csv").read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    except OSError:
        return ""
    complete = [line for line in lines[1:] if line.endswith("\n")]
    step = complete[-1].split(",", 1)[0] if complete else ""
    return int(step) if step.isdigit() else ""


def planned_jobs(sweep_dir: Path, warn=print) -> list[list[str]] | None:
    """The overrides of each job the sweep in ``sweep_dir`` set out to run, in job-number order, expanded
    from the ``multirun.yaml`` Hydra writes as a sweep starts (the last sweep's, where several were started
    there) as Hydra's basic sweeper expands them. None where there is no such file, or it cannot be expanded
    (named through ``warn``): another sweeper, or a sweep over config files by ``glob``."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
    try:
        hydra = OmegaConf.load(path).hydra
        if hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
            warn(f"index: {path}: swept by {hydra.sweeper.get('_target_')}, whose jobs the index cannot "
                 "list before they start: a job that never started is not in it")
            return None
        params = [f"{key}={value}" for key, value in (hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *hydra.overrides.task])
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except (OSError, KeyError, AttributeError, ValueError, yaml.YAMLError, OmegaConfBaseException,
            HydraException) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        warn(f"index: {path}: its jobs cannot be listed ({why}); a job that never started is not in the index")
        return None


def _overrides_run(run_dir: Path, summary: dict | None) -> list[tuple[str, ...]]:
    """The override lists of the commands that started in ``run_dir``: the one in its summary (the command
    that trained it) and the last one Hydra recorded in ``.hydra/`` (which may be a later one)."""
    found = []
    job = (summary or {}).get("job")
    if isinstance(job, dict) and isinstance(job.get("overrides"), list):
        found.append(tuple(job["overrides"]))
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        overrides = None
    if isinstance(overrides, list):
        found.append(tuple(overrides))
    return found


def index_rows(sweep_dir: Path, warn=print) -> list[dict]:
    rows, started = [], set()
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # Read here, not with RunDirectory.read_summary: this module stays free of torch (the index script's
        # start-up), and the index tells a missing summary from an unreadable one.
        try:
            summary, problem = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), None
        except (OSError, ValueError) as err:
            summary, problem = None, "missing" if isinstance(err, OSError) else "unreadable"
        if summary is not None and not isinstance(summary, dict):
            summary, problem = None, "unreadable"
        job, overrides = _job_info(run_dir, summary)
        started.update(_overrides_run(run_dir, summary))
        if not job and problem == "missing":
            continue  # not a job of this sweep
        row = {"job": job, "dir": run_dir.name, "overrides": overrides}
        if summary is None:
            warn(f"index: {run_dir / 'summary.json'}: {problem}")
            row["status"] = "unknown"
        else:
            row.update(status=status_now(run_dir, summary.get("status", "unknown")), steps=summary.get("steps", ""),
                       wall_time_s=summary.get("wall_time_s", ""), error=summary.get("error") or "")
            if row["status"] in ("running", "killed"):
                row["steps"] = last_logged_step(run_dir)
            if row["status"] == "killed":
                row["error"] = killed_error(run_dir)
            row.update({m: summary.get("final", {}).get(m, "") for m in FINAL_METRICS})
        rows.append(row)
    # A job of a sweep stopped before it (Ctrl-C, a SLURM job cancelled while it waited, the sweep's own
    # process killed) leaves no directory; listed, so that a figure is not drawn from fewer seeds unawares.
    for num, job_overrides in enumerate(planned_jobs(sweep_dir, warn) or []):
        if tuple(job_overrides) not in started:
            rows.append({"job": str(num), "dir": "", "overrides": " ".join(job_overrides), "status": "not started"})
    return sorted(rows, key=lambda r: (int(r["job"]) if str(r["job"]).isdigit() else 10**9, r["dir"]))


def write_index(sweep_dir: Path, warn=print) -> Path | None:
    """``<sweep_dir>/index.csv``: one row per run directory in the sweep (job number, overrides, status,
    steps, final metrics, wall time, error) and per job it never started. None, and no file, where there is
    nothing to index."""
    path = sweep_dir / "index.csv"
    rows = index_rows(sweep_dir, warn)
    if not rows:
        return None

    def write_rows(tmp: Path) -> None:
        with open(tmp, "x", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(rows)

    # Durably: the index of a cluster sweep outlives a node that crashes after it. Through a temporary file of
    # its own: the jobs of a cluster sweep stopped together (a time limit) each write the index at once, and
    # with one shared name one job's rename took the file from under another's. (tempfile's files are private
    # to their owner; the index is for the whole team to read.)
    write_durably(path, write_rows, tmp=path.with_name(f"index.csv.{uuid.uuid4().hex}.tmp"))
    return path


def announce_index(sweep_dir: Path) -> None:
    """:func:`write_index`, naming the file on stdout and the runs it cannot read on stderr: what a sweep
    prints when it ends, or when a signal stops it."""
    path = write_index(sweep_dir, warn=lambda m: print(m, file=sys.stderr))
    nothing = f"none, as {sweep_dir} holds no job directories and no multirun.yaml that lists jobs"
    print(f"sweep index: {path or nothing}")

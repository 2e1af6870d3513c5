"""What ``python train.py`` runs for each job, single run or one job of a sweep.

User errors (a bad config value, a missing or damaged data set, a checkpoint of another run in the output
directory, a run that another process is training, a full disk) print one line and exit with status 2, no
traceback. In a sweep (``-m``) a job that fails or diverges is recorded in its ``summary.json`` and the sweep
goes on; a job refused because its directory holds another run (another config, or a trainer at work) leaves
that run's summary as it is, and so does a command refused for a bad value or missing data in the directory of
a run that started training (its summary says how that run stopped). A signal that stops a job of a sweep run
job by job (Hydra's default launcher) stops the sweep too, with exit status 130, as does a Ctrl-C that reaches
the process of a sweep of any launcher (for SLURM it stops the waiting: the submitted jobs go on).
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnopt.config import ConfigError, check_added_keys, check_one_config_per_group, check_threads
from bnopt.data import DatasetNotFoundError, DatasetUnreadableError
from bnopt.hydra_callbacks import SweepIndex
from bnopt.rundir import FINISHED, OutputDirError, RunBusyError, RunDirectory
from bnopt.sweeps import (announce_index, gpu_lock_dir, gpu_slot, job_threads, limit_threads,
                          visible_gpu_names)
from bnopt.train import AnotherConfigError, DiskFullError, ResumeError, train

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # Hydra's default: jobs one by one
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetUnreadableError, ResumeError, OutputDirError,
               RunBusyError, DiskFullError)
log = logging.getLogger("bnopt")

# configs/hydra/launcher/*.yaml carry the launcher plugins' own names, so Hydra checks them against the
# plugins' schemas and warns that it will stop doing so; they are complete configs either way. Filtered here
# because this module is imported in every job process, where the warning would otherwise repeat per job.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # As typed: an interpolation in an override (optim.lr=${x}) is for the config's checks to resolve or refuse.
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    job = {"num": hydra_cfg.job.num if in_sweep else None, "overrides": overrides}
    try:
        check_one_config_per_group(overrides)
        check_added_keys(cfg, overrides, groups=hydra_cfg.runtime.choices.keys(),
                         compose=lambda others: compose(hydra_cfg.job.config_name, overrides=others))
        threads = job_threads(check_threads(cfg), hydra_cfg.launcher if in_sweep else None)
        if threads:
            limit_threads(threads)
        gpus = torch.cuda.device_count() if in_sweep and cfg.device in ("auto", "cuda") else 0
        if gpus > 1:
            # a local parallel sweep on a multi-GPU machine: one free GPU per job
            with gpu_slot(gpu_lock_dir(), visible_gpu_names(gpus), fallback=hydra_cfg.job.num % gpus) as gpu:
                torch.cuda.set_device(gpu)  # what allocates on "the current GPU" allocates on this one
                cfg.device = f"cuda:{gpu}"
                summary = train(cfg, run_dir, job)
        else:
            summary = train(cfg, run_dir, job)
    except USER_ERRORS as err:
        about_the_directory = isinstance(err, (ResumeError, RunBusyError))  # "... choose another output directory"
        key = f" ({'hydra.sweep.dir' if in_sweep else 'hydra.run.dir'}=...)" if about_the_directory else ""
        print(f"error: {err}{key}", file=sys.stderr)
        the_runs_own = not isinstance(err, (RunBusyError, AnotherConfigError))  # else the summary is another run's
        if the_runs_own:
            record_failure(run_dir, err, job)
        if not in_sweep:
            sys.exit(2)
        return failed(err) if the_runs_own else None  # UnfinishedJobs names what the directory holds
    except Exception as err:
        if not in_sweep:
            raise
        log.exception("job %s failed; the sweep goes on", run_dir)
        return failed(err)
    if summary["status"] == "interrupted":
        if not in_sweep:
            print(f"{run_dir}: interrupted at step {summary['steps']}; to continue it, run the same command with "
                  f"{override_word('hydra.run.dir', run_dir)}", file=sys.stderr)
        elif hydra_cfg.launcher._target_ == BASIC_LAUNCHER:
            stop_sweep(Path(hydra_cfg.sweep.dir), run_dir)
    return summary


def failed(err: Exception) -> dict:
    """A failed job's status and error, as its summary records them and as a sweep's job returns them for the
    callbacks: its run directory may hold a finished run of the same config (a command refused for a bad value
    leaves it as it was), which must not pass for this job's result."""
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"}


def stop_sweep(sweep_dir: Path, run_dir: Path) -> NoReturn:
    """A signal stopped this job (a first Ctrl-C, or SIGTERM), and the sweep's next jobs would run in this
    same process: they are not started, as a signal to a single run ends the command. The index is written
    here (the callback that writes it when a sweep ends does not run), and the exit status is 130, a shell's
    for an interrupted command. Other launchers are left to themselves: a job ends ``interrupted`` there, and
    a joblib pool may still start the jobs it has queued."""
    end_sweep(sweep_dir, f"{run_dir}: interrupted, so the sweep stops here; {how_to_continue(sweep_dir)}")


def sweep_stopped_by_ctrl_c() -> None:
    """A Ctrl-C reached Hydra's own process during a sweep (in a terminal it reaches the jobs of this machine
    too): while its launcher waited on the jobs, or while a job run job by job loaded its data. Instead of
    Python's traceback, the command says how to continue, writes the index and exits with status 130. Jobs on
    this machine stop at their next step with a checkpoint, unless a joblib pool kills them first: they then
    continue from their last checkpoint, their summaries saying ``running`` until then. Jobs submitted to
    SLURM are not cancelled (submitit leaves them). Returns when this process launched no sweep: a single
    run's second Ctrl-C keeps its traceback."""
    if SweepIndex.launched is None:
        return
    sweep_dir, launcher = SweepIndex.launched
    if launcher == SLURM_LAUNCHER:
        why = (f"stopped waiting for the sweep in {sweep_dir}: its jobs submitted to SLURM go on (squeue and "
               f"scancel list and cancel them); python scripts/sweep_index.py {shlex.quote(str(sweep_dir))} lists them "
               "again")
    else:
        why = f"the sweep stopped (Ctrl-C); {how_to_continue(sweep_dir)}"
    end_sweep(sweep_dir, why)


def how_to_continue(sweep_dir: Path) -> str:
    return f"to continue it, run the same command with {override_word('hydra.sweep.dir', sweep_dir)}"


def override_word(key: str, path: Path) -> str:
    """``key=path`` as one word to paste into a shell, which Hydra reads back as ``path`` (a directory with a
    space in its name, under a home directory named "My Drive", goes in the shell's quotes too)."""
    return shlex.quote(hydra_override(key, path))


def hydra_override(key: str, path: Path) -> str:
    """``key=path`` as one override that Hydra, then OmegaConf, read back as ``path``: a plain path as typed,
    any other (a comma made a sweep over two values; a quote, brackets or a non-ASCII letter a parse error) in
    Hydra's double quotes. In them a backslash escapes only a quote and the backslashes before one (or before
    the closing quote); OmegaConf then reads ``${`` as an interpolation unless escaped, and the backslashes
    before it likewise. ``hydra_override`` in experiments/common.sh is its counterpart for the recipes."""
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9_.@%+:-]*/[A-Za-z0-9_./@%+:-]*", text):  # with a "/", never a number or a bool
        return f"{key}={text}"
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf's escapes
    escaped = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), escaped)
    return f'{key}="{escaped}"'


def end_sweep(sweep_dir: Path, why: str) -> NoReturn:
    """Say why the sweep ends here, write its index (a directory exists once a job started) and exit with
    status 130, a shell's for an interrupted command."""
    print(why, file=sys.stderr)
    if sweep_dir.is_dir():
        announce_index(sweep_dir)
    sys.exit(130)


def record_failure(run_dir: Path, err: Exception, job: dict) -> None:
    """A ``failed`` summary for errors raised before the run wrote its own (a bad value, missing data, an
    unreadable checkpoint); a later failure replaces an earlier one, and a summary already there keeps its
    ``job``. A run that started training here keeps its summary, which says how it stopped (killed,
    interrupted, failed, finished) and from where the right command resumes it: a command refused for its
    value or data never touched that run. Only the run's own files being unreadable (a ResumeError) is its
    failure. Written only under the run directory's lock: a command refused for a bad value must not write
    over the summary of a run that another process is training."""
    run = RunDirectory(run_dir)
    try:
        with run.claimed():
            previous = run.read_summary() or {"job": job}
            trained_here = "started" in previous  # only train() writes it, as a run starts
            if previous.get("status") not in FINISHED and (isinstance(err, ResumeError) or not trained_here):
                run.write_summary({**previous, **failed(err)})
    except (RunBusyError, OSError):
        pass  # another process's run, or an unwritable directory (itself the error being reported)

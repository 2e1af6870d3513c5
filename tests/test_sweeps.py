"""Sweeps that survive: thread shares, GPU slots, local parallel and submitit sweeps with failing and
diverging jobs, the sweep index, and an interrupted run that resumes to exactly the uninterrupted result."""

import contextlib
import copy
import csv
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

import bnopt.train
from bnopt.rundir import RunDirectory, describe_machine
from bnopt import sweeps
from bnopt.sweeps import gpu_lock_dir, gpu_slot, index_rows, job_threads, visible_gpu_names
from conftest import REPO, ascii_locale_env, compose_config, read_rows, run_cli, train_run


def launcher(target: str, **fields):
    return OmegaConf.create({"_target_": target, **fields})


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_each_job_takes_its_share_of_the_cores():
    assert job_threads(None, launcher(JOBLIB, n_jobs=2), cores=2) == 1
    assert job_threads(None, launcher(JOBLIB, n_jobs=2), cores=16) == 8
    assert job_threads(None, launcher(JOBLIB, n_jobs=-1), cores=4) == 1
    assert job_threads(None, launcher(JOBLIB, n_jobs=-2), cores=4) == 1  # joblib: all cores but one -> 3 jobs
    assert job_threads(None, launcher(JOBLIB, n_jobs=64), cores=4) == 1
    assert job_threads(3, launcher(JOBLIB, n_jobs=2), cores=2) == 3  # an explicit `threads` wins
    assert job_threads(None, launcher(SLURM, cpus_per_task=8), cores=64) == 8
    assert job_threads(None, launcher("hydra._internal.core_plugins.basic_launcher.BasicLauncher"), cores=2) is None
    assert job_threads(None, None) is None


def test_concurrent_jobs_get_distinct_gpu_slots(tmp_path):
    with gpu_slot(tmp_path, ["0", "1"], 0) as a, gpu_slot(tmp_path, ["0", "1"], 0) as b:
        assert {a, b} == {0, 1}
        third: list[int] = []
        waiter = threading.Thread(target=lambda: third.append(next_slot(tmp_path, ["0", "1"])))
        waiter.start()
        waiter.join(timeout=1.5)
        assert waiter.is_alive() and not third  # both GPUs taken: the third job waits
    waiter.join(timeout=5)
    assert third == [0]  # and gets the first one freed


def next_slot(lock_dir, gpus):
    with gpu_slot(lock_dir, gpus, 0, wait_s=0.05) as k:
        return k


def test_jobs_that_see_other_gpus_lock_each_physical_gpu_once(tmp_path, monkeypatch):
    """Two sweeps side by side, one with CUDA_VISIBLE_DEVICES=3,5 and one with 5: GPU 5 is the first's
    cuda:1 and the second's cuda:0, one lock; two SLURM jobs on one node each see their own GPU as cuda:0,
    two locks. The locks are the machine's, not a sweep directory's."""
    from types import SimpleNamespace

    def properties(k):  # the physical GPUs' UUIDs, as this process numbers them
        visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
        return SimpleNamespace(uuid=f"uuid-of-{visible[k]}")

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpu_names(2) == ["GPU-uuid-of-3", "GPU-uuid-of-5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert visible_gpu_names(1) == ["GPU-uuid-of-5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # another SLURM job's cuda:0
    assert visible_gpu_names(1) == ["GPU-uuid-of-7"]
    with gpu_slot(tmp_path, ["3", "5"], 0) as a, gpu_slot(tmp_path, ["3", "5"], 0) as b:
        assert (a, b) == (0, 1)
        with gpu_slot(tmp_path, ["7"], 0) as c:
            assert c == 0  # without waiting
        waiter = threading.Thread(target=next_slot, args=(tmp_path, ["5"]))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()  # GPU 5 is taken under either name
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert gpu_lock_dir() == gpu_lock_dir() != tmp_path and str(os.getuid()) in gpu_lock_dir().name


def test_without_file_locks_a_job_takes_its_job_number_s_gpu_with_a_warning(tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(sweeps.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"cannot lock a GPU .*No locks available.*runs on cuda:1"):
        with gpu_slot(tmp_path, ["0", "1"], fallback=1) as k:
            assert k == 1


def read_index(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "index.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # 14 s: a launcher plugin's pool of job processes
def test_local_parallel_sweep_goes_on_past_failed_and_diverged_jobs(tmp_path):
    # ++: its check composes the config again, in the job's process
    result = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=dln_bn", "scale=smoke",
                     "probes=none", "++optim.momentum=0.0", "norm=none,batchnorm", "optim.lr=-1,1e-6,1.0",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "schema" not in result.stderr  # the launcher configs' deprecation warning is filtered
    rows = read_index(tmp_path)
    assert [r["job"] for r in rows] == [str(i) for i in range(6)]
    by_lr = {(r["overrides"].split("norm=")[1].split()[0], r["overrides"].split("optim.lr=")[1]): r for r in rows}
    assert {r["status"] for (_, lr), r in by_lr.items() if lr == "-1"} == {"failed"}
    assert all("optim.lr=-1" in r["error"] for (_, lr), r in by_lr.items() if lr == "-1")
    assert {r["status"] for (_, lr), r in by_lr.items() if lr == "1e-06"} == {"completed"}
    assert by_lr[("none", "1.0")]["status"] == "diverged"
    assert float(by_lr[("batchnorm", "1e-06")]["train/loss"]) > 0
    threads = json.loads((tmp_path / "1" / "summary.json").read_text())["threads"]
    assert threads == max(1, (os.cpu_count() or 1) // 2)


def test_a_job_with_a_bad_thread_count_fails_alone(tmp_path):
    """``threads`` is read before the config's checks, to limit the job's threads: a bad one ended the
    whole sweep in torch's traceback, without an index."""
    result = run_cli("-m", "+experiment=dln_bn", "scale=smoke", "probes=none", "threads=-1,1",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    failed, completed = read_index(tmp_path)
    assert failed["status"] == "failed" and failed["error"].startswith("ConfigError: threads=-1 is not allowed")
    assert completed["status"] == "completed"


@pytest.mark.slow  # 13 s: a launcher plugin's pool of job processes
def test_submitit_path_runs_a_sweep_on_this_machine(tmp_path):
    result = run_cli("-m", "hydra/launcher=submitit_local", "+experiment=dln_bn", "scale=smoke", "probes=none",
                     "norm=none,batchnorm", "++optim.momentum=0.0", f"hydra.sweep.dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr
    rows = read_index(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    summary = json.loads((tmp_path / "1" / "summary.json").read_text())
    assert summary["threads"] == 1  # cpus_per_task of configs/hydra/launcher/submitit_local.yaml
    assert summary["job"] == {"num": 1, "overrides": ["+experiment=dln_bn", "scale=smoke", "probes=none", "norm=batchnorm",
                                                      "++optim.momentum=0.0"]}


def test_a_second_sweep_into_a_used_directory_leaves_the_index_naming_the_first(tmp_path):
    """Hydra rewrites a job's .hydra/ for every command started in it, also one that is then refused (another
    config): the index takes the job number and overrides from the summary of the run the directory holds."""
    sweep = ("-m", "+experiment=dln_bn", "scale=smoke", "probes=none", f"hydra.sweep.dir={tmp_path}")
    assert run_cli(*sweep, "optim.lr=1e-6,1e-7").returncode == 0
    first = read_index(tmp_path)
    assert [(r["job"], r["overrides"].split()[-1], r["status"]) for r in first] == [
        ("0", "optim.lr=1e-06", "completed"), ("1", "optim.lr=1e-07", "completed")]
    again = run_cli(*sweep, "optim.lr=3e-6,3e-7")
    assert again.returncode == 0, again.stderr  # the jobs are refused, the sweep is not
    refusals = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(refusals) == 2 and all("another config" in line and
                                      line.endswith("another output directory (hydra.sweep.dir=...)") for line in refusals)
    assert "optim.lr=3e-06" in (tmp_path / "0" / ".hydra" / "hydra.yaml").read_text()  # Hydra's, rewritten
    assert read_index(tmp_path) == first


def test_the_index_lists_the_jobs_a_sweep_never_started(tmp_path):
    """A sweep stopped before some of its jobs (Ctrl-C, SLURM jobs cancelled while they waited, the sweep's
    process killed) left them out of its index: a figure could be drawn from fewer seeds without a word. They
    are listed from Hydra's multirun.yaml, numbered and with the overrides Hydra gives them (the experiment's
    sweep and the command line's, together); a directory that Hydra's record or its summary ties to a job is
    that job's, whatever became of it."""
    assert run_cli("-m", "+experiment=fig8", "scale=smoke", "probes=none", "train.steps=2", "norm=batchnorm,none",
                   f"hydra.sweep.dir={tmp_path}").returncode == 0
    ran = {r["job"]: r["overrides"] for r in read_index(tmp_path)}
    assert len(ran) == 6 and {r["status"] for r in read_index(tmp_path)} == {"completed"}
    for job in ("3", "5"):  # as if never started
        shutil.rmtree(tmp_path / job)
    (tmp_path / "1" / "summary.json").unlink()  # killed before its first summary: Hydra's record names it
    warnings = []
    rows = {r["job"]: r for r in index_rows(tmp_path, warnings.append)}
    assert {job: (r["dir"], r["status"]) for job, r in rows.items()} == {
        "0": ("0", "completed"), "1": ("1", "unknown"), "2": ("2", "completed"), "3": ("", "not started"),
        "4": ("4", "completed"), "5": ("", "not started")}
    assert {job: r["overrides"] for job, r in rows.items()} == ran
    assert warnings == [f"index: {tmp_path / '1' / 'summary.json'}: missing"]
    for job in ("0", "1", "2", "4"):
        shutil.rmtree(tmp_path / job)
    assert [(r["job"], r["status"]) for r in index_rows(tmp_path)] == [(str(n), "not started") for n in range(6)]
    multirun = yaml.safe_load((tmp_path / "multirun.yaml").read_text())
    for change, why in ((("sweeper", "_target_"), "swept by hydra_plugins.optuna.Sweeper, whose jobs the index cannot"),
                        (("overrides", "task"), "its jobs cannot be listed (ConfigLoader is not set)")):
        edited = copy.deepcopy(multirun)
        edited["hydra"][change[0]][change[1]] = ("hydra_plugins.optuna.Sweeper" if change[1] == "_target_"
                                                 else ["norm=glob(*)"])  # glob reads the config files
        (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(edited))
        warnings = []
        assert index_rows(tmp_path, warnings.append) == []
        assert len(warnings) == 1 and why in warnings[0] and "a job that never started is not in" in warnings[0]


def test_unfinished_jobs_lists_a_job_whose_run_another_process_is_training_and_failed_ones(tmp_path):
    """What the figure recipes check before drawing: a job refused because its run is busy is listed, and so
    are jobs that failed (a bad value), with their error; the job that trained its run is not."""
    record = tmp_path / "unfinished.txt"
    sweep = tmp_path / "sweep"
    busy = RunDirectory(sweep / "1")
    busy.path.mkdir(parents=True)
    with busy.claimed():
        busy.write_summary({"status": "running"})
        result = run_cli("-m", "+experiment=dln_bn", "scale=smoke", "probes=none", "norm=none,batchnorm",
                         "optim.lr=-1,1e-6", f"hydra.sweep.dir={sweep}",
                         "+hydra.callbacks.unfinished_jobs._target_=bnopt.hydra_callbacks.UnfinishedJobs",
                         f"+hydra.callbacks.unfinished_jobs.record={record}")
    assert result.returncode == 0, result.stderr  # the sweep goes on past the refused job
    assert {r["dir"]: r["status"] for r in read_index(sweep)} == {"0": "failed", "1": "running", "2": "failed",
                                                                 "3": "completed"}
    failed = "ended failed (ConfigError: optim.lr=-1 is not allowed: a positive learning rate)"
    assert record.read_text().splitlines() == [f"{sweep / '0'}: {failed}", f"{busy.path}: another process is training it",
                                               f"{sweep / '2'}: {failed}"]


def test_unfinished_jobs_lists_a_refused_job_whose_directory_holds_the_finished_run(tmp_path):
    """A command refused for a bad value leaves a finished run in its directory as it was: the job must be
    listed as failed all the same, whether or not the bad key is part of the run's identity, and not as
    another config's (the recipe's advice for that, another tree, would fail the same way)."""
    sweep = ("-m", "+experiment=dln_bn", "scale=smoke", "probes=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             "+hydra.callbacks.unfinished_jobs._target_=bnopt.hydra_callbacks.UnfinishedJobs")
    assert run_cli(*sweep, f"+hydra.callbacks.unfinished_jobs.record={tmp_path / 'first'}").returncode == 0
    assert not (tmp_path / "first").exists()  # nothing to list
    for bad, error in (("threads=0", "ConfigError: threads=0 is not allowed"),
                       ("train.eval_every=0", "ConfigError: train.eval_every=0 is not allowed")):
        record = tmp_path / bad.split("=")[0]
        assert run_cli(*sweep, bad, f"+hydra.callbacks.unfinished_jobs.record={record}").returncode == 0
        assert record.read_text().startswith(f"{tmp_path / 'sweep' / '0'}: ended failed ({error}")
    assert read_index(tmp_path / "sweep")[0]["status"] == "completed"  # the run itself stays as it was


def test_the_sweep_index_is_written_and_printed_in_utf8_under_an_ascii_locale(tmp_path):
    """index.csv is UTF-8, as the files it is built from, whatever the locale: under one whose encoding is
    ASCII, a job's non-ASCII override stopped sweep_index.py, reading Hydra's overrides.yaml (UTF-8) in ASCII,
    then writing index.csv and printing it in ASCII."""
    trained = run_cli("+experiment=dln_bn", "scale=smoke", "probes=none", 'name="réseau"',
                      f"hydra.run.dir={tmp_path / '0'}")
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run([sys.executable, str(REPO / "scripts/sweep_index.py"), str(tmp_path)],
                            capture_output=True, env=ascii_locale_env())
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    index = (tmp_path / "index.csv").read_text(encoding="utf-8")
    assert read_index(tmp_path)[0]["overrides"].endswith('name="réseau"') and result.stdout.decode("utf-8") == index


def test_sweep_index_script_rebuilds_the_index_of_a_killed_sweep(tmp_path):
    train_run(tmp_path / "0", "+experiment=dln_bn", "scale=smoke", "probes=none")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text('{"status": "runn')  # killed while writing
    result = subprocess.run([sys.executable, str(REPO / "scripts/sweep_index.py"), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0
    rows = read_index(tmp_path)
    assert [(r["dir"], r["status"]) for r in rows] == [("0", "completed"), ("1", "unknown")]
    assert "summary.json: unreadable" in result.stderr
    (tmp_path / "index.csv").unlink()
    with_a_typo = subprocess.run([sys.executable, str(REPO / "scripts/sweep_index.py"), str(tmp_path / "nope"),
                                  str(tmp_path)], capture_output=True, text=True)
    assert with_a_typo.returncode == 1 and f"{tmp_path / 'nope'}: not a directory" in with_a_typo.stderr
    assert [r["dir"] for r in read_index(tmp_path)] == ["0", "1"]  # the other directory is indexed all the same


def test_a_run_killed_without_a_word_is_told_from_one_still_training(tmp_path):
    """A SIGKILL leaves a summary saying ``running`` (written as the run starts, with the step it started
    from). Its .lock names the process that trained it: where that is on this machine and the lock is free,
    the index, the figures' and report's reading and a sweep's record of unfinished jobs say ``killed``
    (however the PID reads: reused, or of another PID namespace); where the lock is held, or the holder is
    another machine's, ``running``. Either way the index gives the last step logged."""
    from bnopt.hydra_callbacks import why_not_this_jobs_run
    from bnopt.results import read_run, unfinished_note

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, here = int(ended.stdout), os.getpid(), socket.gethostname()
    holders = {"0": (f"pid {dead} on {here}", False), "1": (f"pid {alive} on {here}", True),
               "2": (f"pid {dead} on another-node", False), "3": (f"pid {alive} on {here}", False),
               "4": (f"pid {dead} on {here}", True)}
    train_run(tmp_path / "0", "+experiment=dln_bn", "scale=smoke", "probes=none", "train.steps=20")
    config = RunDirectory(tmp_path / "0").read_config()
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    with contextlib.ExitStack() as trainers:
        for job, (holder, locked) in holders.items():
            if job != "0":
                shutil.copytree(tmp_path / "0", tmp_path / job)
            (tmp_path / job / "summary.json").write_text(json.dumps({**summary, "status": "running", "steps": 0}))
            (tmp_path / job / ".lock").write_text(holder + "\n")
            if locked:  # a trainer holds it, as RunDirectory.claimed does
                handle = trainers.enter_context(open(tmp_path / job / ".lock"))
                fcntl.flock(handle, fcntl.LOCK_EX)
        (tmp_path / "3" / "checkpoint.pt").unlink()
        rows = {r["dir"]: r for r in index_rows(tmp_path)}
        assert {job: (r["status"], r["steps"]) for job, r in rows.items()} == {
            "0": ("killed", 15), "1": ("running", 15), "2": ("running", 15), "3": ("killed", 15), "4": ("running", 15)}
        assert rows["0"]["error"] == ("its process ended without a word (the summary says running); the same "
                                      "command resumes it from its last checkpoint")
        assert rows["3"]["error"].endswith("the same command trains it afresh (it wrote no checkpoint)")
        runs = [read_run(tmp_path / job) for job in holders]
        assert [r.status for r in runs] == ["killed", "running", "running", "killed", "running"]
        assert unfinished_note(runs).startswith("5 run(s) not finished (killed 2, running 3)")
        why = {job: why_not_this_jobs_run(RunDirectory(tmp_path / job), config) for job in ("0", "1")}
        assert why == {"0": f"ended killed ({rows['0']['error']})", "1": "another process is training it"}


def test_where_locks_cannot_be_tested_a_holder_on_this_machine_is_gone_when_its_pid_is(tmp_path, monkeypatch):
    from bnopt import runlock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, gone in ((int(ended.stdout), True), (os.getpid(), False)):
        (tmp_path / ".lock").write_text(f"pid {pid} on {socket.gethostname()}\n")
        assert runlock.trainer_gone(tmp_path) is gone


def test_a_damaged_lock_names_no_holder_so_its_run_is_not_taken_for_killed(tmp_path):
    """Bytes that are not UTF-8 in ``.lock`` (a damaged disk) leave the run's status as its summary says: the
    report, the figures and the index ask each ``running`` run's lock, and one such file made them crash."""
    from bnopt import runlock

    (tmp_path / ".lock").write_bytes(b"pid \xff\xfe on host\n")
    assert runlock.trainer_gone(tmp_path) is False
    assert runlock.status_now(tmp_path, "running") == "running"


def test_on_windows_a_holder_on_this_machine_is_never_taken_for_gone_nor_signalled(tmp_path, monkeypatch):
    """Reading runs works without flock (Windows), where os.kill(pid, 0) would end the process with that pid:
    a run trained under WSL, which shares Windows' host name, read from Windows must kill nothing there."""
    from bnopt import runlock

    def kill(pid, signal):
        raise AssertionError(f"os.kill({pid}, {signal}) ends process {pid} on Windows")

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"pid {int(ended.stdout)} on {socket.gethostname()}\n")
    monkeypatch.setattr(runlock, "fcntl", None)
    assert runlock.trainer_gone(tmp_path) is True  # POSIX without flock: asks the pid, which is gone
    monkeypatch.setattr(runlock, "os", types.SimpleNamespace(name="nt", kill=kill))  # runlock's os alone
    assert runlock.trainer_gone(tmp_path) is False


def test_the_index_script_leaves_a_run_directory_alone(tmp_path):
    train_run(tmp_path / "run", "+experiment=dln_bn", "scale=smoke", "probes=none", "train.steps=2")
    result = subprocess.run([sys.executable, str(REPO / "scripts/sweep_index.py"), str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "a run's directory, not a sweep's" in result.stderr
    assert not (tmp_path / "run" / "index.csv").exists()
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(REPO / "scripts/sweep_index.py"), str(tmp_path / "empty")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and ("no job directories in it, nor a multirun.yaml that lists jobs (is it a "
                                       "sweep's?); not indexed") in result.stderr
    assert list((tmp_path / "empty").iterdir()) == []  # no index of nothing


def test_the_index_orders_jobs_by_number_and_leaves_out_directories_of_no_job(tmp_path):
    for num, summary in ((10, '{"status": "completed", "steps": 30, "final": {"train/loss": 0.5}, '
                              '"job": {"num": 10, "overrides": ["seed=10", "norm=batchnorm"]}}'), (2, None),
                         (3, '{"status": "diverged", "steps": 7, "error": null}'), (4, '["not", "a summary"]')):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        hydra = {"hydra": {"job": {"num": num}, "overrides": {"task": [f"seed={num}", "norm=none"]}}}
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        (job / ".hydra" / "config.yaml").write_text(f"name: dln_bn\nseed: {num}\nthreads: null\n")
        (job / "config.yaml").write_text(f"name: dln_bn\nseed: {num}\nthreads: 2\n")  # its job's share of cores
        if summary:  # job 2 was killed before it wrote one
            (job / "summary.json").write_text(summary)
    (tmp_path / "notes").mkdir()  # a user's own directory beside the jobs
    warnings = []
    rows = index_rows(tmp_path, warn=warnings.append)
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("2", "seed=2 norm=none", "unknown"), ("3", "seed=3 norm=none", "diverged"),
        ("4", "seed=4 norm=none", "unknown"),
        ("10", "seed=10 norm=batchnorm", "completed")]  # by number ("10" sorts before "2" as text); the summary's job
    assert (rows[1]["steps"], rows[1]["error"], rows[3]["train/loss"], rows[3]["test/acc"]) == (7, "", 0.5, "")
    assert warnings == [f"index: {tmp_path / '2' / 'summary.json'}: missing",
                        f"index: {tmp_path / '4' / 'summary.json'}: unreadable"]


def test_the_index_lists_a_job_killed_while_loading_its_data(tmp_path):
    """Killed before its config.yaml and summary (the data set still loading, or the OOM killer), a job has only
    Hydra's record of its command; it was left out of the index as if it were no job."""
    job = tmp_path / "1"
    (job / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": 1}, "overrides": {"task": ["seed=1"]}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (job / ".hydra" / "config.yaml").write_text("name: dln_bn\nseed: 1\n")
    warnings = []
    assert [(r["job"], r["overrides"], r["status"]) for r in index_rows(tmp_path, warn=warnings.append)] == [
        ("1", "seed=1", "unknown")]
    assert warnings == [f"index: {job / 'summary.json'}: missing"]


def test_jobs_that_write_the_index_at_once_both_finish(tmp_path, monkeypatch):
    """The jobs of a cluster sweep stopped together write the index at once. Here a second job writes it while
    the first is between opening its temporary file and renaming it; with one shared temporary name the first
    job's rename found the file gone (FileNotFoundError) and its index was lost."""
    run = tmp_path / "0"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "steps": 3, "job": {"num": 0, "overrides": []}}')
    rows_of = sweeps.index_rows
    other_jobs = [lambda: sweeps.write_index(tmp_path)]

    def rows_while_another_job_writes(sweep_dir, warn):
        while other_jobs:
            other_jobs.pop()()
        return rows_of(sweep_dir, warn)

    monkeypatch.setattr(sweeps, "index_rows", rows_while_another_job_writes)
    sweeps.write_index(tmp_path)
    assert not other_jobs and [r["status"] for r in read_index(tmp_path)] == ["completed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "index.csv"]  # no temporary file left
    monkeypatch.setattr(sweeps, "index_rows", lambda sweep_dir, warn: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sweeps.write_index(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "index.csv"]  # nor after a failure


def test_the_index_reaches_the_disk_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    """A node that crashes just after a sweep wrote its index must leave the old index or the new one, not
    an empty file: the index's data is synced before its rename, and the directory after."""
    run = tmp_path / "0"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "steps": 3, "job": {"num": 0, "overrides": []}}')
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", Path(dst))), replace(src, dst)))
    sweeps.write_index(tmp_path)
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].parent == tmp_path and events[0][1].name.startswith("index.csv.")  # the temporary file
    assert events[1:] == [("replace", tmp_path / "index.csv"), ("fsync", tmp_path)]


def test_the_index_does_not_name_a_command_it_cannot_know(tmp_path):
    """A summary from before it recorded the job (our committed runs): Hydra's .hydra/ names the last command
    started in the directory, here another figure's sweep that found the shared run finished, not the one
    that trained it (config.yaml's name). Its command is then left out, not guessed."""
    run = tmp_path / "none_lr0.1_seed0"
    (run / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": 0}, "overrides": {"task": ["norm=none", "+experiment=fig11"]}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run / ".hydra" / "config.yaml").write_text("name: fig11\noptim:\n  lr: 0.1\nseed: 0\n")
    (run / "config.yaml").write_text("name: fig1\noptim:\n  lr: 0.1\nseed: 0\n")
    (run / "summary.json").write_text('{"status": "completed", "steps": 3000}')
    [row] = index_rows(tmp_path)
    assert (row["job"], row["dir"], row["overrides"], row["status"]) == ("", "none_lr0.1_seed0", "", "completed")


def test_the_index_is_written_where_a_runs_files_are_not_utf8(tmp_path):
    """A config.yaml in Latin-1 (written under such a locale before bnopt wrote UTF-8), a damaged
    overrides.yaml or metrics.csv: each stopped the index with a UnicodeDecodeError. The run's command, which
    cannot be compared with Hydra's record, is left out; its last step is read from the rows that can be."""
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": 0}, "overrides": {"task": ["seed=0", "name=réseau"]}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra, allow_unicode=True), encoding="utf-8")
    (run / ".hydra" / "config.yaml").write_text("name: réseau\nseed: 0\n", encoding="utf-8")
    (run / "config.yaml").write_text("name: réseau\nseed: 0\n", encoding="latin-1")
    (run / ".hydra" / "overrides.yaml").write_bytes(b"- seed=0\n- name=r\xe9seau\n")
    (run / "metrics.csv").write_bytes(b"step,name,value,layer,eta\n3,train/loss,1.0,,\n7,train/loss,1\xe9")
    (run / "summary.json").write_text('{"status": "running", "steps": 0}')
    [row] = index_rows(tmp_path)
    assert (row["job"], row["overrides"], row["status"], row["steps"]) == ("", "", "running", 3)
    (run / "config.yaml").write_text("name: réseau\nseed: 0\n", encoding="utf-8")  # the same in UTF-8: its command
    assert index_rows(tmp_path)[0]["overrides"] == "seed=0 name=réseau"


def test_the_index_names_the_command_of_a_run_written_before_a_key_was_added(tmp_path):
    """Our committed runs' config.yaml predates keys such as data.x_std; a recipe run again finds them
    finished, and Hydra's .hydra/config.yaml, rewritten, has the keys: still the command that trained the run."""
    run = tmp_path / "batchnorm_lr1e-06_seed0"
    (run / ".hydra").mkdir(parents=True)
    hydra = {"hydra": {"job": {"num": 3}, "overrides": {"task": ["norm=batchnorm", "seed=0"]}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    old = {"name": "fig9", "seed": 0, "model": {"name": "dln", "depth": 25},
           "data": {"name": "gaussian_regression", "dim": 10}}
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    new = copy.deepcopy(old)
    new["model"]["norm_after_last"], new["data"]["x_std"], new["data"]["a_std"] = False, 1.0, 1.0
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(new))
    (run / "summary.json").write_text('{"status": "completed", "steps": 10000}')
    [row] = index_rows(tmp_path)
    assert (row["job"], row["overrides"]) == ("3", "norm=batchnorm seed=0")
    new["data"]["x_std"] = 2.0  # another run's command
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(new))
    [row] = index_rows(tmp_path)
    assert (row["job"], row["overrides"]) == ("", "")


# --- resume, deterministically -------------------------------------------------------------------------


class StopAtStep:
    """Stands in for the SIGTERM handler: asks the loop to stop once it has checked ``n`` times."""

    def __init__(self, n: int):
        self.checks, self.n = 0, n

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.n


def stopped_run(run_dir: Path, monkeypatch, at: int, *args: str) -> dict:
    """A run stopped (as by a signal) at step ``at``, with its checkpoint there."""
    real_stop_signals = bnopt.train.stop_signals
    monkeypatch.setattr(bnopt.train, "stop_signals", contextlib.contextmanager(lambda: (yield StopAtStep(at))))
    summary = train_run(run_dir, *args)
    monkeypatch.setattr(bnopt.train, "stop_signals", real_stop_signals)
    assert summary["status"] == "interrupted" and summary["steps"] == at
    return summary


@pytest.mark.parametrize("stop_after, noise_in_evaluation", [(7, False), (18, True)])  # 18: evaluates first
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, cifar_root, monkeypatch, stop_after,
                                                                     noise_in_evaluation):
    """VGG with noisy BN, augmentation, momentum, every probe (random landscape direction): stopped at a
    step that is not a checkpoint step, resumed from the last checkpoint, it ends with the uninterrupted
    run's metrics.csv, histograms and weights; with noise in evaluation too, its test rows included."""
    args = ("model=vgg", "data=cifar10", "norm=noisy_batchnorm", "probes=[ics,landscape,activations]",
            "probes.landscape.direction=random", "data.augment=true", "optim.momentum=0.9", "scale=smoke",
            "train.steps=24", "train.checkpoint_every=5", f"data.root={cifar_root}", "data.download=false",
            f"norm.noise.train_only={not noise_in_evaluation}")
    train_run(tmp_path / "reference", *args)
    stopped_run(tmp_path / "run", monkeypatch, stop_after, *args)  # interrupted at stop_after
    resumed = train_run(tmp_path / "run", *args)
    assert resumed["status"] == "completed" and resumed["steps"] == 24
    assert (tmp_path / "run/metrics.csv").read_text() == (tmp_path / "reference/metrics.csv").read_text()
    with np.load(tmp_path / "run/activations.npz") as a, np.load(tmp_path / "reference/activations.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)
    final = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "reference/checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_signal_during_the_final_evaluation_lets_the_run_finish(tmp_path, monkeypatch):
    """The run's signal handlers still hold for the evaluation and checkpoint after the last step: a SIGTERM
    there (sent for real, once the handler is the run's) is noted and the run completes, where it used to
    kill the process with its summary saying "running"."""
    outside = signal.getsignal(signal.SIGTERM)
    handlers = []
    real_evaluate = bnopt.train.evaluate

    def evaluate(model, data, batch_size, step, log):
        handlers.append(signal.getsignal(signal.SIGTERM))
        if step == 30 and handlers[-1] is not outside:
            os.kill(os.getpid(), signal.SIGTERM)
        real_evaluate(model, data, batch_size, step, log)

    monkeypatch.setattr(bnopt.train, "evaluate", evaluate)
    summary = train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=none", "train.steps=30")
    assert handlers[-1] is handlers[0] is not outside  # at step 30 as at step 0
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["status"] == "completed"


def test_a_checkpoint_keeps_the_random_state_of_the_run_s_gpu_only(tmp_path, monkeypatch):
    """A CPU run on a machine with GPUs reads no GPU's random state (which would start a CUDA context on
    each GPU, from every job of a sweep); a checkpoint from before, with every visible GPU's state, resumes
    where fewer GPUs are visible (torch's set_rng_state_all failed there with an IndexError)."""
    def no_gpu_state(*args):
        raise AssertionError("a GPU's random state read in a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_gpu_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_gpu_state)
    train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=none", "device=cpu")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["rng"]["cuda"] is None

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_gpu_state)
    cfg = compose_config("+experiment=dln_bn", "scale=smoke")
    data = bnopt.train.load_data(cfg.data, cfg.seed)
    model = bnopt.train.build_model(cfg, data)
    optimizer, schedule = bnopt.train.build_optimizer(cfg.optim, model, cfg.train.steps)
    batches = bnopt.train.BatchStream(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed)
    gpu_states = [torch.full((8,), k, dtype=torch.uint8) for k in range(2)]  # saved on a node with 2 GPUs
    for device, expected in [("cuda:1", 1), ("cuda:3", None), ("cpu", None)]:
        restored.clear()
        old = {**state, "rng": {**state["rng"], "cuda": gpu_states}}
        bnopt.train.restore_state(old, model, optimizer, schedule, batches, torch.device(device), tmp_path)
        assert restored == ([] if expected is None else [(gpu_states[expected], torch.device(device))])


def test_a_second_ctrl_c_stops_at_once_and_the_log_says_where_a_rerun_continues(tmp_path, monkeypatch, caplog):
    """Two SIGINTs (sent for real) at step 15: the second stops the run there, between its checkpoints of
    steps 10 and 20. Its summary says how far it got (interrupted, step 15), which is not where it resumes:
    the log line says that, and the re-run continues from step 10 to the uninterrupted run's metrics."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none", "train.checkpoint_every=10", "train.log_every=5")
    train_run(tmp_path / "reference", *args)
    real_log_train = bnopt.train.log_train

    def log_train(step, *rest):
        real_log_train(step, *rest)
        if step == 15:
            os.kill(os.getpid(), signal.SIGINT)  # the run's handler notes a stop is asked for
            os.kill(os.getpid(), signal.SIGINT)  # and raises KeyboardInterrupt at the second

    monkeypatch.setattr(bnopt.train, "log_train", log_train)
    with caplog.at_level("INFO", logger="bnopt"), pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "run", *args)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 15
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["step"] == 10
    assert (f"{tmp_path / 'run'}: interrupted at step 15; train/loss " in caplog.text
            and caplog.text.rstrip().endswith("; the same command continues it from step 10, its last checkpoint"))
    monkeypatch.setattr(bnopt.train, "log_train", real_log_train)
    caplog.clear()
    with caplog.at_level("INFO", logger="bnopt"):
        train_run(tmp_path / "run", *args)
    assert "resuming from step 10 of 30" in caplog.text and "its last checkpoint" not in caplog.text
    assert (tmp_path / "run/metrics.csv").read_text() == (tmp_path / "reference/metrics.csv").read_text()


def test_an_error_before_the_first_checkpoint_says_the_run_starts_again(tmp_path, monkeypatch, caplog):
    real_log_train = bnopt.train.log_train

    def log_train(step, *rest):
        real_log_train(step, *rest)
        if step == 5:
            raise RuntimeError("a fault at step 5")

    monkeypatch.setattr(bnopt.train, "log_train", log_train)
    with caplog.at_level("INFO", logger="bnopt"), pytest.raises(RuntimeError, match="a fault at step 5"):
        train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=none", "train.log_every=5")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert f"{tmp_path}: failed at step 5; train/loss " in caplog.text
    assert caplog.text.rstrip().endswith("; it has no checkpoint yet: the same command starts it again from step 0")


def test_a_run_resumed_after_its_last_logging_step_ends_with_the_same_summary(tmp_path, monkeypatch):
    """Stopped at step 27 of 30, after its last train/* row (step 25): the resumed steps log none, and the
    summary's final values still are the run's last ones, as a sweep's index and the figures read them."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none")
    reference = train_run(tmp_path / "reference", *args)
    stopped_run(tmp_path / "run", monkeypatch, 27, *args)  # interrupted at step 27
    resumed = train_run(tmp_path / "run", *args)
    assert resumed["status"] == "completed" and resumed["final"] == reference["final"] != {}
    assert json.loads((tmp_path / "run/summary.json").read_text())["final"] == reference["final"]
    assert resumed["metrics_rows"] == reference["metrics_rows"] > 0  # the rows kept from before count too


DLN_SMOKE = ("+experiment=dln_bn", "scale=smoke", "probes=[ics,landscape]", "train.checkpoint_every=10")


def test_a_run_killed_after_its_last_checkpoint_is_found_finished_with_its_summary_written_again(tmp_path):
    """Killed between its final checkpoint and its summary, a run's summary said "running", steps 0, for good:
    every later command found the checkpoint finished and returned that summary (the index listed it running,
    a recipe said another process was training it)."""
    reference = train_run(tmp_path, *DLN_SMOKE)
    written = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**written, "status": "running", "steps": 0, "final": {},
                                                       "metrics_rows": None}))
    again = train_run(tmp_path, *DLN_SMOKE)
    assert (again["status"], again["steps"], again["final"]) == ("completed", 30, reference["final"]) != ("", 0, {})
    assert again["metrics_rows"] == reference["metrics_rows"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == again
    (tmp_path / "summary.json").unlink()  # gone altogether: what the checkpoint knows of it comes back
    again = train_run(tmp_path, *DLN_SMOKE)
    assert (again["status"], again["final"], again["git_commits"], again["started"], again["machines"]) == (
        "completed", reference["final"], reference["git_commits"], reference["started"], reference["machines"])
    assert again["device_name"] == reference["device_name"]


@pytest.mark.parametrize("damage", ["rows lost", "a row garbled"])
def test_a_run_whose_record_lost_rows_before_its_checkpoint_is_not_continued(tmp_path, monkeypatch, damage):
    """Rows lost before the checkpoint (a full disk, a crash before they reached the disk, a copy cut short)
    were kept as they were, and the resumed run ended "completed" with a gap in its record."""
    stopped_run(tmp_path, monkeypatch, 17, *DLN_SMOKE)
    lines = (tmp_path / "metrics.csv").read_text().splitlines(keepends=True)
    if damage == "rows lost":
        del lines[3:6]
    else:
        lines[3] = lines[3].replace(",", ";", 1)
    (tmp_path / "metrics.csv").write_text("".join(lines))
    with pytest.raises(bnopt.train.ResumeError, match=r"before step 17, where the run had written \d+ by its "
                                                      r"checkpoint: part of its record is lost"):
        train_run(tmp_path, *DLN_SMOKE)


def test_a_run_whose_histograms_were_lost_is_not_continued(tmp_path, monkeypatch):
    """The activation probe's histograms of steps before the checkpoint live in activations.npz; without it a
    resumed run ended with only the histograms recorded after its resume, and said nothing."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=[activations]", "probes.activations.every=5",
            "train.checkpoint_every=10")
    stopped_run(tmp_path, monkeypatch, 17, *args)
    (tmp_path / "activations.npz").unlink()
    left = {name: (tmp_path / name).read_bytes() for name in ("metrics.csv", "config.yaml", "summary.json")}
    with pytest.raises(bnopt.train.ResumeError, match=r"activations.npz holds 0 histograms before step 17, where "
                                                      r"the run had recorded 12: part of its record is lost"):
        train_run(tmp_path, *args)  # steps 0, 5, 10, 15, three layers each
    assert {name: (tmp_path / name).read_bytes() for name in left} == left  # refused before anything changed
    (tmp_path / "activations.npz").write_bytes(b"not an npz")
    with pytest.raises(bnopt.train.ResumeError, match=r"activations.npz cannot be read \(\w+\): part of its"):
        train_run(tmp_path, *args)


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, monkeypatch):
    """The last line of a killed run's metrics may be cut anywhere; it comes after the checkpoint, so the
    count of rows before it holds and the resume goes on (a false refusal would strand every killed run), to
    the uninterrupted run's record."""
    reference = train_run(tmp_path / "reference", *DLN_SMOKE)
    stopped_run(tmp_path / "run", monkeypatch, 17, *DLN_SMOKE)
    with open(tmp_path / "run" / "metrics.csv", "a") as f:
        f.write("20,landscape/loss,1.5,,3e-")
    assert train_run(tmp_path / "run", *DLN_SMOKE)["final"] == reference["final"]
    assert (tmp_path / "run" / "metrics.csv").read_text() == (tmp_path / "reference" / "metrics.csv").read_text()


def test_a_checkpoint_reaches_the_disk_after_the_record_it_counts(tmp_path, monkeypatch):
    """After a node crash the checkpoint must not be there without the rows and histograms before it (the
    resume would refuse the run), nor be an empty file: each is synced before the rename that publishes the
    checkpoint, and the directory after it."""
    synced = []

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)

    monkeypatch.setattr(os, "fsync", fsync)
    train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=[activations]", "train.checkpoint_every=10")
    checkpoints = [i for i, name in enumerate(synced) if name == "checkpoint.pt.tmp"]
    assert len(checkpoints) == 3  # steps 10, 20 and the end, 30
    for i in checkpoints:
        assert synced[i - 3 : i + 2] == ["activations.tmp.npz", tmp_path.name, "metrics.csv", "checkpoint.pt.tmp",
                                         tmp_path.name]


def test_a_run_resumed_with_other_code_says_which_code_ran_which_steps(tmp_path, monkeypatch, caplog):
    stopped = stopped_run(tmp_path, monkeypatch, 17, *DLN_SMOKE)
    monkeypatch.setattr(bnopt.train, "git_commit", lambda: "0123abc-dirty")
    with caplog.at_level("WARNING", logger="bnopt"):
        resumed = train_run(tmp_path, *DLN_SMOKE)
    assert resumed["git_commits"] == [[0, stopped["git_commit"]], [17, "0123abc-dirty"]]
    assert resumed["git_commit"] == "0123abc-dirty" and resumed["started"] == stopped["started"]
    assert f"resuming with code at 0123abc-dirty; steps 0 to 16 ran {stopped['git_commit']}" in caplog.text
    assert resumed["machines"] == stopped["machines"] == [[0, machine_of(stopped)]]  # the same machine: one entry
    assert "resuming on" not in caplog.text


def machine_of(summary: dict) -> dict:
    return {key: summary[key] for key in ("device", "device_name", "threads", "torch")}


@pytest.mark.parametrize("change", ["another CPU", "fewer threads"])
def test_a_run_resumed_on_another_machine_says_which_steps_ran_where(tmp_path, monkeypatch, caplog, change):
    """A requeued job may land on another kind of node, or take another thread count (``threads`` is not part
    of a run's identity): its kernels then sum in another order, and the summary named only the last machine,
    so a resumed run that parted from its seed's other runs at float rounding gave no sign of why."""
    stopped = stopped_run(tmp_path, monkeypatch, 17, *DLN_SMOKE, "threads=2")
    if change == "another CPU":
        monkeypatch.setattr(bnopt.train, "device_name", lambda device: "Other CPU (AVX512)")
    with caplog.at_level("WARNING", logger="bnopt"):
        resumed = train_run(tmp_path, *DLN_SMOKE, "threads=2" if change == "another CPU" else "threads=1")
    now = {**machine_of(stopped), **({"device_name": "Other CPU (AVX512)"} if change == "another CPU" else
                                     {"threads": 1})}
    assert resumed["status"] == "completed"
    assert resumed["machines"] == [[0, machine_of(stopped)], [17, now]] and machine_of(resumed) == now
    assert (f"resuming on {describe_machine(now)}; steps 0 to 16 ran on "
            f"{describe_machine(stopped)}: from step 17 the run need not match") in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["machines"] == resumed["machines"]
    (tmp_path / "summary.json").unlink()  # gone: the checkpoint keeps the history, and the last machine
    again = train_run(tmp_path, *DLN_SMOKE, "threads=1")
    assert again["machines"] == resumed["machines"] and machine_of(again) == now


def test_a_checkpoint_from_before_it_kept_the_code_and_start_resumes_with_those_of_the_summary(tmp_path, monkeypatch,
                                                                                                caplog):
    stopped = stopped_run(tmp_path, monkeypatch, 17, *DLN_SMOKE)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("git_commits", "machines", "started", "metrics_rows")},
               tmp_path / "checkpoint.pt")
    with caplog.at_level("WARNING", logger="bnopt"):
        resumed = train_run(tmp_path, *DLN_SMOKE)
    assert resumed["status"] == "completed" and "resuming with code" not in caplog.text
    assert "resuming on" not in caplog.text
    assert (resumed["git_commits"], resumed["started"]) == ([[0, stopped["git_commit"]]], stopped["started"])
    assert resumed["machines"] == [[0, machine_of(stopped)]]


def test_results_without_a_readable_summary_or_config_are_not_overwritten(tmp_path):
    """A finished run kept without its checkpoint (as the committed results are) whose summary or config.yaml
    was damaged (a merge conflict, a copy cut short): another config's command trained over it, silently."""
    train_run(tmp_path, *DLN_SMOKE)
    (tmp_path / "checkpoint.pt").unlink()
    metrics = (tmp_path / "metrics.csv").read_bytes()
    summary = (tmp_path / "summary.json").read_text()
    (tmp_path / "summary.json").write_text(summary[:50])
    with pytest.raises(bnopt.train.AnotherConfigError, match="optim.lr: 1e-06 -> 2e-06"):
        train_run(tmp_path, *DLN_SMOKE, "optim.lr=2e-6")
    config = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(bnopt.train.UnknownRunError, match="summary.json cannot be read and no config.yaml says whose"):
        train_run(tmp_path, *DLN_SMOKE, "optim.lr=2e-6")
    (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(bnopt.train.ResumeError, match="holds a finished run and no config.yaml says whose"):
        train_run(tmp_path, *DLN_SMOKE, "optim.lr=2e-6")
    (tmp_path / "config.yaml").write_text(config[:40] + "\n  - [unclosed")
    with pytest.raises(bnopt.train.UnknownRunError, match="config.yaml cannot be read"):
        train_run(tmp_path, *DLN_SMOKE, "optim.lr=2e-6")
    assert (tmp_path / "metrics.csv").read_bytes() == metrics
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "summary.json").write_text(summary[:50])
    assert train_run(tmp_path, *DLN_SMOKE)["status"] == "completed"  # its own config: trained afresh, same run
    assert (tmp_path / "metrics.csv").read_bytes() == metrics


def test_a_requeued_job_on_another_device_or_thread_count_is_the_same_run(tmp_path):
    train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=none", "name=first", "threads=1")
    again = train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=none", "name=second", "threads=2",
                      "device=cpu")
    assert again["status"] == "completed"  # recognised as finished, not refused and not re-run


# --- GPU options, on any machine (their validation: test_cli) ------------------------------------------


def test_channels_last_computes_the_same_network(tmp_path, cifar_root):
    """Same weights and batch at step 0: the memory format changes only rounding (later steps amplify it)."""
    common = ("+experiment=vgg_bn", "scale=smoke", f"data.root={cifar_root}", "data.download=false")
    plain = train_run(tmp_path / "plain", *common)
    channels_last = train_run(tmp_path / "cl", *common, "train.channels_last=true")
    assert channels_last["status"] == plain["status"] == "completed"
    first = [read_rows(tmp_path / name)[:3] for name in ("plain", "cl")]  # test loss, test acc, train loss at step 0
    for a, b in zip(*first):
        assert a.split(",")[:2] == b.split(",")[:2]
        assert float(a.split(",")[2]) == pytest.approx(float(b.split(",")[2]), rel=1e-5)


@pytest.mark.slow
def test_compiled_forward_trains_like_the_eager_one(tmp_path):
    eager = train_run(tmp_path / "eager", "+experiment=dln_bn", "scale=smoke", "probes=[ics,landscape]")
    compiled = train_run(tmp_path / "compiled", "+experiment=dln_bn", "scale=smoke", "probes=[ics,landscape]",
                         "train.compile=true")
    first = [float(read_rows(tmp_path / name, ("train/loss",))[0].split(",")[2]) for name in ("eager", "compiled")]
    assert first[1] == pytest.approx(first[0], rel=1e-5)  # the same network on the same first batch
    # Compiled kernels fuse and reorder float32 arithmetic; over the run the loss drifts by ~1e-4 relative.
    assert compiled["final"]["train/loss"] == pytest.approx(eager["final"]["train/loss"], rel=1e-3)
    # At step 0 (the same weights) the probes measure the same, to the bit: they compute in eager fp32, and
    # in the compiled run they take the gradient from their own pass, not from the compiled graph's .grad.
    probed = [[row for row in read_rows(tmp_path / name, ("ics/", "landscape/")) if row.startswith("0,")]
              for name in ("eager", "compiled")]
    assert probed[0] and probed[0] == probed[1]


@pytest.mark.parametrize("status, listed", [("completed", False), ("diverged", False), ("interrupted", True),
                                            ("failed", True), ("running", True)])
def test_a_diverged_job_has_finished_its_run(tmp_path, status, listed):
    """A learning-rate sweep expects runs to diverge: such a job must not stop a recipe."""
    from bnopt.hydra_callbacks import why_not_this_jobs_run

    config = OmegaConf.to_container(compose_config("+experiment=dln_bn", "scale=smoke"), resolve=True)
    run = RunDirectory(tmp_path)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    run.write_summary({"status": status, "error": "RuntimeError: boom" if status == "failed" else None})
    assert (why_not_this_jobs_run(run, config) is not None) == listed

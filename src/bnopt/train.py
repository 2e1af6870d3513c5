"""The training loop: one run, from a composed config to the results contract in its directory.

Read top to bottom: ``train`` builds everything, resumes from a checkpoint if the directory has one, then
runs the plain loop. Steps are counted from 0: step t uses the weights after t updates, W(t), so
``train/*`` and probe rows at step t describe W(t) on batch t, and ``test/*`` rows at step t evaluate W(t).

Probes attach at two hook points of every step where they are due: before the forward pass, and between
``loss.backward()`` and ``optimizer.step()``. They are observations: a run with probes produces exactly the
metrics of a run without them.
"""

from __future__ import annotations

import errno
import logging
import math
import platform
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bnopt.build import build_model, build_optimizer, resolve_device
from bnopt.config import check_against_run, check_config
from bnopt.config_history import NOT_IDENTITY, with_keys_added_later
from bnopt.data import BatchStream, TensorData, load_data
from bnopt.norms import NoisyNorm, draws_left_eager, set_noise_step
from bnopt.probes import ActivationProbe, build_probes
from bnopt.probes.activations import histogram_steps
from bnopt.probes.observation import float32_settings_restored
from bnopt.rundir import (FINISHED, MetricsWriter, RunDirectory, describe_machine, final_values, git_commit,
                          metric_rows, record_lost)
from bnopt.seeding import seed_everything

# A line when a run starts, resumes, is found finished, and ends: Hydra's logging puts it on the console and in
# the run's train.log; called as a library, train() says nothing unless the caller configures logging.
logger = logging.getLogger("bnopt")


class ResumeError(RuntimeError):
    """The output directory holds a run that this command cannot continue (a checkpoint it cannot read, a
    record that lost rows) or must not overwrite. The message ends "choose another output directory"; the CLI
    adds the key that sets it."""


class DiskFullError(RuntimeError):
    """A write of the run refused for want of space (a full disk, a quota): the run stopped, its summary
    saying ``failed`` where there was room to write it, and the same command continues it once there is."""


# Linux and macOS name both; Windows only the first
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class AnotherConfigError(ResumeError):
    """The output directory holds a run of another config: its files, summary included, are that run's."""


class UnknownRunError(AnotherConfigError):
    """The output directory holds results whose config or summary cannot be read: they may be another run's,
    so they are left as they are, summary included."""


def train(cfg: DictConfig, run_dir: Path, job: dict | None = None) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; return its summary. One process at a time trains
    in a run directory: another one gets :class:`~bnopt.rundir.RunBusyError`. ``job`` is how the launcher
    names the run (the CLI gives Hydra's job number and command-line overrides); the summary records it once
    the run is accepted, so a sweep's index names the command whose results the directory holds."""
    check_config(cfg)
    run = RunDirectory(run_dir)
    run.ensure_writable()
    with run.claimed(), process_settings(cfg.threads, cfg.train.tf32):
        try:
            return train_claimed(cfg, run, job)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            writing = f" (writing {err.filename})" if err.filename else ""
            raise DiskFullError(f"{err.strerror} while training {run.path}{writing}; free space and "
                                "run the same command again") from err


@contextmanager
def process_settings(threads: int | None, tf32: bool):
    """torch's thread count and TF32 switches for one run, put back afterwards: they belong to the process,
    and one that trains several runs (a notebook, the tests) would otherwise run the next one, and compare
    it, under the previous run's settings."""
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with float32_settings_restored():
            # Through the precision, as the probes put it back after each measurement: set through the
            # legacy flag, a TF32 run's CPU matmul setting changed at its first probe ("high" covers both).
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = tf32
            yield
    finally:
        torch.set_num_threads(saved_threads)


def train_claimed(cfg: DictConfig, run: RunDirectory, job: dict | None) -> dict:
    """:func:`train`, once this process holds the run directory."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = load_checkpoint(run, resolved)
    if checkpoint is None and finished_without_checkpoint(run, resolved):
        summary = run.read_summary()
        logger.info("%s: already %s at step %s; not re-running", run.path, summary["status"], summary.get("steps"))
        warn_if_record_lost(run, summary)
        return summary
    if checkpoint is not None and checkpoint["status"] in FINISHED:
        logger.info("%s: already %s at step %s; not re-running", run.path, checkpoint["status"], checkpoint["step"])
        summary = summary_of_finished(run, checkpoint)
        warn_if_record_lost(run, summary)
        return summary
    if checkpoint is not None:
        check_record_kept(run, checkpoint, resolved)

    # --- build: data, model, optimiser, probes --------------------------------------------------------
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, cfg.seed).to(device)
    model = build_model(cfg, data).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        torch._dynamo.reset()  # a process compiles only a few models before falling back to eager silently
    forward = torch.compile(draws_left_eager(model)) if cfg.train.compile else model  # the probes use `model`, eager
    check_against_run(cfg, model.num_layers, len(data.train_x))
    steps = cfg.train.steps
    optimizer, schedule = build_optimizer(cfg.optim, model, steps)
    batches = BatchStream(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed,
                          augment=cfg.data.get("augment", False), pad_value=data.black,
                          channels_last=cfg.train.channels_last)
    start = 0 if checkpoint is None else checkpoint["step"]
    # Only now, with the config checked against the model and data: a command refused on the way must not
    # relabel what a run killed before its first checkpoint left here (its metrics stay until one starts).
    run.write_config(cfg)
    metrics = MetricsWriter(run.metrics, keep_before_step=None if checkpoint is None else start)
    log = metrics.log
    # The training pass's gradient serves the probes where it was computed as theirs are (GradientProbe).
    same_numerics = device.type == "cpu" and not cfg.train.tf32 and not cfg.train.compile
    probes = build_probes(resolved.get("probes"), model=model, loss_fn=data.loss_fn, optimizer=optimizer, log=log,
                          seed=cfg.seed, reuse_training_gradient=same_numerics)
    if checkpoint is not None:
        restore_state(checkpoint, model, optimizer, schedule, batches, device, run.checkpoint)
        for probe in probes:
            probe.restore(run.path, start)
    noisy_layers = [m for m in model.modules() if isinstance(m, NoisyNorm)]

    commit, started = git_commit(), now()
    machine = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
               "torch": str(torch.__version__)}  # a str: TorchVersion cannot be loaded with weights_only
    commits, machines = [[0, commit]], [[0, machine]]
    if checkpoint is not None:
        # checkpoints from before they kept these: the summary the run last wrote has them
        before = run.read_summary() or {}
        commits = checkpoint.get("git_commits") or [[0, before.get("git_commit", "unknown")]]
        machines = checkpoint.get("machines") or [[0, {key: before.get(key, "unknown") for key in machine}]]
        started = checkpoint.get("started") or before.get("started") or started
        if commits[-1][1] != commit:  # steps before the checkpoint ran other code
            logger.warning("%s: resuming with code at %s; steps %d to %d ran %s", run.path, commit,
                           commits[-1][0], start - 1, commits[-1][1])
            commits = [*commits, [start, commit]]
        # A requeued job may land on another kind of node: its kernels sum in another order, so from here the
        # run can part, at float rounding, from one that never stopped.
        if machines[-1][1] != machine:
            logger.warning("%s: resuming on %s; steps %d to %d ran on %s: from step %d the run need not match, "
                           "bit for bit, one that was never stopped", run.path, describe_machine(machine),
                           machines[-1][0], start - 1, describe_machine(machines[-1][1]), start)
            machines = [*machines, [start, machine]]
    summary = {
        "status": "running", "steps": start, "final": {}, "metrics_rows": None, "diverged_at_step": None,
        "wall_time_s": 0.0 if checkpoint is None else checkpoint["wall_time_s"], "steps_per_s": None,
        **machine, "machines": machines, "git_commit": commit, "git_commits": commits, "started": started,
        "finished": None, "error": None, "job": job,
    }
    run.write_summary(summary)
    logger.info("%s: %s from step %d of %d on %s", run.path, "resuming" if checkpoint else "training", start,
                cfg.train.steps, summary["device"])

    checkpointed = None if checkpoint is None else start  # the step a re-run would continue from

    def save_checkpoint(step: int, status: str) -> None:
        nonlocal checkpointed
        for probe in probes:
            probe.save(run.path)
        state = checkpoint_state(step, status, resolved, model, optimizer, schedule, batches, device,
                                 summary["wall_time_s"] + time.perf_counter() - t0)
        # what the summary must say if the run is found finished, or resumed: how much of the record came
        # before this step, which code ran it, since when
        state.update(metrics_rows=metrics.rows, git_commits=summary["git_commits"], machines=summary["machines"],
                     started=summary["started"])
        metrics.sync()
        run.save_checkpoint(state)
        checkpointed = step

    # Plain values for the hot loop: reading an interpolated config value parses it every time.
    log_every, eval_every = cfg.train.log_every, cfg.train.eval_every
    checkpoint_every, eval_batch_size = cfg.train.checkpoint_every, cfg.train.eval_batch_size
    # Checking the loss for NaN/inf reads it back to the host: every step on the CPU (free), at logging
    # steps and the last step on a GPU (no sync per step; a divergence is then reported at the next of them).
    check_every = 1 if device.type == "cpu" else log_every
    status, step = "completed", start
    loop_seconds = None
    model.train()  # evaluation switches to eval mode and back
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, unit="step", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        with stop_signals() as stop:
            # --- the loop ---------------------------------------------------------------------------
            while step < steps:
                if stop.requested:
                    status = "interrupted"
                    break
                if step > start and step % checkpoint_every == 0:
                    save_checkpoint(step, "running")
                for layer in noisy_layers:
                    layer.step = step  # noisy BN draws the noise of (seed, layer, step), in evaluation too
                if step % eval_every == 0:
                    evaluate(model, data, eval_batch_size, step, log)

                inputs, targets = batches.next()
                due = [probe for probe in probes if probe.due(step)]
                for probe in due:
                    probe.before_forward(step)  # hook point 1: e.g. arm the activation hooks
                outputs = forward(inputs)
                loss = data.loss_fn(outputs, targets)
                if (step % check_every == 0 or step == steps - 1) and not math.isfinite(loss.item()):
                    status = "diverged"
                    break

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for probe in due:
                    probe.after_backward(step, (inputs, targets))  # hook point 2: .grad holds this batch's gradient
                optimizer.step()
                if schedule is not None:
                    schedule.step()

                if step % log_every == 0:
                    log_train(step, loss, outputs, targets, data, log, bar)
                step += 1
                bar.update()
            # -------------------------------------------------------------------------------------
            loop_seconds = time.perf_counter() - t0
            # Still under the handlers: a signal now lets the run finish (the last evaluation and
            # checkpoint) rather than killing it with its summary saying "running".
            if status == "completed":
                set_noise_step(model, step)
                evaluate(model, data, eval_batch_size, step, log)
            save_checkpoint(step, status)
    except KeyboardInterrupt:
        summary["status"] = "interrupted"  # the last periodic checkpoint stays the resume point
        raise
    except BaseException as err:
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        bar.close()
        for probe in probes:
            probe.close()
        refused = None
        try:
            metrics.close()
        except OSError as err:  # rows the disk refused (full): the summary must still say how the run stopped
            if summary["status"] == "running":  # else the run stopped on an error already, as a rule this one
                refused = err
                summary.update(status="failed", error=f"{type(err).__name__}: {err}")
        elapsed = time.perf_counter() - t0
        if summary["status"] == "running":
            summary["status"] = status
        summary.update(
            steps=step, final=dict(metrics.last), metrics_rows=metrics.rows,  # lets a reader see rows lost since
            diverged_at_step=step if status == "diverged" else None,
            wall_time_s=summary["wall_time_s"] + elapsed,
            steps_per_s=(step - start) / loop_seconds if loop_seconds else None, finished=now(),
        )
        run.write_summary(summary)
        finals = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items() if isinstance(v, float))
        logger.info("%s: %s at step %d%s%s", run.path, summary["status"], step, f"; {finals}" if finals else "",
                    resume_point(step, checkpointed))
        if refused is not None:
            raise refused
    return summary


def resume_point(step: int, checkpointed: int | None) -> str:
    """What a run stopped without a checkpoint at its last step (a second Ctrl-C, an error) continues from
    when the command is run again: its summary says how far it got, which is not where it resumes."""
    if checkpointed == step:
        return ""
    if checkpointed is None:
        return "; it has no checkpoint yet: the same command starts it again from step 0"
    return f"; the same command continues it from step {checkpointed}, its last checkpoint"


def log_train(step, loss, outputs, targets, data: TensorData, log, bar) -> None:
    """``train/loss`` (and ``train/acc``) on the current batch, at W(t)."""
    log(step, "train/loss", loss.item())
    postfix = {"loss": f"{loss.item():.4g}"}
    if data.is_classification:
        accuracy = (outputs.argmax(1) == targets).float().mean().item()
        log(step, "train/acc", accuracy)
        postfix["acc"] = f"{accuracy:.3f}"
    bar.set_postfix(postfix, refresh=False)


@torch.no_grad()
def evaluate(model, data: TensorData, batch_size: int, step: int, log) -> None:
    """``test/loss`` and ``test/acc`` over the whole test set in eval mode (running statistics; no noise
    unless ``norm.noise.train_only`` is false)."""
    if data.test_x is None:
        return
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=data.test_x.device)
    correct = torch.zeros((), dtype=torch.long, device=data.test_x.device)
    for i in range(0, len(data.test_x), batch_size):
        x, y = data.test_x[i : i + batch_size], data.test_y[i : i + batch_size]
        out = model(x)
        total_loss += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    log(step, "test/loss", total_loss.item() / len(data.test_x))
    log(step, "test/acc", correct.item() / len(data.test_x))


# --- checkpoints ------------------------------------------------------------------------------------


def checkpoint_state(step, status, resolved, model, optimizer, schedule, batches, device, wall_time_s) -> dict:
    np_state = np.random.get_state()
    return {
        "step": step,
        "status": status,
        "config": resolved,
        "wall_time_s": wall_time_s,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": None if schedule is None else schedule.state_dict(),
        "batches": batches.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            # The run's GPU only: reading every GPU's would start a CUDA context on each, from every job of
            # a sweep (a CPU run too), and could not be restored where fewer GPUs are visible.
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        },
    }


CHECKPOINT_KEYS = {"step", "status", "config", "wall_time_s", "model", "optimizer", "schedule", "batches", "rng"}


def load_checkpoint(run: RunDirectory, resolved: dict) -> dict | None:
    """The checkpoint in ``run``, if any, after checking that it belongs to this exact config."""
    if not run.checkpoint.exists():
        return None
    try:
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
        missing = CHECKPOINT_KEYS - set(state)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
    except Exception as err:
        reason = str(err).splitlines()[0].split(". ")[0][:120] if str(err) else ""
        raise ResumeError(f"{run.checkpoint} cannot be read ({type(err).__name__}: {reason}); it is corrupt or "
                          "not a bnopt checkpoint. Move it away to start this run afresh, or choose another "
                          "output directory") from None
    refuse_another_config(run.checkpoint, state["config"], resolved)
    return state


def summary_of_finished(run: RunDirectory, checkpoint: dict) -> dict:
    """The summary of a run whose checkpoint says it finished. Killed between that checkpoint and its summary,
    a run's summary said ``running`` for good (each later command found the run finished and returned it):
    it is written again from the checkpoint and the metrics, with the final values the run ended with."""
    summary = run.read_summary() or {}
    status, step = checkpoint["status"], checkpoint["step"]
    if summary.get("status") == status and summary.get("steps") == step:
        return summary
    ended = datetime.fromtimestamp(run.checkpoint.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    summary.update(status=status, steps=step, final=final_values(metric_rows(run.metrics)),
                   metrics_rows=checkpoint.get("metrics_rows"), diverged_at_step=step if status == "diverged" else None,
                   wall_time_s=checkpoint["wall_time_s"], finished=ended, error=None)
    if "git_commits" in checkpoint:  # what the checkpoint knows of a summary that is gone
        summary.update(git_commit=checkpoint["git_commits"][-1][1], git_commits=checkpoint["git_commits"],
                       started=checkpoint["started"])
    if "machines" in checkpoint:
        summary.update(checkpoint["machines"][-1][1], machines=checkpoint["machines"])
    run.write_summary(summary)
    logger.warning("%s: its summary did not say it %s; written again from its checkpoint", run.path, status)
    return summary


def warn_if_record_lost(run: RunDirectory, summary: dict) -> None:
    """Name a finished run whose ``metrics.csv`` no longer holds the rows it wrote (a copy cut short): its
    command finds it finished and does not train it again, and the figures and the report skip it, so the
    one command a user would try says what to do."""
    lost = record_lost(summary, len(metric_rows(run.metrics)))
    if lost:
        logger.warning("%s holds %s, and the figures and the report skip it. Move the run away and run this "
                       "command again", run.metrics, lost)


def check_record_kept(run: RunDirectory, checkpoint: dict, resolved: dict) -> None:
    """A run resumes only with every row and histogram it recorded before its checkpoint: some lost since (a
    full disk, a file copied short or deleted) would leave a gap in a run that ends ``completed``. Checked
    before anything in the directory changes. Metrics of checkpoints from before the count was kept are not."""
    step = checkpoint["step"]
    lost = "part of its record is lost, so it cannot continue. Move the run away to start it afresh, or choose " \
           "another output directory"
    expected = checkpoint.get("metrics_rows")
    kept = len(metric_rows(run.metrics, before_step=step))
    if expected is not None and kept != expected:
        raise ResumeError(f"{run.metrics} holds {kept} well-formed rows before step {step}, where the run had "
                          f"written {expected} by its checkpoint: {lost}")
    activations = (resolved.get("probes") or {}).get("activations")
    if activations:
        path = run.path / ActivationProbe.FILE
        expected = ActivationProbe.histograms_before(activations, step)
        try:
            kept = int((histogram_steps(path) < step).sum())
        except Exception as err:
            raise ResumeError(f"{path} cannot be read ({type(err).__name__}): {lost}") from None
        if kept != expected:
            raise ResumeError(f"{path} holds {kept} histograms before step {step}, where the run had recorded "
                              f"{expected}: {lost}")


KEEP_RESULTS = "refusing to overwrite its results. Move the run away, or choose another output directory"


def finished_without_checkpoint(run: RunDirectory, resolved: dict) -> bool:
    """Whether ``run`` holds this config's run, finished, without its checkpoint: the committed results are
    kept without them, and a user may delete them to save space. Its summary says it finished and its
    ``config.yaml`` whose run it is; a finished run of another config is refused, as its checkpoint would be."""
    summary = run.read_summary()
    # A summary that cannot be read (a copy cut short, a merge conflict) may be a finished run's: its results
    # are kept unless its config.yaml says it is this config's run, which then trains afresh to the same values.
    damaged = summary is None and run.summary.exists()
    finished = summary is not None and summary.get("status") in FINISHED
    if not (damaged or finished):
        return False  # nothing finished here: a run killed before its first checkpoint starts afresh
    if not run.config.exists():
        # a finished summary stays as it is either way; the error's kind says whether the job failed (a sweep
        # lists it so) or the directory holds results that may be another run's
        error = UnknownRunError if damaged else ResumeError
        what = f"{run.summary} cannot be read" if damaged else f"{run.path} holds a finished run"
        raise error(f"{what} and no config.yaml says whose run it is; {KEEP_RESULTS}")
    refuse_another_config(run.config, read_config_of_results(run), resolved)
    return finished


def read_config_of_results(run: RunDirectory) -> dict:
    try:
        return run.read_config()
    except Exception as err:
        raise UnknownRunError(f"{run.config} cannot be read ({type(err).__name__}), so whose run {run.path} holds "
                              f"cannot be told; {KEEP_RESULTS}") from None


def refuse_another_config(source: Path, config: dict, resolved: dict) -> None:
    """Raise :class:`AnotherConfigError` if ``config`` (read from ``source``) is another run's than ``resolved``."""
    differences = identity_differences(config, resolved)
    if differences:
        diffs = ", ".join(differences[:5])
        raise AnotherConfigError(f"{source} belongs to a run with another config ({diffs}); refusing "
                                 "to overwrite its results. Choose another output directory")


def identity_differences(a: dict, b: dict) -> list[str]:
    """``key: old -> new`` for every leaf where two plain configs differ as runs (``NOT_IDENTITY`` left out;
    a key one of them predates counts with the value that computes what it computed)."""
    differences = config_differences(with_keys_added_later(a), with_keys_added_later(b))
    return [d for d in differences if d.split(":")[0] not in NOT_IDENTITY]


def config_differences(a, b, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two plain config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += config_differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def restore_state(state, model, optimizer, schedule, batches, device, source: Path) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state["schedule"])
    try:
        batches.load_state_dict(state["batches"])
    except ValueError as err:
        raise ResumeError(f"{source}: {err}. Resume it there, or choose another output directory") from None
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    cuda = rng["cuda"]
    if device.type == "cuda" and isinstance(cuda, list):  # checkpoints before 2026-12-01: every visible GPU's
        index = torch.cuda.current_device() if device.index is None else device.index
        cuda = cuda[index] if index < len(cuda) else None
    if device.type == "cuda" and isinstance(cuda, torch.Tensor):  # a CPU run's, or a CPU checkpoint: none
        torch.cuda.set_rng_state(cuda, device)
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


# --- small helpers ----------------------------------------------------------------------------------


class _Stop:
    requested = False


@contextmanager
def stop_signals():
    """SIGTERM (what SLURM sends before a kill) and SIGINT ask the loop to stop at the next step, where it
    checkpoints and exits as ``interrupted``; a second SIGINT interrupts at once."""
    stop = _Stop()

    def request(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def device_name(device: torch.device) -> str:
    """A GPU's name; a CPU's model and the instruction set torch's kernels use there ("AMD EPYC (AVX2)"):
    another set runs other kernels, which sum in another order, so that runs of one seed agree bit for bit
    only on CPUs that match in both (and in the thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name where Linux gives one; else what Python's ``platform`` knows ("x86_64")."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

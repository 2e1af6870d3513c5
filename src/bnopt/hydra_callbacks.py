"""Hydra callbacks registered in ``configs/train.yaml``.

``OutputDirCheck``: Hydra creates a run's output directory before the task starts, so a directory that
cannot be written would end in Hydra's traceback; this checks it first and answers in one line.
``SweepIndex``: when a sweep ends, ``index.csv`` in its directory lists every job with its status and final
metrics (``python scripts/sweep_index.py <dir>`` rebuilds it any time, e.g. after a sweep was killed).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bnopt.rundir import OutputDirError, RunDirectory
from bnopt.sweeps import write_index


def _require_writable(directory: str, key: str) -> None:
    try:
        RunDirectory(Path(directory)).ensure_writable()
    except OutputDirError as err:
        print(f"error: {err}; choose another with {key}=...", file=sys.stderr)
        sys.exit(2)


class OutputDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _require_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _require_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


class SweepIndex(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(f"sweep index: {write_index(sweep_dir, warn=lambda m: print(m, file=sys.stderr))}")

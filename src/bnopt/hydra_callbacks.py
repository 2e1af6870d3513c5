"""Hydra callbacks registered in ``configs/train.yaml``.

Hydra creates a run's output directory before the task starts, so a directory that cannot be written
would end in Hydra's traceback; this callback checks it first and answers in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bnopt.rundir import OutputDirError, RunDirectory


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
